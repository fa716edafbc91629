"""Kahan-compensated parameter writes for bf16/fp16 params (optimi's ``kahan_sum``).

Every write ``param ← e`` becomes, when ``kahan`` is on (kahan_sum and a low-precision param):

    kahan_upd  = kahan_comp + (e − param)      # the whole Δp, weight decay included, in fp32
    param_prev = param
    param      = param + kahan_upd             # stored: rounds to the param dtype
    kahan_comp = kahan_upd + (param_prev − param)   # what the rounding lost, carried to next step

``kahan_upd`` stays a fp32 temporary (optimi's torch paths round it to bf16 first). Applies to
every spec and to every param write, including Ranger's lookahead ``p ← slow``.
"""
from __future__ import annotations

import dataclasses

import sympy
from sympy import And, Not, Symbol

from ..ir import KAHAN_COMP, PARAM, TRUE, Assign, HostScalar, Program, StateBuffer

KAHAN = Symbol("kahan")


def add_kahan_summation(prog: Program) -> Program:
    if any(s.name == "kahan_comp" for s in prog.states):
        return prog
    body = []
    n = 0
    for s in prog.body:
        if not (isinstance(s, Assign) and s.target == "param"):
            body.append(s)
            continue
        body.append(dataclasses.replace(s, guard=_and(s.guard, Not(KAHAN))))
        g = _and(s.guard, KAHAN)
        upd, prev = Symbol(f"kahan_upd{n or ''}", real=True), Symbol(f"param_prev{n or ''}", real=True)
        n += 1
        body += [Assign(upd.name, KAHAN_COMP + (s.expr - PARAM), g, s.origin, "kahan"),
                 Assign(prev.name, PARAM, g, s.origin, "kahan"),
                 Assign("param", PARAM + upd, g, s.origin, s.role or "kahan"),
                 Assign("kahan_comp", upd + (prev - PARAM), g, s.origin, "kahan")]
    states = prog.states + (StateBuffer("kahan_comp", sympy.Integer(0), KAHAN, "param", "pass kahan"),)
    return prog.replace(body=tuple(body), states=states)


def _and(a, b):
    return b if a == TRUE else And(a, b)
