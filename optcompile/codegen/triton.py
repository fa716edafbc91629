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

A state with a scale buffer (``kernel_plan.Buffer.scale``) loads and stores through
``_load_state``/``_store_state``: its dtype, or, when its ``DTYPE_<state>`` constexpr is int8 or
uint8, 8-bit codes decoded and encoded per block of ``blockformat.BLOCK`` elements (a program's
1,024 elements are whole blocks).

Host floats are fp32 kernel arguments; host bools (flags, ``kahan``, ``update_parameters``,
branch conditions) are ``tl.constexpr``, so untaken branches compile away. A program the kernels
cannot express (a value that cannot be recomputed across a stage, an unprintable function) still
renders: a stub module whose launcher raises why, so the other backends keep working.
"""
from __future__ import annotations

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from .. import blockformat, kernel_plan
from ..ir import TRUE, Clamp, Program
from ..rounding import GOLDEN, M32
from .forms import Lerp
from .printing import PrinterBase

_ALLOWED = (sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.Abs,
            sympy.sign, sympy.exp, sympy.log, sympy.Piecewise, sympy.logic.boolalg.Boolean,
            sympy.core.relational.Relational, sympy.NumberSymbol, sympy.core.numbers.Infinity,
            sympy.core.numbers.NegativeInfinity, sympy.functions.elementary.piecewise.ExprCondPair, Lerp, Clamp)


class TritonPrinter(PrinterBase, PythonCodePrinter):
    """Python syntax, Triton semantics: ``tl.*`` functions, float literals, fp32 everywhere.

    ``constexpr`` names the host booleans: conditions over them print as Python ``and/or/not``
    and ``x if c else y`` (resolved at compile time); any other condition is a runtime value and
    prints with ``&``/``|``/``~`` and ``tl.where``.
    """

    FUNCTIONS = {"exp": "tl.exp", "log": "tl.log", "Abs": "tl.abs"}
    SQRT, RSQRT, PRODUCTS = "tl.sqrt", "tl.rsqrt", 4

    def __init__(self, constexpr=(), settings=None):
        super().__init__({"standard": "python3", **(settings or {})})
        self.constexpr = set(constexpr)

    def doprint(self, expr, assign_to=None):
        expr = sympy.sympify(expr)
        for node in sympy.preorder_traversal(expr):
            if isinstance(node, sympy.Mod) or not isinstance(node, _ALLOWED):
                raise NotImplementedError(f"the Triton backend cannot print {type(node).__name__} ({node}) "
                                          f"in {expr}")
        return super().doprint(expr, assign_to)

    # ── numbers: always float literals, so no integer arithmetic (no // or %) reaches a kernel ──
    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return '-float("inf")'

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # ── arithmetic ─────────────────────────────────────────────────────────────────────────────
    def product(self, base, n: int) -> str:
        b = self.parenthesize(base, PRECEDENCE["Atom"], strict=False) if not base.is_Atom else self._print(base)
        return " * ".join([b] * n)

    def reciprocal(self, base, n: int) -> str:
        return f"1.0/{self._denominator(sympy.Pow(base, n))}"

    def power(self, base, exp) -> str:
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
        """Left to right in the kernel plan's term order (kernel_plan.ordered_terms)."""
        terms = list(expr.args)
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

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))"

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


