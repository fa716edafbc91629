"""How a statement is grouped into operations, decided once for every backend.

The torch backends spell a statement as in-place ops (``lerp_``, ``mul_`` then ``add_`` …); for
finite values the grouping only moves the last bit, but with ±inf it decides between inf and NaN
(``lerp(m, inf, 1)`` is NaN where ``0·m + 1·inf`` is inf; ``p·(1 − 0)`` keeps an infinite param
where ``p − 0·p`` is NaN). So the eager/foreach code (tensor_code.py) and the kernels (Triton, C)
both ask this module which statements are interpolations and how a linear update of a buffer is
grouped, and print that form (README, "Semantics worth knowing"):

* an interpolation ``a·x + b·y`` (tensors ``x``, ``y``; host weights with ``a + b = 1``) is
  :class:`Lerp`, torch.lerp's formula;
* an in-place linear update ``x ← c·(a·x + Σ cᵢ·fᵢ)`` multiplies ``x`` by ``a`` first, then adds
  the terms, then multiplies by ``c`` (weight decay ``p·(1 − lr·wd)`` is a product); ``a`` sums
  every scalar multiple of ``x``, also inside a scaled sum (``p − η·(g + λ·p)`` is
  ``p·(1 − η·λ) − η·g``).
"""
from __future__ import annotations

import sympy

from ..step_flags import STEP_FLAGS


class Lerp(sympy.Function):
    """``Lerp(start, end, weight)`` as torch.lerp computes it (weight a host scalar):
    ``start + weight·(end − start)`` if ``|weight| < 0.5``, else ``end − (end − start)·(1 − weight)``.
    Not a DSL function: the printers mark interpolations with it."""

    nargs = 3


