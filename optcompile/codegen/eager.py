"""IR → the eager backend: a per-tensor loop of in-place torch ops (``_single_tensor_<name>``).

It is also the gradient-release path (one parameter at a time) and the reference the other
backends are tested against."""
from __future__ import annotations

import itertools

from ..ir import Program
from .tensor_code import Dialect, buffer_slot, emit_body


def context(prog: Program) -> dict:
    lines: list[str] = []
    written: list[str] = []
    tmp = itertools.count()
    stages = prog.stages()
    for i, stage in enumerate(stages):  # per tensor, a reduction is complete before the next stage
        body, w = emit_body(prog, Dialect(), stage, tmp, after=sum(stages[i + 1:], []))
        lines += body
        written += [x for x in w if x not in written]
    return {"name": f"_single_tensor_{prog.functional}", "body": lines, "writeback": [line for b in written for line in Dialect().writeback(b, buffer_slot(prog, b))],
            "uses_numel": prog.uses_numel(), "numel": Dialect().numel()}