class KernelBuilder:
    """The template context of each stage kernel and reduce kernel of one program's plan."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.plan = kernel_plan.build(prog)
        self.fn = prog.functional
        self.printer = TritonPrinter(constexpr=self.plan.flags)
        self.table = [b.name for b in self.plan.buffers if b.role not in ("spill", "axis")]  # rows of the pointer table
        if len(self.plan.stages) > 1:
            self.kernel_names = [f"_{self.fn}_stage{k}_kernel" for k in range(len(self.plan.stages))]
        else:
            self.kernel_names = [f"_{self.fn}_kernel"]

    def _guard(self, guard) -> str | None:
        return None if guard == TRUE else guard_text(guard, self.printer)

    def _grouped(self, items) -> list[dict]:
        """Consecutive lines under one ``if`` per guard: ``[(guard, line), …]`` → blocks."""
        blocks: list[dict] = []
        for guard, lines in items:
            g = self._guard(guard)
            if blocks and blocks[-1]["guard"] == g:
                blocks[-1]["lines"] += lines
            else:
                blocks.append({"guard": g, "lines": list(lines)})
        return blocks

    # ── one stage kernel ───────────────────────────────────────────────────────────────────────
    def stage(self, st: kernel_plan.Stage) -> dict:
        plan, p = self.plan, self.printer
        touched = set(st.buffers())
        pointers = [b for b in plan.buffers if b.name in touched]
        pointers += [plan.buffer(b.scale) for b in pointers if b.scale]  # 8-bit codes' block scales
        per_tensor = self._grouped((t.guard, [f"{t.name} = {p.doprint(t.expr)}"]) for t in st.per_tensor)
        loads = []
        kinds = list(dict.fromkeys(plan.broadcast_of(a.buffer) for a in st.loads if plan.buffer(a.buffer).broadcast))
        indexes = []  # a reduced-shape buffer's element for each of this block's elements
        for q in kinds:
            shown = ", ".join(b.name for b in plan.buffers if b.axes == plan.broadcasts[q])
            guard = kernel_plan.any_of([a.guard for a in st.loads if plan.buffer(a.buffer).axes == plan.broadcasts[q]])
            row = kernel_plan.BROADCAST_ROW
            indexes.append((guard, [f"_b = _broadcast + (_tensor * {len(plan.broadcasts)} + {q}) * {row}  # {shown}: "
                                    f"reduced along {list(plan.broadcasts[q])}",
                                    f"_index{q} = ((_offsets % tl.load(_b)) // tl.load(_b + 1)) * tl.load(_b + 2) + "
                                    "((_offsets % tl.load(_b + 3)) // tl.load(_b + 4)) * tl.load(_b + 5)"]))
        for a in st.loads:
            b = plan.buffer(a.buffer)
            if b.scale:  # its dtype, or 8-bit codes decoded with their blocks' scales
                loads.append((a.guard, [f"{b.value} = _load_state(_{b.name}_ptr, _{b.scale}_ptr, _offsets, _mask, "
                                        f"{self.dtype(b)})"]))
                continue
            at = f"_index{plan.broadcast_of(b.name)}" if b.broadcast else "_offsets"
            value = f"tl.load(_{b.name}_ptr + {at}, mask=_mask)"
            loads.append((a.guard, [f"{b.value} = {value}" + ("" if b.storage == "fp32" else ".to(tl.float32)")]))
        body = self._grouped((s.guard, self.statement(s)) for s in st.body)
        stores = []
        for a in st.stores:
            b = plan.buffer(a.buffer)
            if b.role == "spill":
                line = f"tl.store(_{b.name}_ptr + _offsets, {b.value}, mask=_mask)  # fp32 scratch, read by a later stage"
            elif b.scale:
                line = (f"_store_state(_{b.name}_ptr, _{b.scale}_ptr, {b.name}, _start, _offsets, _mask, _n_elements, "
                        f"{self.dtype(b)}, BLOCK_SIZE)  # exact, or 8-bit codes encoded per block")
            else:
                line = (f"tl.store(_{b.name}_ptr + _offsets, {b.name}.to({self.dtype(b)}), mask=_mask)"
                        f"  # exact: {b.name} is already rounded")
            stores.append((a.guard, [line]))
        recomputed = [t.name for t in st.per_tensor if t.stage != st.index]
        return {
            "name": self.kernel_names[st.index],
            "stage": st.index,
            "pointers": [{"name": b.name, "dtype": self.dtype(b), "spill": b.role == "spill", "value": b.value,
                          "broadcast": b.broadcast, "axis": b.role == "axis", "scale": b.role == "scale",
                          "row": self.table.index(b.name) if b.role not in ("spill", "axis") else 0,
                          "filled": self.filled(b.name, st.index) if b.role == "axis" else ""} for b in pointers],
            "spills": any(b.role == "spill" for b in pointers),
            "broadcasts": bool(kinds),
            "per_tensor": per_tensor + self._grouped(indexes),
            "loads": self._grouped(loads),
            "body": body,
            "stores": self._grouped(stores),
            "totals": list(st.totals),
            "partials": [r.name for r in st.reductions],
            "scalars": list(st.scalars),
            "flags": list(st.flags),
            "uses_numel": st.uses_numel,
            "rounds": any(isinstance(s, kernel_plan.Compute) and s.rounds for s in st.body),
            "recomputed": recomputed,
            "origins": [str(o) for o in st.origins],
        }

    def statement(self, s) -> list[str]:
        p = self.printer
        if isinstance(s, kernel_plan.Reduce):
            fill, total = ('-float("inf")', "tl.reduce({}, 0, _nanmax)") if s.op == "max" else ("0.0", "tl.sum({}, axis=0)")
            value = p.doprint(s.expr)  # a max reduction propagates NaN, as torch.max does
            return [f"tl.store(_{s.name}_partials + _pid, {total.format(f'tl.where(_mask, {value}, {fill})')})"
                    f"  # {s.op}, per tensor: finished by {self.reduce_name(s)}"]
        value = p.doprint(s.expr)
        if not s.per_element:  # a scalar value written per element: broadcast it to the block
            value = f"{value} + tl.zeros([BLOCK_SIZE], dtype=tl.float32)"
        lines = [f"{s.target} = {value}"]
        if s.rounds:
            b = self.plan.buffer(s.target.name)
            salt = ((self.plan.slot(b.name) + 1) * GOLDEN) & M32
            lines.append(f"{s.target} = _rounded({s.target}, {self.dtype(b)}, SR, _tensor_key, {salt:#010x}, _offsets)"
                         "  # what a load of the stored value returns")
        return lines

    def dtype(self, b: kernel_plan.Buffer) -> str:
        """The constexpr a buffer is stored in: the group's (param, kahan_comp), the grads', a
        state's own (state_precision), or fp32 scratch."""
        return {"grad": "GRAD_DTYPE", "fp32": "tl.float32", "state": f"DTYPE_{b.name}"}.get(b.storage, "DTYPE")

    def reduce_name(self, r: kernel_plan.Reduce) -> str:
        return f"_{self.fn}_reduce{self._stage_of(r)}_kernel"

    def _stage_of(self, r) -> int:
        return next(st.index for st in self.plan.stages if r in st.reductions)

    # ── one reduce kernel: partials of one stage → per-tensor totals ──────────────────────────
    def reduce(self, st: kernel_plan.Stage) -> dict | None:
        reds = st.reductions
        if not reds:
            return None
        items = [{"name": r.name, "op": r.op, "guard": self._guard(r.guard)} for r in reds]
        guard_names = set().union(*[_names(r.guard) for r in reds])
        flags = [f for f in self.plan.flags if f in guard_names]
        # over local shards, the totals rows the runtime all-reduces after this kernel: sums (and means'
        # parts, each shard's sum over the whole tensor's numel) with SUM, maxes with MAX
        rows = {op: tuple(r.slot for r in reds if (r.op == "max") == (op == "max")) for op in ("sum", "max")}
        return {"name": f"_{self.fn}_reduce{st.index}_kernel", "stage": st.index, "reductions": items, "flags": flags,
                "sum_rows": repr(rows["sum"]), "max_rows": repr(rows["max"])}

    def filled(self, name: str, stage: int) -> str:
        """Where stage ``stage`` finds an axis buffer's pointers: the table of the last segment before
        it that fills the buffer, and its row there."""
        seg = [g for g in self.plan.segments if g.after < stage and name in g.outputs][-1]
        return f"_segment{seg.index}_ptrs[{seg.outputs.index(name)}]"

    def segment(self, seg: kernel_plan.Segment) -> dict:
        """A segment between launches: torch ops (codegen/segments.py) on the spills' views, then the
        pointer table of the axis buffers it filled."""
        from .segments import lines
        return {"kind": "segment", "index": seg.index,
                "lines": lines(self.prog, self.plan, seg, "_plan.spill_views({i}, params)"),
                "outputs": list(seg.outputs),
                # a tensor function's result is laid out like its param (read at the element's position)
                "like": ["None" if self.plan.buffer(n).axes else "params" for n in seg.outputs]}

    def context(self) -> dict:
        launches = [self.segment(g) for g in self.plan.segments_after(-1)]
        for st in self.plan.stages:
            launches.append({"kind": "stage", **self.stage(st)})
            red = self.reduce(st)
            if red:
                launches.append({"kind": "reduce", **red})
            launches += [self.segment(g) for g in self.plan.segments_after(st.index)]
        state_lists = [f"{s.name}s" for s in self.prog.states if s.name != "kahan_comp"]
        return {
            "name": self.prog.name,
            "fn": self.fn,
            "spec_path": self.prog.spec_path,
            "launches": launches,
            "table": self.table,
            "broadcasts": repr(self.plan.broadcasts),
            "reduced": repr({i: b.axes for i, b in enumerate(self.plan.buffers) if b.role == "state" and b.axes}),
            "spills": [b.name for b in self.plan.spills],
            "buffer_lists": ["params", "grads"] + state_lists + ["kahan_comps"],
            "host_used": list(self.plan.host_inputs),
            "reduction_index": {r.name: r.slot for r in self.plan.reductions},
            "n_reductions": len(self.plan.reductions),
            "uses_numel": any(st.uses_numel for st in self.plan.stages),
            "n_launches": sum(1 for k in launches if k["kind"] != "segment"),
            "n_segments": len(self.plan.segments),
            "tensor_functions": list(dict.fromkeys(f.source.rstrip() for f in self.prog.tensor_functions())),
            "optional": list(self.plan.optional),  # None → 0.0
            "state_dtypes": [self.dtype(b) for b in self.plan.buffers if b.storage == "state"],
            # states whose 8-bit codes the kernels load and store (runtime.kernel_codes), by state list
            "codes": repr(tuple(b.value for b in self.plan.scales)),
            "qblock": blockformat.BLOCK,
            "code_index": repr(tuple(state_lists.index(f"{b.value}s") for b in self.plan.scales)),
        }


def _names(e) -> set[str]:
    return {s.name for s in sympy.sympify(e).free_symbols}


def context(prog: Program) -> dict:
    return KernelBuilder(prog).context()


def render(prog: Program, spec_source: bytes, key: str) -> str:
    """The ``_triton.py`` module."""
    from .render import env, header, no_kernel, spec_display_path
    reason = kernel_plan.unsupported(prog)
    if reason is not None:
        return no_kernel(prog, spec_source, key, "#", reason)
    ctx = context(prog)
    ctx["spec_display"] = spec_display_path(prog.spec_path)
    body = env().get_template("triton.py.j2").render(**ctx)
    return header(prog, spec_source, body, key) + body
