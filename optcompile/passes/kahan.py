"""Kahan-compensated parameter writes for bf16/fp16 params (optimi's ``kahan_sum``).

The exact (fp32) parameter is ``param + kahan_comp``. Every write ``param ← e`` becomes, when
``kahan`` is on (kahan_sum and a low-precision param), with ``e′`` = ``e`` computed from the exact param:

    kahan_upd  = e′ − param                    # the whole Δp, weight decay included, in fp32
    param_prev = param
    param      = param + kahan_upd             # stored: rounds to the param dtype
    kahan_comp = kahan_upd + (param_prev − param)   # what the rounding lost, carried to next step

For an update ``e = p − lr·d`` this is the classic ``comp + (−lr·d)``. Statements after a param write
that read the param (Ranger's lookahead ``slow ← slow + α(p − slow)``) read the exact param too, and
a later ``p ← slow`` keeps the unrounded value in ``kahan_comp``: the compensation follows every
param write, not only the update. ``kahan_upd`` stays a fp32 temporary (optimi's torch paths round
it to bf16 first).
"""
from __future__ import annotations

import dataclasses

import sympy
from sympy import And, Not, Symbol

from .. import step_flags
from ..ir import KAHAN_COMP, PARAM, TRUE, Assign, Origin, Program, StateBuffer

KAHAN = Symbol(step_flags.KAHAN)


def add_kahan_summation(prog: Program) -> Program:
    if any(s.name == "kahan_comp" for s in prog.states):
        return prog
    body = []
    n = 0
    exact = {PARAM: PARAM + KAHAN_COMP}  # the param as the fp32 math sees it
    written = False
    for s in prog.body:
        if not (isinstance(s, Assign) and s.target == "param"):
            if written and PARAM in sympy.sympify(s.expr).free_symbols:  # reads the updated param: twin
                body += [dataclasses.replace(s, guard=_and(s.guard, Not(KAHAN))),
                         dataclasses.replace(s, expr=sympy.sympify(s.expr).xreplace(exact), guard=_and(s.guard, KAHAN))]
            else:
                body.append(s)
            continue
        written = True
        body.append(dataclasses.replace(s, guard=_and(s.guard, Not(KAHAN))))
        g = _and(s.guard, KAHAN)
        upd = Symbol(prog.fresh_name(f"kahan_upd{n or ''}"), real=True)
        prev = Symbol(prog.fresh_name(f"param_prev{n or ''}"), real=True)
        n += 1
        body += [Assign(upd, sympy.sympify(s.expr).xreplace(exact) - PARAM, g, s.origin, "kahan"),
                 Assign(prev, PARAM, g, s.origin, "kahan"),
                 Assign(PARAM, PARAM + upd, g, s.origin, s.role or "kahan"),
                 Assign(KAHAN_COMP, upd + (prev - PARAM), g, s.origin, "kahan")]
    states = prog.states + (StateBuffer("kahan_comp", sympy.Integer(0), KAHAN, "param", Origin(added_by="kahan")),)
    return prog.replace(body=tuple(body), states=states)


def _and(a, b):
    return b if a == TRUE else And(a, b)
