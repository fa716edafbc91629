"""Optimizer accumulation (optimi's ``optimizer_accumulation``): on micro-steps the states are
updated but the parameters are not. Param writes and L2 decay get the runtime guard
``update_parameters``; whatever then only feeds guarded statements (StableAdamW's RMS reduction)
is guarded too, so accumulation micro-steps skip that work entirely."""
from __future__ import annotations

import dataclasses

import sympy
from sympy import And, Symbol

from ..ir import TRUE, Assign, Program, Reduction, TensorScalar

UPDATE = Symbol("update_parameters")


def accumulate_only_states(prog: Program) -> Program:
    if any(UPDATE in sympy.sympify(s.guard).free_symbols for s in prog.body):
        return prog
    body = [dataclasses.replace(s, guard=_and(s.guard, UPDATE))
            if isinstance(s, Assign) and (s.target == "param" or s.role == "decay_l2") else s for s in prog.body]
    # propagate backwards: a value whose every reader is guarded by update_parameters is guarded too
    for i in reversed(range(len(body))):
        s = body[i]
        name = s.target if isinstance(s, Assign) else s.name
        if isinstance(s, Assign) and (s.target in prog.stored() or s.target == "grad"):
            continue
        readers = [r for r in body[i + 1:] if Symbol(name, real=True) in sympy.sympify(r.expr).free_symbols]
        if readers and all(UPDATE in _conj(r.guard) for r in readers) and UPDATE not in _conj(s.guard):
            body[i] = dataclasses.replace(s, guard=_and(s.guard, UPDATE))
    return prog.replace(body=tuple(body))


def _and(a, b):
    return b if a == TRUE else And(a, b)


def _conj(g) -> set:
    return set(g.args) if isinstance(g, sympy.And) else {g}
