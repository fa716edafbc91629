"""IR → the foreach backend: ``torch._foreach_*`` over the tensors of one (device, dtype) group
(``_foreach_<name>``). Reductions are per tensor (lists of floats), so stages run one after the
other over the whole list."""
from __future__ import annotations

import itertools

from ..ir import Program
from .tensor_code import ForeachDialect, buffer_slot, emit_body


def context(prog: Program) -> dict:
    lines: list[str] = []
    written: list[str] = []
    tmp = itertools.count()
    stages = prog.stages()
    for i, stage in enumerate(stages):
        body, w = emit_body(prog, ForeachDialect(), stage, tmp, after=sum(stages[i + 1:], []))
        lines += body
        written += [x for x in w if x not in written]
    return {"name": f"_foreach_{prog.functional}", "body": lines, "writeback": [line for b in written for line in ForeachDialect().writeback(b, buffer_slot(prog, b))],
            "uses_numel": prog.uses_numel(), "numel": ForeachDialect().numel()}
