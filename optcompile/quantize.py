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
scale comes from its new absmax, and the codes are the same.

**Sharded params (FSDP2, DTensor).** Blocks are per local shard: each rank encodes its own
shard (row-major, its last block partial) and no step communicates for the codes. Whether a
state is 8-bit is decided on the param's global size (every rank agrees). The codes are a
DTensor with the param's mesh, placements, shape and stride (``codes.to_local()`` is the shard's
codes); the scales are a DTensor with one row per shard: global shape ``(shards of each sharded
mesh dim..., blocks of the largest local shard)``, a ``Shard(i)`` placement for the i-th mesh dim
that shards the param and ``Replicate()`` for the others, each rank's local row its own shard's
scales, zero-padded past its blocks. So ``state_dict()`` holds DTensors only, which torch's
distributed checkpoint saves and loads per rank; the codes cannot be resharded to another world
size without decoding (``dequantize_state``: the values as a DTensor of the param's layout).
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
        a = b.abs()
        s = a.amax(dim=1, keepdim=True)
        if codes.dtype == torch.uint8:
            a = b.clamp_min(0.0)
        q = sqrt_rn(a.div_(s)).mul_(top).round_()
        if codes.dtype == torch.int8:
            q = torch.copysign(q, b, out=q)
        q = q.nan_to_num_(0.0, 0.0, 0.0)  # s == 0 (0/0) or not finite: code 0
        first = lo * BLOCK
        part = q.view(-1)[:n - first]
        out[first:first + part.numel()].copy_(part)
        scales[lo:lo + ENCODE_ROWS].copy_(s.view(-1))


def quantize(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x``: codes of ``x``'s shape (uint8 if ``nonnegative`` else int8)."""
    codes = torch.empty(x.shape, dtype=code_dtype(nonnegative), device=x.device)
    scales = torch.empty(blocks(x.numel()), dtype=torch.float32, device=x.device)
    quantize_(x, codes, scales)
    return codes, scales


DECODE_ELEMENTS = 1 << 16  # elements decoded at a time (the temporaries stay small and in cache)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 values ``codes`` and ``scales`` hold (a new tensor of ``codes``' shape)."""
    top = _top(codes.dtype)
    flat = codes.reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for lo in range(0, n, DECODE_ELEMENTS):
        hi = min(lo + DECODE_ELEMENTS, n)
        q = flat[lo:hi].to(torch.float32)
        d = q.abs().div_(top)
        x = d.mul_(d)
        if codes.dtype == torch.int8:
            x = x.copysign_(q)
        full = (hi - lo) // BLOCK * BLOCK  # DECODE_ELEMENTS is whole blocks: lo is a block's start
        b0 = lo // BLOCK
        torch.mul(x[:full].view(-1, BLOCK), scales[b0:b0 + full // BLOCK].view(-1, 1),
                  out=out[lo:lo + full].view(-1, BLOCK))
        if full < hi - lo:
            torch.mul(x[full:], scales[b0 + full // BLOCK], out=out[lo + full:hi])
    return out.view(codes.shape)


def check(name: str, codes, scales, shape) -> str | None:
    """Why ``(codes, scales)`` cannot be an 8-bit state of a param of ``shape`` (None: they can)."""
    if not isinstance(scales, torch.Tensor):
        return f"{scale_key(name)} is a {type(scales).__name__}, not a tensor"
    if codes.dtype not in (torch.int8, torch.uint8):
        return f"{name} has dtype {codes.dtype} beside {scale_key(name)}; 8-bit codes are int8 or uint8"
    if tuple(codes.shape) != tuple(shape):
        return f"{name} (8-bit codes) has shape {tuple(codes.shape)}, expected {tuple(shape)}"
    if is_dtensor(codes) != is_dtensor(scales):
        return (f"{name} and {scale_key(name)} must both be DTensors or both plain tensors (got "
                f"{type(codes).__name__} and {type(scales).__name__})")
    want = _scale_shape(codes) if is_dtensor(codes) else (blocks(codes.numel()),)
    if scales.dtype != torch.float32 or tuple(scales.shape) != want:
        return (f"{scale_key(name)} is {scales.dtype} of shape {tuple(scales.shape)}, expected float32 of "
                f"shape {want} (one scale per {BLOCK} elements{' of each local shard' if is_dtensor(codes) else ''})")
    return None


# ── sharded params (DTensor): blocks per local shard ────────────────────────────────────────────
def is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "to_local")


def _largest_local_numel(x) -> int:
    """The element count of ``x``'s largest local shard (torch.chunk's split: the first shards
    take ``ceil(size / shards)``), from its global shape and placements: no communication."""
    shape = list(x.shape)
    for dim, placement in enumerate(x.placements):
        if placement.is_shard():
            d = placement.dim
            shape[d] = -(-shape[d] // x.device_mesh.size(dim))
    n = 1
    for size in shape:
        n *= size
    return n


def _scale_layout(x):
    """The scales' placements for DTensor ``x`` (Shard(i) for the i-th mesh dim sharding it,
    Replicate elsewhere) and the local row's leading shape."""
    from torch.distributed.tensor import Replicate, Shard
    placements, k = [], 0
    for placement in x.placements:
        if placement.is_shard():
            placements.append(Shard(k))
            k += 1
        elif placement.is_replicate():
            placements.append(Replicate())
        else:
            raise NotImplementedError(f"state_precision='8bit' does not support a DTensor param with a "
                                      f"{placement} placement (only Shard and Replicate)")
    return placements, (1,) * k


def _scale_shape(codes) -> tuple[int, ...]:
    sharded = [codes.device_mesh.size(i) for i, pl in enumerate(codes.placements) if pl.is_shard()]
    return (*sharded, blocks(_largest_local_numel(codes)))


def quantize_state(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of a state; a DTensor's per local shard, as DTensors (the module docstring)."""
    if not is_dtensor(x):
        return quantize(x, nonnegative)
    from torch.distributed.tensor import DTensor
    codes, scales = quantize(x.to_local(), nonnegative)
    placements, lead = _scale_layout(x)
    row = torch.zeros(lead + (blocks(_largest_local_numel(x)),), dtype=torch.float32, device=scales.device)
    row.view(-1)[:scales.numel()].copy_(scales)
    mesh = x.device_mesh
    return (DTensor.from_local(codes, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()),
            DTensor.from_local(row, mesh, placements, run_check=False, shape=_scale_shape(x),
                               stride=torch.empty(_scale_shape(x), device="meta").stride()))


def local_scales(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The 1-D fp32 scales of the codes this process holds (a view: writes land in ``scales``):
    ``scales`` itself, or a DTensor's local row without its padding."""
    if not is_dtensor(scales):
        return scales
    return scales.to_local().view(-1)[:blocks(codes.to_local().numel() if is_dtensor(codes) else codes.numel())]


def dequantize_state(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize`; for DTensor codes a DTensor of their layout (each rank decodes its shard)."""
    if not is_dtensor(codes):
        return dequantize(codes, scales)
    from torch.distributed.tensor import DTensor
    values = dequantize(codes.to_local(), local_scales(codes, scales))
    return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                              stride=codes.stride())


def quantize_state_(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """:func:`quantize_` into a state's codes and scales (DTensors: each rank its local shard)."""
    local = x.to_local() if is_dtensor(x) else x
    quantize_(local, codes.to_local() if is_dtensor(codes) else codes, local_scales(codes, scales))


def is_codes(t) -> bool:
    """Whether ``t`` is a tensor of 8-bit codes (int8 or uint8)."""
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8)
