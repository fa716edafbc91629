"""Low-precision storage, fp32 compute: every backend loads bf16/fp16 params, grads and states
as fp32, computes in fp32 and rounds once per store (round-to-nearest-even). optimi's torch
paths compute in bf16 instead; its Triton kernels in fp32. This pass records the contract that
the backends implement (``compute_dtype``); the IR itself is dtype-free."""
from __future__ import annotations

from ..ir import Program


def compute_in_fp32(prog: Program) -> Program:
    if prog.meta.get("compute_dtype") == "float32":
        return prog
    return prog.replace(meta={**prog.meta, "compute_dtype": "float32"})
