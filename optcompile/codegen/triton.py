"""IR → multi-tensor Triton kernels (``<spec>_triton.py``): one ``@triton.jit`` kernel per stage,
launched once per stage over every tensor of a (device, dtype) group.

``TritonPrinter`` holds the math (STYLE §5); ``templates/triton.py.j2`` holds the structure. What
this module decides per stage kernel:

* which buffers to load (guarded like the statements that read them: an absent state is never
  touched) and which to store (once, at the end, guarded by its writes);
* that every write to a stored buffer is followed by ``_rounded``: later reads see the value
  rounded to the buffer's dtype (Kahan measures the real rounding error), and the final store's
  cast is exact;
* which temps, ``grad`` reassignments and tensor scalars of earlier stages must be recomputed
  (a stage kernel only sees memory), and rejecting the ones that cannot be;
* the reductions: per-program partials in the stage kernel, one deterministic per-tensor
  finalize kernel (``_<fn>_reduce<k>``), totals loaded by the next stage.

Host floats are fp32 kernel arguments; host bools (flags, ``kahan``, ``update_parameters``,
branch conditions) are ``tl.constexpr``, so untaken branches compile away. A program the kernels
cannot express (a value that cannot be recomputed across a stage, an unprintable function) still
renders: a stub module whose launcher raises why, so the other backends keep working.
"""
from __future__ import annotations

import dataclasses
import os

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from ..ir import TRUE, Assign, Clamp, Origin, Program, Reduction, TensorScalar
from .forms import Forms, Lerp

_ALLOWED = (sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.Abs,
            sympy.sign, sympy.exp, sympy.log, sympy.Piecewise, sympy.logic.boolalg.Boolean,
            sympy.core.relational.Relational, sympy.NumberSymbol, sympy.core.numbers.Infinity,
            sympy.core.numbers.NegativeInfinity, sympy.functions.elementary.piecewise.ExprCondPair, Lerp, Clamp)


