"""Which states are never negative: they take an unsigned 8-bit code (optcompile/quantize.py).

A state is non-negative when its init and every value assigned to it are, assuming the states
being proved are (induction over steps: ``v ← β·v + (1-β)·g²`` keeps ``v ≥ 0`` if it was). An
element value is shown non-negative by its structure: numbers ≥ 0, even powers, ``Abs``, ``sqrt``
and powers of a non-negative base, ``exp``, sums and products of non-negative terms, ``Max``
with a non-negative operand, ``Min`` and ``Piecewise`` of non-negative operands, ``clamp`` with a
non-negative value or lower bound (and upper bound, if any), axis reductions of non-negative
values, ``numel``, the
step, hyperparameters whose domain is within ``[0, ∞)``, temps, host and per-tensor values
(reductions included) that are. A value of hyperparameters and the step only that the structure
cannot show (``1 - β̂₂(t)`` with the debiased ``β̂₂(t) = (β₂ᵗ - β₂)/(β₂ᵗ - 1)``) is evaluated, in 30-digit
arithmetic, at every combination of points of each hyperparameter's domain (its ends, points
near them and inside, the default) and steps 1 … 10⁶, flags both ways: non-negative at all of
them counts as non-negative. That is a test, not a proof, so a spec can always say what it knows:
``spec.state(name, nonnegative=True)`` (or ``False``) overrides the inference.
"""
from __future__ import annotations

import itertools
import math

import sympy

from .ir import STEP, Assign, AxisReduction, Clamp, Program, Reduction, TensorScalar

STEPS = (1, 2, 3, 10, 100, 10 ** 4, 10 ** 6)
MAX_POINTS = 4096  # combinations evaluated per value; past it a deterministic subset


def nonnegative_states(prog: Program, declared: dict[str, bool] | None = None) -> tuple[str, ...]:
    """The states of ``prog`` that are never negative (``declared``: the spec's overrides)."""
    declared = dict(declared or {})
    declared.update({s.name: s.nonnegative for s in prog.states if getattr(s, "nonnegative", None) is not None})
    candidates = {s.name for s in prog.states if declared.get(s.name, True) and s.name != "kahan_comp"}
    checker = _Checker(prog)
    while True:
        checker.reset(candidates | {n for n, v in declared.items() if v})
        failing = {s.name for s in prog.states if s.name in candidates and declared.get(s.name) is None
                   and not checker.state_ok(s)}
        if not failing:
            break
        candidates -= failing
    return tuple(s.name for s in prog.states if s.name in candidates)


