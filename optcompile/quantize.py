"""Blockwise 8-bit optimizer states: ``state_precision="8bit"`` (the format every backend shares).

**Format.** A state of ``n`` elements is split, in the row-major order of its param, into blocks of
``BLOCK`` = 256 elements (the last one may be shorter); each block keeps one fp32 scale ``s``, the
largest magnitude in it (absmax), and each element one 8-bit code ``q`` under square-root
companding (a closed form, no table to search)::

    encode   q = rint(top · sign(x) · sqrt(|x| / s))      (0 where s is 0 or not finite;
             fp32, the division and square root correctly rounded: sqrt_rn)
    decode   x̂ = sign(q) · (d · d) · s,   d = |q| / top    (fp32, in this order)

``top`` is 127 for a signed code (``int8``, ``-127..127``) and 255 for an unsigned one (``uint8``,
``0..255``), which a state gets when the compiler shows it is never negative (an ``exp_avg_sq``:
optcompile/nonnegative.py) or the spec declares it (``spec.state(name, nonnegative=True)``); an
unsigned code stores a negative value as 0. ``rint`` rounds half to even (round to nearest:
codes are never rounded stochastically). The error of a decoded element is at most
``sqrt(|x|·s)/top + s/(4·top²)`` (and a few fp32 ulps of ``s``): about ``0.8 %`` of ``s`` near the
block's absmax, relatively smaller for small values, and magnitudes below ``s/(2·top)²`` decode
as 0. The choice of code and block size is measured on Adam moments in docs/eightbit.md
(benchmarks/quant_codes.py): linear codes flush small second moments to 0 (the update then blows
up by ``1/eps``), a dynamic-exponent map has twice the error, square-root companding the least.
A non-finite value makes its block's scale non-finite, and the whole block then decodes as NaN.

**Which tensors.** States of params of at least ``MIN_NUMEL`` = 4096 elements, of the param's
shape, with fp32, bf16 or fp16 params; a smaller state (biases, norms) or one of a reduced shape
(Adafactor's factors) is kept in fp32, and fp64 params keep fp64 states. ``kahan_comp`` follows
the param as under every ``state_precision``.

**Layout.** ``optimizer.state[p][name]`` holds the codes (the param's shape, ``int8`` or
``uint8``) and ``optimizer.state[p][name + "_scale"]`` the scales (fp32, ``ceil(n / BLOCK)``
elements), which is what ``state_dict()`` saves and ``torch.load(weights_only=True)`` reads back.

**Step.** The fused C and Triton kernels load and store the codes themselves, block by block
(decode with the block's scale, fp32 math, encode with the new absmax: the formulas above,
templates/fused.c.j2 and templates/triton.py.j2); elsewhere (eager, foreach, tensors a kernel
cannot take) a param's 8-bit states are decoded to fp32, stepped as fp32 states and encoded with
:func:`quantize_`. Either way the math sees the exact fp32 values within the step, each block's
scale comes from its new absmax, and the codes are the same. Under FSDP2 blocks would be per
local shard.
"""
from __future__ import annotations

import torch

from .blockformat import BLOCK, SCALE_SUFFIX, SIGNED_TOP, UNSIGNED_TOP, scale_key  # noqa: F401

MIN_NUMEL = 4096
EIGHTBIT = "8bit"
QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16)


def code_dtype(nonnegative: bool) -> torch.dtype:
    return torch.uint8 if nonnegative else torch.int8


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def requested(precision, name: str) -> bool:
    """Whether ``state_precision=precision`` asks for state ``name`` in 8 bits."""
    if isinstance(precision, dict):
        precision = precision.get(name)
    return precision == EIGHTBIT


def applies(param: torch.Tensor, shape=None) -> bool:
    """Whether an 8-bit state of ``param`` (``shape``: the state's, when it is not the param's) is
    stored in 8 bits; else it is kept in fp32 (fp64 params: fp64)."""
    return (param.dtype in QUANTIZABLE and param.numel() >= MIN_NUMEL
            and (shape is None or tuple(shape) == tuple(param.shape)))


