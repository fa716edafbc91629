"""The middle of the pipeline, in order. Each pass is ``Program -> Program`` and idempotent;
``verify`` runs after each one when ``OPTCOMPILE_VERIFY=1`` (always in the tests)."""
from __future__ import annotations

import os

from ..ir import Program
from ..verify import verify
from .accumulate import accumulate_only_states
from .finalize import finalize
from .kahan import add_kahan_summation
from .maximize import add_maximize
from .views import add_views
from .weight_decay import add_weight_decay

PIPELINE = (add_weight_decay, add_maximize, accumulate_only_states, add_views, add_kahan_summation, finalize)
PASS_NAMES = tuple(p.__name__ for p in PIPELINE)


def run_passes(prog: Program, until: str | None = None) -> Program:
    """Apply PIPELINE in order (stopping after ``until`` if given: one of ``PASS_NAMES``)."""
    if until is not None and until not in PASS_NAMES:
        raise ValueError(f"run_passes: until={until!r} is not a pass; the passes are {', '.join(PASS_NAMES)}")
    check = os.environ.get("OPTCOMPILE_VERIFY") == "1"
    for p in PIPELINE:
        prog = p(prog)
        if p.__name__ not in prog.passes:
            prog = prog.replace(passes=prog.passes + (p.__name__,))
        if check:
            verify(prog, after=p.__name__)
        if until and p.__name__ == until:
            break
    return prog