class _Checker:
    def __init__(self, prog: Program):
        self.prog = prog
        self.domains: dict[str, sympy.Set | None] = {}
        self.defaults: dict[str, object] = {}
        self.flags: set[str] = set()
        for a in prog.args:
            doms = a.domain if isinstance(a.domain, tuple) else (a.domain,) * len(a.keys)
            defaults = a.default if isinstance(a.default, (tuple, list)) else (a.default,) * len(a.keys)
            for k, d, v in zip(a.keys, doms, defaults):
                if a.kind == "flag" or a.type == "bool":
                    self.flags.add(k)
                self.domains[k] = d
                self.defaults[k] = v
        self.host = {h.name: h for h in prog.host}
        self.host_defs = {h.sym: h.expr for h in prog.host}
        self.element_writes: dict[str, list] = {}
        for s in prog.body:
            if isinstance(s, Assign):
                self.element_writes.setdefault(s.target, []).append(s.expr)
        self.tensor = {s.name: s for s in prog.body if isinstance(s, (TensorScalar, Reduction))}
        self.reset(set())

    def reset(self, assumed: set[str]) -> None:
        self.assumed = assumed
        self.memo: dict[str, bool] = {}

    def state_ok(self, st) -> bool:
        return self.expr(st.init) and all(self.expr(e) for e in self.element_writes.get(st.name, ()))

    def name(self, n: str) -> bool:
        if n in self.memo:
            return self.memo[n]
        self.memo[n] = False  # a cycle through a temp proves nothing
        if n in self.assumed or n in ("numel", STEP.name):
            ok = True
        elif n in self.domains:
            d = self.domains[n]
            ok = n not in self.flags and d is not None and d.is_subset(sympy.Interval(0, sympy.oo))
        elif n in self.host:
            ok = self.expr(self.host[n].expr)
        elif n in self.tensor:
            s = self.tensor[n]
            ok = (s.op in ("sum", "mean", "max") if isinstance(s, Reduction) else True) and self.expr(s.expr)
        elif n in self.element_writes and n not in ("grad", "param") and n not in {x.name for x in self.prog.states}:
            ok = all(self.expr(e) for e in self.element_writes[n])
        else:
            ok = False
        self.memo[n] = ok
        return ok

    def expr(self, e) -> bool:
        e = sympy.sympify(e)
        return self._structure(e) or self._sampled(e)

    def _structure(self, e) -> bool:
        if e.is_Number:
            return bool(e >= 0)
        if e.is_Symbol:
            return self.name(e.name)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            return all(self.expr(a) for a in e.args)
        if isinstance(e, sympy.Pow):
            b, x = e.args
            return (x.is_Integer and int(x) % 2 == 0) or self.expr(b)
        if isinstance(e, (sympy.Abs, sympy.exp)):
            return True
        if isinstance(e, sympy.Max):
            return any(self.expr(a) for a in e.args)
        if isinstance(e, sympy.Min):
            return all(self.expr(a) for a in e.args)
        if isinstance(e, sympy.Piecewise):
            return all(self.expr(v) for v, _ in e.args)
        if isinstance(e, Clamp):  # min(max(x, lo), hi)
            x, lo, hi = e.args
            return (self.expr(x) or self.expr(lo)) and (hi == sympy.oo or self.expr(hi))
        if isinstance(e, AxisReduction):  # a sum, mean or max of non-negative values
            return self.expr(e.args[0])
        return False

    # ── host-only values: evaluated over the hyperparameters' domains ──────────────────────────
    def _sampled(self, e) -> bool:
        e = _expand(e, self.host_defs)
        names = sorted(s.name for s in e.free_symbols)
        if not names or any(n not in self.domains and n != STEP.name for n in names):
            return False
        axes = [STEPS if n == STEP.name else (False, True) if n in self.flags else
                _points(self.domains[n], self.defaults.get(n)) for n in names]
        if any(not a for a in axes):
            return False
        plain = e.xreplace({s: sympy.Symbol(s.name) for s in e.free_symbols})  # assumptions dropped
        f = sympy.lambdify([sympy.Symbol(n) for n in names], plain, modules="mpmath")
        import mpmath
        combos = list(itertools.islice(itertools.product(*axes), MAX_POINTS))
        seen = 0
        with mpmath.workdps(30):
            for combo in combos:
                try:
                    v = f(*[mpmath.mpf(x) if not isinstance(x, bool) else x for x in combo])
                except (ZeroDivisionError, ValueError, TypeError, OverflowError):
                    continue  # a point where the value is undefined (0/0): the step never reads it there
                if isinstance(v, mpmath.mpc) or not mpmath.isfinite(v):
                    continue
                seen += 1
                if v < 0:
                    return False
        return seen > 0


def _expand(e, defs: dict) -> sympy.Expr:
    for _ in range(len(defs) + 1):
        nxt = e.xreplace(defs)
        if nxt == e:
            return e
        e = nxt
    return e


def _points(domain, default) -> tuple:
    """Points of a hyperparameter's domain: its ends (where included), points near them, inside, the default."""
    if domain is None:
        return ()
    intervals = domain.args if isinstance(domain, sympy.Union) else (domain,)
    pts: list[float] = []
    for d in intervals:
        if isinstance(d, sympy.FiniteSet):
            pts += [float(x) for x in d]
            continue
        if not isinstance(d, sympy.Interval):
            return ()
        lo, hi = float(d.start), float(d.end)
        if math.isfinite(lo) and not d.left_open:
            pts.append(lo)
        if math.isfinite(hi) and not d.right_open:
            pts.append(hi)
        if math.isfinite(lo) and math.isfinite(hi):
            w = hi - lo
            pts += [lo + w * f for f in (1e-9, 1e-3, 0.1, 0.5, 0.9, 0.999, 1 - 1e-9)]
        elif math.isfinite(lo):
            pts += [lo + f for f in (1e-9, 1e-3, 0.5, 1.0, 10.0, 1e6)]
        elif math.isfinite(hi):
            pts += [hi - f for f in (1e-9, 1e-3, 0.5, 1.0, 10.0, 1e6)]
        else:
            pts += [-1e6, -1.0, -1e-3, 0.0, 1e-3, 1.0, 1e6]
    if isinstance(default, (int, float)) and not isinstance(default, bool) and domain.contains(default) == sympy.true:
        pts.append(float(default))
    return tuple(dict.fromkeys(pts))