class TritonPrinter(PythonCodePrinter):
    """Python syntax, Triton semantics: ``tl.*`` functions, float literals, fp32 everywhere.

    ``constexpr`` names the host booleans: conditions over them print as Python ``and/or/not``
    and ``x if c else y`` (resolved at compile time); any other condition is a runtime value and
    prints with ``&``/``|``/``~`` and ``tl.where``.
    """

    def __init__(self, constexpr=(), tensors=(), settings=None):
        super().__init__({"standard": "python3", **(settings or {})})
        self.constexpr = set(constexpr)
        self.tensors = set(tensors)

    def doprint(self, expr, assign_to=None):
        expr = sympy.sympify(expr)
        for node in sympy.preorder_traversal(expr):
            if isinstance(node, sympy.Mod) or not isinstance(node, _ALLOWED):
                raise NotImplementedError(f"the Triton backend cannot print {type(node).__name__} ({node}) "
                                          f"in {expr}")
        return super().doprint(expr, assign_to)

    # ── numbers: always float literals, so no integer arithmetic (no // or %) reaches a kernel ──
    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr.p) / float(expr.q))

    def _print_Half(self, expr):
        return "0.5"

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return '-float("inf")'

    def _print_NumberSymbol(self, expr):
        return repr(float(expr))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # ── arithmetic ─────────────────────────────────────────────────────────────────────────────
    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Float and float(exp) * 2 == int(float(exp) * 2):  # 0.5, 2.0: as the rationals
            exp = sympy.Rational(int(float(exp) * 2), 2)
        b = self.parenthesize(base, PRECEDENCE["Atom"], strict=False) if not base.is_Atom else self._print(base)
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"tl.rsqrt({self._print(base)})"
        if exp.is_Integer and 1 < exp <= 4:
            return " * ".join([b] * int(exp))
        if exp.is_Integer and exp < 0:
            return f"1.0/{self._denominator(sympy.Pow(base, -exp))}"
        return f"libdevice.pow({self._print(base)}, {self._print(exp)})"

    def _denominator(self, d) -> str:
        """One divisor: bare if it is a name or a call, else parenthesised (``x * x`` included)."""
        text = self._print(d)
        if d.is_Symbol or d.is_Number or (d.is_Pow and d.exp in (sympy.Rational(1, 2), -sympy.Rational(1, 2))) \
                or isinstance(d, (sympy.Max, sympy.Min, sympy.Abs, sympy.exp, sympy.log, sympy.Function)) \
                and not isinstance(d, sympy.sign):
            return text
        return f"({text})"

    def _print_Mul(self, expr):
        coeff, rest = expr.as_coeff_Mul()
        sign = ""
        if coeff < 0:
            sign, coeff = "-", -coeff
        num, den = [], []
        for f in sympy.Mul.make_args(rest) if rest != 1 else ():
            if f.is_Pow and f.exp.is_Rational and f.exp.is_negative and f.exp != -sympy.Rational(1, 2):
                den.append(sympy.Pow(f.base, -f.exp) if f.exp != -1 else f.base)
            else:
                num.append(f)
        num = sorted(num, key=sympy.default_sort_key)
        den = sorted(den, key=sympy.default_sort_key)
        parts = ([self._print(coeff)] if coeff != 1 or not num else []) + \
                [self.parenthesize(f, PRECEDENCE["Mul"], strict=False) for f in num]
        text = "*".join(parts)
        if len(den) == 1:
            text += "/" + self._denominator(den[0])
        elif den:
            text += "/(" + "*".join(self.parenthesize(d, PRECEDENCE["Mul"], strict=False) for d in den) + ")"
        return sign + text

    def _print_Add(self, expr, order=None):
        """Left to right in the IR's term order, starting from a bare tensor, scalars last: the
        order the eager backend's in-place ops use, so the two round alike."""
        terms = list(sympy.Add.make_args(expr))
        is_tensor = lambda t: bool({s.name for s in t.free_symbols} & self.tensors)  # noqa: E731
        start = next((i for i, t in enumerate(terms) if t.is_Symbol and t.name in self.tensors), None)
        if start is not None:
            terms.insert(0, terms.pop(start))
        terms = [t for t in terms if is_tensor(t)] + [t for t in terms if not is_tensor(t)]
        out = self._print(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + self.parenthesize(-t, PRECEDENCE["Add"], strict=True)
            else:
                out += " + " + self.parenthesize(t, PRECEDENCE["Add"], strict=False)
        return out

    def _print_Max(self, expr):
        return self._fold("tl.maximum", expr.args)

    def _print_Min(self, expr):
        return self._fold("tl.minimum", expr.args)

    def _fold(self, fn, args) -> str:
        """Binary ``tl.maximum``: the DSL's Max ignores a NaN operand (IEEE maxNum, C's fmax)."""
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)}, propagate_nan=tl.PropagateNan.NONE)"
        return out

    def _print_Clamp(self, expr):
        """torch.clamp: ``min(max(x, lo), hi)`` with NaN propagating from every operand (an open side,
        ``±oo``, is left out)."""
        x, lo, hi = expr.args
        out = self._print(x)
        for fn, b in (("tl.maximum", lo), ("tl.minimum", hi)):
            if b not in (-sympy.oo, sympy.oo):
                out = f"{fn}({out}, {self._print(b)}, propagate_nan=tl.PropagateNan.ALL)"
        return out

    def _print_Lerp(self, expr):
        return "_lerp(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Abs(self, expr):
        return f"tl.abs({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))"

    def _print_exp(self, expr):
        return f"tl.exp({self._print(expr.args[0])})"

    def _print_log(self, expr):
        return f"tl.log({self._print(expr.args[0])})"

    # ── conditions ─────────────────────────────────────────────────────────────────────────────
    def is_static(self, cond) -> bool:
        """A condition over host booleans only: a compile-time constant in the kernel."""
        return {s.name for s in sympy.sympify(cond).free_symbols} <= self.constexpr

    def _print_Piecewise(self, expr):
        (value, cond), rest = expr.args[0], expr.args[1:]
        if cond == TRUE:
            return self._print(value)
        other = sympy.Piecewise(*rest) if rest else sympy.nan
        other_text = 'float("nan")' if other is sympy.nan else self._print(other)
        if self.is_static(cond):
            return f"({self._print(value)} if {self._print(cond)} else {other_text})"
        return f"tl.where({self._print(cond)}, {self._print(value)}, {other_text})"

    def _logic(self, expr, static_op: str, tensor_op: str) -> str:
        args = sorted(expr.args, key=str)
        if self.is_static(expr):
            return "(" + f" {static_op} ".join(self._print(a) for a in args) + ")"
        return "(" + f" {tensor_op} ".join(self._print(a) for a in args) + ")"

    def _print_And(self, expr):
        return self._logic(expr, "and", "&")

    def _print_Or(self, expr):
        return self._logic(expr, "or", "|")

    def _print_Not(self, expr):
        x = self._print(expr.args[0])
        return f"(not {x})" if self.is_static(expr) else f"~({x})"

    def _print_Relational(self, expr):
        ops = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
        return f"({self._print(expr.lhs)} {ops[expr.rel_op]} {self._print(expr.rhs)})"


