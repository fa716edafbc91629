"""Host-side Python for per-step scalars (bias corrections, ρ_t, decay factors, branch flags).

Every backend computes its host scalars with this one printer, in one generated function per
spec, so eager, foreach, Triton and C see bit-identical scalars.
"""
from __future__ import annotations

import sympy
from sympy.printing.pycode import PythonCodePrinter

from ..ir import TRUE, HostScalar, Program
from ..step_flags import STEP_FLAGS
from .printing import PrinterBase


class HostPrinter(PrinterBase, PythonCodePrinter):
    """Python floats and bools; ``math`` for transcendental functions; conditions as ``and/or``.
    IEEE results where Python raises (``math.sqrt(-inf)``, ``1.0 / 0.0``, ``10.0**400``): NaN and ±inf
    like the kernels, from ``runtime.sqrt``/``rsqrt``/``reciprocal``/``log``/``power`` (identical to
    math's otherwise)."""

    FUNCTIONS = {"exp": "_exp", "log": "_log", "Abs": "abs"}
    SQRT, RSQRT = "_sqrt", "_rsqrt"

    def _print_Integer(self, expr):
        return str(int(expr))  # host math has ints: step % k

    def reciprocal(self, base, n: int) -> str | None:
        return f"_reciprocal({self._print(base)})" if n == 1 else None

    def power(self, base, exp) -> str:
        """``runtime.power`` (``_pow``): C's ``pow``, ±inf or NaN where Python's ``**`` raises."""
        return f"_pow({self._print(base)}, {self._print(exp)})"

    def _print_Max(self, expr):
        return self._nan_ignoring("max", expr)

    def _print_Min(self, expr):
        return self._nan_ignoring("min", expr)

    def _nan_ignoring(self, fn: str, expr) -> str:
        """The DSL's Max/Min drop NaN operands (C's fmax; Python's max(1, nan) is 1 but
        max(nan, 1) is nan): ``runtime.fmax``/``fmin``, imported by generated modules as ``_max``/``_min``."""
        return f"_{fn}(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Clamp(self, expr):
        """``runtime.clamp`` (``_clamp``): torch.clamp's NaN propagation; an infinite bound is None."""
        x, lo, hi = expr.args
        bounds = ["None" if b in (-sympy.oo, sympy.oo) else self._print(b) for b in (lo, hi)]
        return f"_clamp({self._print(x)}, {', '.join(bounds)})"

    def _print_Fp32(self, expr):
        """``runtime.round_fp32``: a scalar state's value as its fp32 tensor stores it."""
        return f"_round_fp32({self._print(expr.args[0])})"

    def _print_IsNone(self, expr):
        return f"({self._print(expr.args[0])} is None)"

    def _print_IsChoice(self, expr):
        return f"({self._print(expr.args[0])} == {expr.args[1].text!r})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(({x}) > 0) - (({x}) < 0)"

    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in sorted(expr.args, key=str)) + ")"

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in sorted(expr.args, key=str)) + ")"

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Mod(self, expr):
        a, b = expr.args
        return f"({self.parenthesize(a, 100)} % {self.parenthesize(b, 100)})"

    def _print_Piecewise(self, expr):
        out = []
        for value, cond in expr.args:
            if cond == TRUE:
                out.append(f"({self._print(value)})")
                break
            out.append(f"({self._print(value)}) if ({self._print(cond)}) else ")
        else:
            out.append("None")
        return "(" + "".join(out) + ")"


_PRINTER = HostPrinter({"fully_qualified_modules": True, "standard": "python3"})


def pyexpr(expr) -> str:
    """One host expression as Python source."""
    return _PRINTER.doprint(sympy.sympify(expr))


def host_lines(prog: Program) -> list[str]:
    """``name = expr`` for each host scalar, in dependency order, guarded where lowering said so."""
    lines = []
    for h in prog.host:
        value = pyexpr(h.expr)
        if h.guard != TRUE:
            zero = "False" if h.kind == "bool" else "0.0"
            value = f"{value} if {pyexpr(h.guard)} else {zero}"
        lines.append(f"{h.name} = {value}")
    return lines


def used_host_names(prog: Program) -> list[str]:
    """The host values the per-element and per-tensor code reads, sorted (the kernel interface)."""
    host = prog.host_names() | set(STEP_FLAGS)
    used = set()
    for s in prog.body:
        used |= {x.name for x in sympy.sympify(s.expr).free_symbols | sympy.sympify(s.guard).free_symbols}
    return sorted(used & host)


def host_of(prog: Program) -> dict[str, HostScalar]:
    return {h.name: h for h in prog.host}
