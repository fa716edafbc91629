"""Parameter views (``spec.eval_view``): the same step function, called with a view switch on,
writes one view of the params instead of stepping.

Every statement of the step gets the guard ``not view_eval and not view_train``; then come
``if view_eval: param ← eval`` and ``if view_train: param ← train``, elementwise from the param
and the states as stored. They are ordinary param writes, so every backend prints them like the
step (host guards: a Python ``if``, a Triton ``tl.constexpr``, a C variant) and the Kahan pass,
which runs next, compensates them: a bf16 param swaps views from its exact value
``param + kahan_comp`` and keeps what the rounding lost. Runs after the accumulation pass, so a
view write is not guarded by ``update_parameters`` (swapping views is not an update).
"""
from __future__ import annotations

import dataclasses

from sympy import And, Not, Symbol

from ..ir import PARAM, TRUE, Assign, Origin, Program
from ..step_flags import VIEW_EVAL, VIEW_TRAIN

EVAL, TRAIN = Symbol(VIEW_EVAL), Symbol(VIEW_TRAIN)
ORIGIN = Origin(added_by="views")


def add_views(prog: Program) -> Program:
    if not prog.views or any(EVAL in getattr(s.guard, "free_symbols", ()) for s in prog.body):
        return prog
    stepping = And(Not(EVAL), Not(TRAIN))
    body = [dataclasses.replace(s, guard=stepping if s.guard == TRUE else And(s.guard, stepping)) for s in prog.body]
    flag = {"eval": EVAL, "train": TRAIN}
    body += [Assign(PARAM, expr, flag[name], ORIGIN, role="view") for name, expr in prog.views]
    return prog.replace(body=tuple(body))