def guard_text(guard, printer: TritonPrinter) -> str:
    """A host guard as a compile-time Python condition (``kahan and not update_parameters``)."""
    if not printer.is_static(guard):
        bad = sorted({s.name for s in sympy.sympify(guard).free_symbols} - printer.constexpr)
        raise NotImplementedError(f"guard {guard} reads non-boolean host values {bad}; lowering should have "
                                  "made it a host bool")
    guard = sympy.sympify(guard)
    if isinstance(guard, (sympy.And, sympy.Or)):  # the outermost operator needs no parentheses
        op = " and " if isinstance(guard, sympy.And) else " or "
        return op.join(printer.doprint(a) for a in sorted(guard.args, key=str))
    if isinstance(guard, sympy.Not):
        return f"not {printer.doprint(guard.args[0])}"
    return printer.doprint(guard)


def _any(guards) -> sympy.Basic:
    """The Or of guards, simplified (``a & b | a & ~b`` → ``a``)."""
    g = sympy.Or(*guards)
    if g in (sympy.true, sympy.false) or len(g.free_symbols) > 8:
        return g
    return sympy.simplify_logic(g, form="dnf")


def _by_guard(items: list[dict]) -> list[dict]:
    """Buffers grouped under one ``if`` per guard, in first-use order (None: unguarded)."""
    out: dict = {}
    for x in items:
        out.setdefault(x["guard"], []).append(x["name"])
    return [{"guard": g, "names": names} for g, names in out.items()]


def _condition_names(e) -> set[str]:
    """Names read inside conditions (Piecewise conditions, relations, and/or/not) of ``e``."""
    out: set[str] = set()
    for node in sympy.preorder_traversal(sympy.sympify(e)):
        if isinstance(node, sympy.Piecewise):
            out |= set().union(*[_names(c) for _, c in node.args])
        elif isinstance(node, (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.Not)):
            out |= _names(node)
    return out


def _names(e) -> set[str]:
    return {s.name for s in sympy.sympify(e).free_symbols}


def _shown(o: Origin) -> Origin:
    """``specs/adamw.py:22``; never an absolute path (generated text must not depend on the host)."""
    if o.file and os.path.isabs(o.file):
        from .render import spec_display_path
        return dataclasses.replace(o, file=spec_display_path(o.file))
    return o


def _origin(stmt) -> str:
    return str(_shown(stmt.origin))


class StageError(ValueError):
    """A value cannot cross a stage boundary (a kernel boundary in Triton)."""


