"""Gradient ascent (torch.optim's ``maximize``), added to every spec.

With ``maximize=True`` the step reads ``−g`` wherever the spec reads the gradient: one statement
``grad ← −grad`` first in the body, before the L2 decay ``g + λp`` (torch negates first, then
decays), and in every state ``init`` that reads the gradient (SGD's ``torch_init`` buffer, Adan's
``prev_grad``), so a buffer that starts from the gradient starts from the ascent direction. The
flag is a keyword-only constructor argument defaulting to False; a spec that declares its own
``maximize`` keeps it (and its meaning) and gets nothing from this pass. Runs after the
weight-decay pass, so that the negation lands before the decay it inserted.

The negation is one unguarded ``grad ← s·grad`` with the host scalar ``s = ±1`` (exact), not
``if maximize: grad ← −grad``: the eager and foreach printers (codegen/tensor_code.py) count a
variable written under a guard as their own temporary after the guard too, and would then apply
the L2 decay in place to the user's ``p.grad`` when ``maximize`` is False.
"""
from __future__ import annotations

import dataclasses

import sympy
from sympy import Piecewise, Symbol

from ..ir import GRAD, TRUE, Arg, Assign, HostScalar, Origin, Program

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
    # one unguarded write, grad ← ±grad (exact): a guarded first write would leave the printers
    # taking the user's gradient for a temporary of their own (see the module docstring)
    sign = HostScalar(prog.fresh_name("grad_sign"), Piecewise((-1, MAXIMIZE), (1, True)), "float", ORIGIN)
    body = (Assign("grad", sign.sym * GRAD, TRUE, ORIGIN, role="maximize"),) + prog.body
    return prog.replace(args=prog.args + (arg,), host=prog.host + (sign,), body=body, states=states)
