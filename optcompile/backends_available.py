"""Which backends can run here, probed once and cached (no Triton import unless asked)."""
from __future__ import annotations

import functools
import os
import shutil

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_on(device: torch.device) -> bool:
    """Triton runs natively on CUDA/ROCm/XPU devices with a working driver."""
    if device.type not in ("cuda", "xpu") or not triton_importable():
        return False
    try:
        from triton.runtime import driver
        driver.active.get_current_target()
    except Exception:
        return False
    return True


@functools.cache
def c_compiler() -> str | None:
    """The system C compiler used by the fused CPU backend ($CC, else cc/gcc/clang on PATH)."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def fused_cpu() -> bool:
    """The fused C kernel is the default for CPU params when a compiler is available."""
    if os.environ.get("OPTCOMPILE_DISABLE_FUSED") == "1":
        return False
    from . import loader
    if not loader.has_backend("fused"):
        return False
    if c_compiler() is None:
        _warn_no_compiler()
        return False
    return True


@functools.cache
def _warn_no_compiler() -> None:
    """Once per process: without a C compiler CPU steps use the (slower) Python backends."""
    import warnings
    warnings.warn("optcompile: no C compiler found ($CC, cc, gcc or clang), so CPU optimizer steps use the "
                  "eager backend instead of the fused C kernel; install gcc or set CC to enable it",
                  UserWarning, stacklevel=4)
