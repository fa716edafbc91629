"""What every printer of the IR shares: numbers, powers and named functions.

The host, torch, Triton and C printers derive from different sympy printers (Python or C), but
a spec's ``sqrt``, ``x**-0.5``, ``exp`` or ``2.5`` must mean the same on each. :class:`PrinterBase`
holds the one decision tree (which powers are square roots, products or reciprocals) and each
printer states only its spelling as data, in the style of sympy's ``known_functions``: a literal
format, the ``FUNCTIONS`` table and ``SQRT``/``RSQRT``, and hooks for products and general powers.
A function missing from a printer's table is an error naming the printer, never a silent
fallback to sympy's default spelling. Forms with semantics of their own (``Max``/``Min`` that
ignore NaN, ``Clamp``, ``Lerp``, ``sign``, ``Piecewise``) stay methods of each printer.
"""
from __future__ import annotations

import sympy

HALF = sympy.Rational(1, 2)


class PrinterBase:
    """Mixin, first in a printer's bases: ``class CPrinter(PrinterBase, C99CodePrinter)``."""

    FUNCTIONS: dict[str, str] = {}  # sympy function name → callee: ``{"exp": "tl.exp", "Abs": "tl.abs"}``
    SQRT = "sqrt"  # x**(1/2) prints as SQRT(x)
    RSQRT: str | None = None  # x**(-1/2) as RSQRT(x); None: the reciprocal of SQRT(x)
    PRODUCTS = 0  # x**n for 2 <= n <= PRODUCTS prints as the product x*x…

    # ── numbers ────────────────────────────────────────────────────────────────────────────────
    def literal(self, x: float) -> str:
        return repr(x)

    def _print_Float(self, expr):
        return self.literal(float(expr))

    def _print_Rational(self, expr):
        return self.literal(float(expr.p) / float(expr.q))

    def _print_Integer(self, expr):
        return self.literal(float(int(expr)))

    def _print_Half(self, expr):
        return self.literal(0.5)

    def _print_NumberSymbol(self, expr):
        return self.literal(float(expr))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    # ── powers ─────────────────────────────────────────────────────────────────────────────────
    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Float and float(exp) * 2 == int(float(exp) * 2):  # 0.5, 2.0: as the rationals
            exp = sympy.Rational(int(float(exp) * 2), 2)
        if exp == HALF:
            return f"{self.SQRT}({self._print(base)})"
        if exp == -HALF:
            return f"{self.RSQRT}({self._print(base)})" if self.RSQRT else \
                self.reciprocal_of(f"{self.SQRT}({self._print(base)})")
        if exp.is_Integer and 2 <= exp <= self.PRODUCTS:
            return self.product(base, int(exp))
        if exp.is_Integer and exp < 0:
            text = self.reciprocal(base, -int(exp))
            if text is not None:
                return text
        return self.power(base, exp)

    def reciprocal_of(self, text: str) -> str:
        """``1/text``, ``text`` a call."""
        return f"(1.0 / {text})"

    def product(self, base, n: int) -> str:
        raise NotImplementedError(f"{type(self).__name__} prints no products")

    def reciprocal(self, base, n: int) -> str | None:
        """``base**-n``, or None to print it as a general power."""
        return None

    def power(self, base, exp) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot print the power {base}**{exp}")

    # ── named functions ────────────────────────────────────────────────────────────────────────
    def _print_known(self, expr):
        name = type(expr).__name__
        fn = self.FUNCTIONS.get(name)
        if fn is None:
            raise NotImplementedError(f"{type(self).__name__} has no spelling for {name} ({expr})")
        return f"{fn}(" + ", ".join(self._print(a) for a in expr.args) + ")"

    _print_exp = _print_log = _print_Abs = _print_known
