"""Stored precision of optimizer states and stochastic rounding, the parts every backend shares.

``state_precision`` says in which dtype each state is stored (math stays fp32); ``stochastic
rounding`` rounds a low-precision store up or down at random, with probability given by the
distance, so that updates far below an ulp still move a bf16 param on average.

The random bits are a counter-based hash, the same on every backend (torch int64 ops here, C
``uint32_t`` in the fused kernel, ``tl.uint32`` in Triton), of::

    step_key   = fmix32(fmix32(seed mod 2**32) ^ (step mod 2**32))             # host, per step
    tensor_key = fmix32(step_key ^ fmix32(index mod 2**32))                    # per tensor
    buffer_key = fmix32(tensor_key + (slot + 1) * 0x9E3779B9)                  # per stored buffer
    bits(e)    = fmix32(buffer_key + e * 0x9E3779B9)                           # per element

(all mod 2**32; ``fmix32`` is murmur3's finalizer). ``step`` is the step being taken (the group's
``step`` + 1, or the per-param step under gradient release; a spec without a step counts in the
group's ``sr_step``), ``index`` the param's position in the optimizer's parameter list (over all
groups, as ``state_dict`` numbers them; ``run_functional`` takes the indices it is given),
``slot`` the buffer's position in ``[param, grad, *states, kahan_comp]``, ``e`` the element's
row-major index in its tensor. So eager, foreach, fused and Triton draw the same bits, and a run
resumed from a state dict (which saves ``sr_seed`` and the step) continues bit for bit.

Rounding with bits ``r``: bf16 adds the low 16 bits of ``r`` to the fp32 bit pattern and truncates
(a carry rounds the magnitude up); fp16 adds the low 13 bits and truncates in the normal range, and
in the subnormal range (``|x| < 2**-14``) takes ``floor(|x|·2**24 + u)·2**-24`` with ``u = (r >> 8)·2**-24``.
NaN stays NaN and ±inf stays ±inf.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EIGHTBIT = "8bit"  # blockwise 8-bit states (optcompile/quantize.py); below its size threshold, fp32
GOLDEN = 0x9E3779B9
M32 = 0xFFFFFFFF


def state_precision_error(optimizer: str, value, states: tuple[str, ...]) -> str | None:
    """Why ``state_precision=value`` is invalid for an optimizer with these states (None: valid)."""
    choices = (*PRECISIONS, EIGHTBIT)
    valid = f"None, {', '.join(repr(k) for k in choices)} or a dict from state name to one of those"
    if value is None:
        return None
    if isinstance(value, str):
        if value not in choices:
            return f"{optimizer}: invalid state_precision={value!r}; expected {valid}"
        return _scale_clash(optimizer, [s for s in states] if value == EIGHTBIT else [], states)
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in states:
                return (f"{optimizer}: state_precision has an unknown state {k!r}; its states are "
                        f"{list(states) or 'none'} (kahan_comp follows the param's dtype)")
            if v is not None and v not in choices:
                return (f"{optimizer}: invalid state_precision[{k!r}]={v!r}; expected None or one of "
                        f"{list(choices)}")
        return _scale_clash(optimizer, [k for k, v in value.items() if v == EIGHTBIT], states)
    return f"{optimizer}: invalid state_precision={value!r} ({type(value).__name__}); expected {valid}"


def _scale_clash(optimizer: str, eightbit, states) -> str | None:
    """An 8-bit state keeps its block scales under ``name + "_scale"``, which must not be a state."""
    from .quantize import scale_key
    for name in eightbit:
        if scale_key(name) in states:
            return (f"{optimizer}: state_precision='8bit' for {name!r} keeps its block scales in "
                    f"state[{scale_key(name)!r}], which is another state of this optimizer; store {name!r} "
                    "in another precision")
    return None


def state_dtype(value, name: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype state ``name`` is stored in under ``state_precision=value`` (a valid one).
    fp64 params keep fp64 states (only float32/bf16/fp16 params take another precision); an
    ``"8bit"`` state that is not quantized (optcompile/quantize.py: a small tensor) is fp32."""
    if isinstance(value, dict):
        value = value.get(name)
    if value is None or param_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return param_dtype
    return torch.float32 if value == EIGHTBIT else PRECISIONS[value]


def fmix32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def step_key(seed: int, step: int) -> int:
    return fmix32(fmix32(seed & M32) ^ (step & M32))


def tensor_key(key: int, index: int) -> int:
    return fmix32(key ^ fmix32(index & M32))


def buffer_key(tkey: int, slot: int) -> int:
    return fmix32(tkey + (slot + 1) * GOLDEN)


@dataclass(frozen=True)
class StochasticRounding:
    """One step's random stream for a list of tensors: the step key, each tensor's param index and
    the offset of its first element in that param (a slice of a large CPU tensor starts past 0)."""

    key: int
    index: tuple[int, ...]
    offset: tuple[int, ...]

    def take(self, idx) -> "StochasticRounding":
        return StochasticRounding(self.key, tuple(self.index[i] for i in idx), tuple(self.offset[i] for i in idx))

    def tensor_keys(self) -> list[int]:
        return [tensor_key(self.key, i) for i in self.index]


# ── torch: the eager and foreach backends ─────────────────────────────────────────────────────
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for uint32 values held in int64, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def random_bits(shape, device, bkey: int, offset: int) -> torch.Tensor:
    """``bits(e)`` for the elements of a tensor of ``shape`` whose first element is ``offset``."""
    n = 1
    for s in shape:
        n *= s
    e = torch.arange(offset, offset + n, dtype=torch.int64, device=device) & M32
    return _fmix_t((_mul32(e, GOLDEN) + bkey) & M32).view(shape)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to ``dtype`` (bf16 or fp16) with random ``bits``; returns
    a tensor of ``dtype`` (the values are exact in it)."""
    x = x.float()
    u = x.view(torch.int32).to(torch.int64) & M32
    if dtype == torch.bfloat16:
        r = (u + (bits & 0xFFFF)) & 0xFFFF0000
        y = _as_float(r)
    else:
        r = (u + (bits & 0x1FFF)) & 0xFFFFE000
        normal = _as_float(r)
        sub = torch.floor(x.abs() * 16777216.0 + (bits >> 8).float() * (1.0 / 16777216.0)) * (1.0 / 16777216.0)
        y = torch.where(x.abs() < 2.0 ** -14, torch.copysign(sub, x), normal)
    y = torch.where(torch.isfinite(x), y, x)
    return y.to(dtype)


def _as_float(u: torch.Tensor) -> torch.Tensor:
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)


def sr_copy_(dst: torch.Tensor, src: torch.Tensor, sr: StochasticRounding, i: int, slot: int) -> None:
    """``dst.copy_(src)`` for tensor ``i`` of ``sr``'s list, rounded stochastically (dst bf16/fp16)."""
    bkey = buffer_key(tensor_key(sr.key, sr.index[i]), slot)
    dst.copy_(stochastic_round(src, dst.dtype, random_bits(src.shape, src.device, bkey, sr.offset[i])))


def sr_foreach_copy_(dsts, srcs, sr: StochasticRounding, slot: int) -> None:
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d is not None:
            sr_copy_(d, s, sr, i, slot)
