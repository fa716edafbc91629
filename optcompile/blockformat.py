"""The constants of the blockwise 8-bit state format (optcompile/quantize.py), without torch: the
kernel plan and the kernel printers read them (codegen stays importable without torch)."""
from __future__ import annotations

BLOCK = 256  # elements per fp32 block scale
SCALE_SUFFIX = "_scale"
SIGNED_TOP = 127  # int8 codes: -127..127
UNSIGNED_TOP = 255  # uint8 codes: 0..255


def scale_key(name: str) -> str:
    """The ``optimizer.state[p]`` key of state ``name``'s block scales (and the kernels' buffer)."""
    return name + SCALE_SUFFIX
