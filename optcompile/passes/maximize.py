"""Gradient ascent (torch.optim's ``maximize``), added to every spec.

With ``maximize=True`` the step reads ``−g`` wherever the spec reads the gradient: one statement
``grad ← −grad`` first in the body, before the L2 decay ``g + λp`` (torch negates first, then
decays), and in every state ``init`` that reads the gradient (SGD's ``torch_init`` buffer, Adan's
``prev_grad``), so a buffer that starts from the gradient starts from the ascent direction. The
flag is a keyword-only constructor argument defaulting to False; a spec that declares its own
``maximize`` keeps it (and its meaning) and gets nothing from this pass. Runs after the
weight-decay pass, so that the negation lands before the decay it inserted.

The negation is ``if maximize: grad ← −grad``, so a minimizing step pays nothing for it. The
eager and foreach printers (codegen/tensor_code.py) own ``grad`` after it only where the guard
held: with ``maximize=False`` the L2 decay that follows builds a new tensor instead of adding
``λp`` in place into the caller's ``p.grad``.
"""
from __future__ import annotations

import dataclasses

import sympy
from sympy import Piecewise, Symbol

from ..ir import GRAD, Arg, Assign, Origin, Program

ORIGIN = Origin(added_by="maximize")
MAXIMIZE = Symbol("maximize")
MAXIMIZE_DOC = "maximize the objective with respect to the params, instead of minimizing"


def add_maximize(prog: Program) -> Program:
    if prog.arg("maximize") is not None:
        return prog
    arg = Arg("maximize", "flag", False, ("maximize",), doc=MAXIMIZE_DOC, injected_by="maximize", type="bool",
              keyword_only=True)
    ascent = Piecewise((-GRAD, MAXIMIZE), (GRAD, True))
    states = tuple(dataclasses.replace(s, init=sympy.sympify(s.init).xreplace({GRAD: ascent}))
                   if GRAD in sympy.sympify(s.init).free_symbols else s for s in prog.states)
    body = (Assign(GRAD, -GRAD, MAXIMIZE, ORIGIN, role="maximize"),) + prog.body
    return prog.replace(args=prog.args + (arg,), body=body, states=states)