class Forms:
    """The grouping rules over one program's names: host values, per-tensor scalars, host lets."""

    def __init__(self, prog):
        self.host = prog.host_names() | set(STEP_FLAGS)
        self.tensor_scalars = prog.tensor_scalar_names()
        self.host_defs = {h.name: h for h in prog.host}

    def is_scalar(self, e) -> bool:
        return {s.name for s in sympy.sympify(e).free_symbols} <= self.host | self.tensor_scalars

    def is_host(self, e) -> bool:
        return {s.name for s in sympy.sympify(e).free_symbols} <= self.host

    def host_value(self, e):
        """Substitute host definitions back, to recognise ``a`` and ``1 - a`` as a lerp pair."""
        e = sympy.sympify(e)
        for _ in range(8):
            sub = {sympy.Symbol(n, real=True): self.host_defs[n].expr for n in
                   {s.name for s in e.free_symbols} if n in self.host_defs and self.host_defs[n].kind == "float"}
            if not sub:
                break
            e = e.xreplace(sub)
        return e

    def split_scalar(self, term):
        """``term = c · t`` with ``c`` scalar (host or per-tensor) and ``t`` the tensor part."""
        if isinstance(term, sympy.Mul):
            c = [f for f in term.args if self.is_scalar(f)]
            t = [f for f in term.args if not self.is_scalar(f)]
            return sympy.Mul(*c), sympy.Mul(*t)
        if self.is_scalar(term):
            return term, sympy.Integer(1)
        return sympy.Integer(1), term

    def is_weight_pair(self, a, b) -> bool:
        """Host weights that sum to 1 (after substituting host lets): an interpolation's."""
        return self.is_host(a) and self.is_host(b) and sympy.expand(self.host_value(a) + self.host_value(b)) == 1

    def lerp_pair(self, terms):
        """``a·x + b·y`` with host ``a + b == 1`` and tensors ``x``, ``y``: (x, y, b) for lerp(x, y, b).

        The end point is the term whose weight is written ``1 − …`` (torch's ``lerp(m, g, 1 − β)``)."""
        if len(terms) != 2 or not all(self.is_host(c) and isinstance(t, sympy.Symbol) for c, t in terms):
            return None
        (a, x), (b, y) = terms
        if not self.is_weight_pair(a, b):
            return None
        if isinstance(self.host_value(a), sympy.Add) and not isinstance(self.host_value(b), sympy.Add):
            (a, x), (b, y) = (b, y), (a, x)
        return x, y, b

    def linear_parts(self, x: sympy.Symbol, e):
        """``x ← outer·(a·x + Σ cᵢ·tᵢ)``: (outer, a, [(cᵢ, tᵢ)]), or None if ``e`` is not of that form
        (``a == 0``). A scalar times a sum without ``x`` contributes one term per summand."""
        outer = sympy.Integer(1)
        if isinstance(e, sympy.Mul):
            scal = [f for f in e.args if self.is_scalar(f)]
            rest = [f for f in e.args if not self.is_scalar(f)]
            if len(rest) == 1 and isinstance(rest[0], sympy.Add):
                outer, e = sympy.Mul(*scal), rest[0]
        a, others = sympy.Integer(0), []
        for term in sympy.Add.make_args(e):
            c, t = self.split_scalar(term)
            if t == x:
                a += c
            elif isinstance(t, sympy.Add) and self._distributes(x, t):
                # c·(t₁ + t₂): one accumulate per term, e.g. Adan's two addcdivs into the param, and
                # c·(t₁ + k·x) adds c·k to x's factor (ASGD's p − η(g + λp) is p·(1 − ηλ) − η·g)
                for ci, ti in map(self.split_scalar, sympy.Add.make_args(t)):
                    if ti == x:
                        a += c * ci
                    else:
                        others.append((c * ci, ti))
            else:
                others.append((c, t))
        if a == 0:
            return None
        return outer, a, others

    def _distributes(self, x: sympy.Symbol, t: sympy.Add) -> bool:
        """Whether ``x`` occurs in the sum ``t`` only as scalar multiples ``k·x``."""
        return all(x not in term.free_symbols or self.split_scalar(term)[1] == x for term in sympy.Add.make_args(t))

    def in_place_lerp(self, x: sympy.Symbol, parts):
        """``x ← a·x + c·t`` with host ``a + c == 1`` and a tensor ``t`` (a name, an axis reduction,
        or a value that reads ``x`` and is therefore built first): ``x.lerp_(t, c)``'s (t, c)."""
        from ..ir import AxisReduction
        outer, a, others = parts
        if len(others) == 1 and outer == 1:
            c, t = others[0]
            if (isinstance(t, (sympy.Symbol, AxisReduction)) or x in t.free_symbols) and self.is_weight_pair(a, c):
                return t, c
        return None

    # ── the kernels' view: one expression with the grouping made explicit ──────────────────────
    def lerps(self, e):
        """``e`` with every interpolation subexpression written as :class:`Lerp`."""
        e = sympy.sympify(e)
        if not e.args or e.is_Number:
            return e
        if isinstance(e, sympy.Add):
            pair = self.lerp_pair([self.split_scalar(t) for t in sympy.Add.make_args(e)])
            if pair is not None:
                return Lerp(*pair)
        return e.func(*[self.lerps(a) for a in e.args])

    def statement(self, x: sympy.Symbol, e, in_place: bool):
        """The value of ``x ← e`` grouped as the torch backends evaluate it. ``in_place``: ``x`` is a
        buffer (or a temp already holding a value) that the torch code updates in place, so a
        linear update keeps its ``a·x`` product and an interpolation is ``x.lerp_``."""
        e = sympy.sympify(e)
        if not in_place or x not in e.free_symbols:
            return self.lerps(e)
        parts = self.linear_parts(x, e)
        if parts is None:
            return self.lerps(e)
        lerp = self.in_place_lerp(x, parts)
        if lerp is not None:
            t, c = lerp
            return Lerp(x, self.lerps(t), c)
        outer, a, others = parts
        body = sympy.Add(x * a, *[c * self.lerps(t) for c, t in others])
        return body if outer == 1 else outer * body

    def body(self, prog, stages=None) -> dict[int, sympy.Expr]:
        """Every statement's value as the torch backends group it, keyed by ``id(stmt)``. A temp is
        updated in place once it holds a value of its own (emit_body's ``owned``, per stage;
        ``stages``: the kernel plan's, where they are not ``prog.stages()``)."""
        from ..ir import Assign
        stored = set(prog.stored())
        out: dict[int, sympy.Expr] = {}
        for stage in prog.stages() if stages is None else stages:
            owned: set[str] = set()
            for s in stage:
                if not isinstance(s, Assign):
                    out[id(s)] = self.lerps(s.expr)
                    continue
                e = sympy.sympify(s.expr)
                out[id(s)] = self.statement(s.symbol, e, s.target in stored or s.target in owned)
                if isinstance(e, sympy.Symbol) and not self.is_scalar(e):
                    owned.discard(s.target)  # an alias (or a copy into a buffer)
                else:
                    owned.add(s.target)
        return out