class KernelBuilder:
    """The template context of each stage kernel and reduce kernel of one program."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.fn = prog.functional
        self.stored = list(prog.stored())
        self.buffers = ["param", "grad"] + [s.name for s in prog.states]
        from .host import used_host_names
        self.host_used = used_host_names(prog)
        flags = {k for a in prog.args if a.kind == "flag" for k in a.keys}
        bools = {h.name for h in prog.host if h.kind == "bool"} | flags | {"update_parameters", "kahan"}
        # a "bool" host value that only ever appears in arithmetic is a number (e.g. a let that
        # aliases a float hyperparameter): pass it as a scalar, not a compile-time flag
        conditions = set().union(*[_names(s.guard) | _condition_names(s.expr) for s in prog.body])
        arithmetic = set().union(*[_names(s.expr) for s in prog.body]) - conditions
        bools -= {n for n in arithmetic if n not in flags and n not in ("update_parameters", "kahan")}
        self.flags = [n for n in self.host_used if n in bools]
        self.scalars = [n for n in self.host_used if n not in bools]
        self.printer = TritonPrinter(constexpr=self.flags, tensors=set(self.buffers) | self._temps())
        self.forms = Forms(prog).body(prog)  # lerps and in-place products, as the torch backends group them
        self.stages = prog.stages()
        self.reductions = [s for st in self.stages for s in st if isinstance(s, Reduction)]
        self.n_reductions = len(self.reductions)
        if len(self.stages) > 1:
            self.kernel_names = [f"_{self.fn}_stage{k}_kernel" for k in range(len(self.stages))]
        else:
            self.kernel_names = [f"_{self.fn}_kernel"]

    # ── dataflow ───────────────────────────────────────────────────────────────────────────────
    def replay(self, k: int) -> list:
        """Statements of earlier stages that stage ``k`` must recompute: temps, ``grad``
        reassignments and tensor scalars it reads (a kernel boundary keeps only memory)."""
        earlier = [s for st in self.stages[:k] for s in st]
        start = len(earlier)
        needed = set().union(*[_names(s.expr) for s in self.stages[k]]) if self.stages[k] else set()
        chosen = []
        for i in reversed(range(start)):
            s = earlier[i]
            name = s.target if isinstance(s, Assign) else s.name
            if name not in needed or isinstance(s, Reduction) or name in self.stored:
                continue
            chosen.append(s)
            if s.guard == TRUE:
                needed.discard(name)
            needed |= _names(s.expr)
            for buf in _names(s.expr) & set(self.stored):
                later = [w for w in earlier[i + 1:] if isinstance(w, Assign) and w.target == buf]
                if later:
                    raise StageError(
                        f"{self.prog.name}: `{name}` ({_origin(s)}) is computed in stage {self._stage_of(s)} from "
                        f"`{buf}`, which is written again before stage {k} reads `{name}`; the Triton backend "
                        f"recomputes values across a reduction from memory, so make `{name}` a state or compute it "
                        "after the reduction")
        return list(reversed(chosen))

    def _stage_of(self, stmt) -> int:
        return next(i for i, st in enumerate(self.stages) if any(s is stmt for s in st))

    # ── one stage kernel ───────────────────────────────────────────────────────────────────────
    def stage(self, k: int) -> dict:
        replayed = self.replay(k)
        stmts = replayed + list(self.stages[k])
        earlier_reductions = [r for st in self.stages[:k] for r in st if isinstance(r, Reduction)]
        used = set().union(*[_names(s.expr) | _names(s.guard) for s in stmts]) if stmts else set()

        loads, stores = [], []
        memory_guards = []  # the host conditions of the loads and stores, whose flags the kernel takes
        for buf in self.buffers:
            readers = [s for s in stmts if buf in _names(s.expr)]
            writers = [s for s in self.stages[k] if isinstance(s, Assign) and s.target == buf]
            for group, out in ((readers, loads), (writers if buf in self.stored else [], stores)):
                if group:
                    guard = _any([s.guard for s in group])
                    memory_guards.append(guard)
                    out.append({"name": buf, "guard": self._guard(guard)})
        pointers = [b for b in self.buffers if b in {x["name"] for x in loads + stores}]
        loads, stores = _by_guard(loads), _by_guard(stores)

        body: list[dict] = []  # {"guard": text|None, "lines": [...], "origin": str}
        for s in stmts:
            lines = self.statement(s)
            g = self._guard(s.guard)
            if body and body[-1]["guard"] == g:
                body[-1]["lines"] += lines
            else:
                body.append({"guard": g, "lines": lines})

        totals = [r.name for r in earlier_reductions if r.name in used]
        partials = [r.name for r in self.stages[k] if isinstance(r, Reduction)]
        guard_names = set().union(*[_names(g) for g in memory_guards]) if memory_guards else set()
        flags = [f for f in self.flags if f in used or f in guard_names]
        scalars = [n for n in self.scalars if n in used]
        return {
            "name": self.kernel_names[k],
            "stage": k,
            "pointers": pointers,
            "loads": loads,
            "stores": stores,
            "body": body,
            "totals": totals,
            "partials": partials,
            "scalars": scalars,
            "flags": flags,
            "uses_numel": "numel" in used,
            "replayed": [s.target if isinstance(s, Assign) else s.name for s in replayed],
            "origins": [str(o) for o in sorted({_shown(s.origin) for s in self.stages[k] if s.origin},
                                               key=Origin.sort_key)],
        }

    def _guard(self, guard) -> str | None:
        return None if guard == TRUE else guard_text(guard, self.printer)

    def statement(self, s) -> list[str]:
        p = self.printer
        if isinstance(s, Reduction):
            fill, total = ('-float("inf")', "tl.reduce({}, 0, _nanmax)") if s.op == "max" else ("0.0", "tl.sum({}, axis=0)")
            value = p.doprint(self.forms[id(s)])  # a max reduction propagates NaN, as torch.max does
            return [f"tl.store(_{s.name}_partials + _pid, {total.format(f'tl.where(_mask, {value}, {fill})')})"
                    f"  # {s.op}, per tensor: finished by {self.reduce_name(s)}"]
        if isinstance(s, TensorScalar):
            return [f"{s.name} = {p.doprint(s.expr)}"]
        value = p.doprint(self.forms[id(s)])
        per_element = _names(s.expr) & (set(self.buffers) | self._temps())
        if not per_element:  # a scalar value written per element: broadcast it to the block
            value = f"{value} + tl.zeros([BLOCK_SIZE], dtype=tl.float32)"
        lines = [f"{s.target} = {value}"]
        if s.target in self.stored:
            lines.append(f"{s.target} = _rounded({s.target}, DTYPE)  # what a load of the stored value returns")
        return lines

    def _temps(self) -> set[str]:
        return {s.target for s in self.prog.body if isinstance(s, Assign)}

    def reduce_name(self, r: Reduction) -> str:
        return f"_{self.fn}_reduce{self._stage_of(r)}_kernel"

    # ── one reduce kernel: partials of one stage → per-tensor totals ──────────────────────────
    def reduce(self, k: int) -> dict | None:
        reds = [r for r in self.stages[k] if isinstance(r, Reduction)]
        if not reds:
            return None
        items = []
        for r in reds:
            items.append({"name": r.name, "op": r.op, "guard": self._guard(r.guard)})
        guard_names = set().union(*[_names(r.guard) for r in reds])
        flags = [f for f in self.flags if f in guard_names]
        return {"name": f"_{self.fn}_reduce{k}_kernel", "stage": k, "reductions": items, "flags": flags}

    def context(self) -> dict:
        launches = []
        for k in range(len(self.stages)):
            kernel = self.stage(k)
            launches.append({"kind": "stage", **kernel})
            red = self.reduce(k)
            if red:
                launches.append({"kind": "reduce", **red})
        index = {r.name: i for i, r in enumerate(self.reductions)}
        state_lists = [f"{s.name}s" for s in self.prog.states if s.name != "kahan_comp"]
        return {
            "name": self.prog.name,
            "fn": self.fn,
            "spec_path": self.prog.spec_path,
            "launches": launches,
            "buffers": self.buffers,
            "buffer_lists": ["params", "grads"] + state_lists + ["kahan_comps"],
            "host_used": self.host_used,
            "flags": self.flags,
            "scalars": self.scalars,
            "reduction_index": index,
            "n_reductions": self.n_reductions,
            "n_launches": len(launches),
            "optional": [k for a in self.prog.args if a.optional for k in a.keys],  # None → 0.0
        }


def context(prog: Program) -> dict:
    return KernelBuilder(prog).context()


def render(prog: Program, spec_source: bytes, key: str) -> str:
    """The ``_triton.py`` module. A spec the kernels cannot express still compiles (the other
    backends run it): its module's launcher raises the reason when Triton is chosen."""
    from .render import env, header, spec_display_path
    try:
        ctx = context(prog)
    except (StageError, NotImplementedError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        body = env().get_template("triton_unsupported.py.j2").render(
            name=prog.name, fn=prog.functional, reason=reason,
            message=repr(f"{prog.name} has no Triton kernels ({reason})"))
        return header(prog, spec_source, body, key) + body
    ctx["spec_display"] = spec_display_path(prog.spec_path)
    body = env().get_template("triton.py.j2").render(**ctx)
    return header(prog, spec_source, body, key) + body