def _top(dtype: torch.dtype) -> int:
    if dtype == torch.int8:
        return SIGNED_TOP
    if dtype == torch.uint8:
        return UNSIGNED_TOP
    raise TypeError(f"8-bit codes are int8 or uint8, not {dtype}")


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened to ``(blocks, BLOCK)``, the last block zero-padded."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK)


ENCODE_ROWS = 4096  # blocks encoded at a time (bounds the fp64 temporary of sqrt_rn)


def sqrt_rn(r: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root of fp32 ``r`` (IEEE ``sqrt``, as C's ``sqrtf`` and
    Triton's ``sqrt_rn``). torch's CPU ``sqrt`` is not (a fifth of fp32 inputs come out one ulp
    off on AVX-512 builds), so it runs in fp64 and rounds once: the exact root of a 24-bit
    value lies at least 2^-50 of its binade from any fp32 rounding midpoint, farther than fp64's
    error, so the fp32 result is the correctly rounded one."""
    return torch.sqrt(r.to(torch.float64)).to(torch.float32)


def quantize_(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Encode ``x`` (any float dtype, ``codes``' numel) into ``codes`` (int8: signed, uint8: unsigned)
    and ``scales`` (fp32, one per block), in place."""
    top = _top(codes.dtype)
    padded = _padded(x.detach().to(torch.float32))
    n = codes.numel()
    out = codes.view(-1)
    for lo in range(0, padded.shape[0], ENCODE_ROWS):
        b = padded[lo:lo + ENCODE_ROWS]
        s = b.abs().amax(dim=1, keepdim=True)
        if codes.dtype == torch.uint8:
            b = b.clamp_min(0.0)
        y = sqrt_rn(b.abs() / s) * top
        q = torch.copysign(torch.round(y), b)
        q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))  # s == 0 (0/0) or not finite
        first = lo * BLOCK
        part = q.view(-1)[:n - first]
        out[first:first + part.numel()].copy_(part.to(codes.dtype))
        scales[lo:lo + ENCODE_ROWS].copy_(s.view(-1))


def quantize(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x``: codes of ``x``'s shape (uint8 if ``nonnegative`` else int8)."""
    codes = torch.empty(x.shape, dtype=code_dtype(nonnegative), device=x.device)
    scales = torch.empty(blocks(x.numel()), dtype=torch.float32, device=x.device)
    quantize_(x, codes, scales)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 values ``codes`` and ``scales`` hold (a new tensor of ``codes``' shape)."""
    top = _top(codes.dtype)
    q = _padded(codes.to(torch.float32))
    d = q.abs() / top
    x = torch.copysign(d * d, q) * scales.view(-1, 1)
    return x.view(-1)[:codes.numel()].view(codes.shape)


def check(name: str, codes, scales, shape) -> str | None:
    """Why ``(codes, scales)`` cannot be an 8-bit state of a param of ``shape`` (None: they can)."""
    if not isinstance(scales, torch.Tensor):
        return f"{scale_key(name)} is a {type(scales).__name__}, not a tensor"
    if codes.dtype not in (torch.int8, torch.uint8):
        return f"{name} has dtype {codes.dtype} beside {scale_key(name)}; 8-bit codes are int8 or uint8"
    if tuple(codes.shape) != tuple(shape):
        return f"{name} (8-bit codes) has shape {tuple(codes.shape)}, expected {tuple(shape)}"
    want = blocks(codes.numel())
    if scales.dtype != torch.float32 or tuple(scales.shape) != (want,):
        return (f"{scale_key(name)} is {scales.dtype} of shape {tuple(scales.shape)}, expected float32 of "
                f"shape ({want},) (one scale per {BLOCK} elements)")
    return None


def is_codes(t) -> bool:
    """Whether ``t`` is a tensor of 8-bit codes (int8 or uint8)."""
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8)
