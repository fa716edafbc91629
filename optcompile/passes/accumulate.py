"""Optimizer accumulation (optimi's ``optimizer_accumulation``): on micro-steps the states are
updated but the parameters are not. Param writes and L2 decay get the runtime guard
``update_parameters``; so does anything after the first param write that reads the param (it
belongs to the update, e.g. Ranger's lookahead ``slow ← slow + α(p − slow)``: optimi runs it only
on updating steps). Whatever then only feeds guarded statements (StableAdamW's RMS reduction)
is guarded too, so accumulation micro-steps skip that work entirely."""
from __future__ import annotations

import dataclasses

import sympy
from sympy import And, Symbol

from ..ir import PARAM, TRUE, Assign, Program
from ..step_flags import UPDATE_PARAMETERS

UPDATE = Symbol(UPDATE_PARAMETERS)


def accumulate_only_states(prog: Program) -> Program:
    if any(UPDATE in sympy.sympify(s.guard).free_symbols for s in prog.body):
        return prog
    first = next((i for i, s in enumerate(prog.body) if isinstance(s, Assign) and s.target == "param"), len(prog.body))
    after_update = {PARAM}  # the updated param and values computed from it
    body = []
    for i, s in enumerate(prog.body):
        reads = sympy.sympify(s.expr).free_symbols
        if (isinstance(s, Assign) and (s.target == "param" or s.role == "decay_l2")) or (i > first and reads & after_update):
            if i > first and isinstance(s, Assign) and s.target not in prog.stored():
                after_update.add(s.symbol)
            s = dataclasses.replace(s, guard=_and(s.guard, UPDATE)) if UPDATE not in _conj(s.guard) else s
        body.append(s)
    # propagate backwards: a value whose every reader is guarded by update_parameters is guarded too
    for i in reversed(range(len(body))):
        s = body[i]
        if isinstance(s, Assign) and (s.target in prog.stored() or s.target == "grad"):
            continue
        readers = [r for r in body[i + 1:] if s.sym in sympy.sympify(r.expr).free_symbols]
        if readers and all(UPDATE in _conj(r.guard) for r in readers) and UPDATE not in _conj(s.guard):
            body[i] = dataclasses.replace(s, guard=_and(s.guard, UPDATE))
    return prog.replace(body=tuple(body))


def _and(a, b):
    return b if a == TRUE else And(a, b)


def _conj(g) -> set:
    return set(g.args) if isinstance(g, sympy.And) else {g}
