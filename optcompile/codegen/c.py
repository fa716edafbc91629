"""IR → the fused CPU backend: one multi-tensor C function per spec (``<stem>_fused.c``).

The generated file holds, per stage, one element loop per *variant*: the host booleans that guard
statements (``kahan``, ``update_parameters``, ``decay_l2`` …) are specialised away in Python, so
every inner loop is straight-line, branch-free fp32 code that the C compiler vectorises. The
exported ``<fn>_fused_step`` looks the variant up in a table indexed by the flag bits, cuts
every tensor into chunks and runs the chunks in an OpenMP ``parallel for``; a stage with a
reduction accumulates it in 16 lanes (so the loop vectorises without -ffast-math) and writes one
partial per chunk, and the partials are summed per tensor (in chunk order, so results do not
depend on the thread count) before the next stage runs. Element locals that a later stage reads
(a temp, or ``grad`` after L2 decay) pass through an fp32 scratch buffer.

In bf16 on AVX2 a variant also gets an explicit SIMD loop (``VecPrinter``: the same statements on
8-lane GCC/Clang vector types), because the auto-vectorised bf16 loop is compute-bound: it widens
and narrows in the wrong lane order and blends a NaN case into every rounding. The SIMD loop
unpacks 16 bf16 as even/odd lanes with one shift and one mask, rounds to nearest even without
the NaN case, ORs a NaN test into a flag instead, and on a flag leaves the rest of the chunk to
the scalar loop, which therefore also serves as the exact reference (a test checks the two loops
agree bit for bit). The other buffers of a bf16-param step load and store in the same lane
order (``OC_VGET_``/``OC_VPUT_``): an fp32 state, or an 8-bit state's block of decoded values, by
two shuffles; stochastic rounding (``OC_VROUND_``) draws the bits of the lanes' element indices.
With AVX2 only this loop vectorises such steps: the scalar loop's per-element conversions and
hash do not. Reductions keep the scalar loop's 16-lane partition; fp32 spill buffers and
functions without a vector form (``powf`` …) keep the variant scalar.

A state of 8-bit codes (``-DOC_DTYPE_<state>=3`` int8, ``4`` uint8: ``state_precision="8bit"``,
optcompile/quantize.py) is loaded and stored by the element loop itself: it then runs block by
block, decoding each block with its scale into an fp32 array, stepping it as an fp32 state and
encoding the block's new values with their absmax (``OC_GET_``/``OC_PUT_`` and the block's
decode and encode, one place in the template).

Numerics follow the other backends: storage is ``OC_T`` (float, bf16 bits or ``_Float16``,
chosen by ``-DOC_DTYPE`` at build time), math is fp32, a store rounds to nearest-even, and a
later read of a stored buffer sees the rounded value (``OC_ROUND``, after which the store is
exact). ``Max``/``Min`` ignore a NaN operand like ``fmaxf`` (README, DSL semantics) but print as
selects (``fmaxf`` would not vectorise); a max reduction propagates NaN like ``torch.max``.
Interpolations and in-place products print in the torch backends' grouping (forms.py). Scalar subexpressions (host and per-tensor) are computed in double before the
loop and rounded to float once, as torch rounds a Python float scalar: ``param.mul_(1 - decay)``
and ``param * c0`` agree.
"""
from __future__ import annotations

import json

import sympy
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter

from .. import blockformat, kernel_plan
from ..ir import TRUE, Clamp, Program
from .forms import Lerp
from .printing import PrinterBase


class CPrinter(PrinterBase, C99CodePrinter):
    """fp32 element math: ``sqrtf``, ``x*x`` for squares, float literals, ternaries for Piecewise."""

    FUNCTIONS = {"exp": "expf", "log": "logf", "Abs": "fabsf"}
    SQRT, PRODUCTS = "sqrtf", 4
    # Max/Min ignore a NaN operand (fmaxf's semantics; fmaxf itself does not vectorise)
    MAX, MIN, AND, OR = "oc_max", "oc_min", " && ", " || "
    LERP = "oc_lerp"

    def __init__(self, settings=None):
        super().__init__({"type_aliases": {real: float32}, "order": "none", **(settings or {})})  # the plan's term order

    def literal(self, x: float) -> str:
        return _flit(x)

    def reciprocal_of(self, text: str) -> str:
        return f"(1.0f / {text})"

    def product(self, base, n: int) -> str:
        return "(" + "*".join([self.parenthesize(base, 50)] * n) + ")"

    def reciprocal(self, base, n: int) -> str | None:
        return f"(1.0f / {self.product(base, n)})" if n <= self.PRODUCTS else None

    def power(self, base, exp) -> str:
        return f"powf({self._print(base)}, {self._print(exp)})"

    def select(self, cond: str, a: str, b: str) -> str:
        return f"(({cond}) ? ({a}) : ({b}))"

    def _print_Piecewise(self, expr):
        (value, cond), rest = expr.args[0], expr.args[1:]
        if cond == TRUE:
            return self._print(value)
        other = rest[0][0] if len(rest) == 1 and rest[0][1] == TRUE else sympy.Piecewise(*rest)
        return self.select(self._print(cond), self._print(value), self._print(other))

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"((float)(({x}) > 0.0f) - (float)(({x}) < 0.0f))"

    def _print_Max(self, expr):
        return self._fold(self.MAX, expr.args)

    def _print_Min(self, expr):
        return self._fold(self.MIN, expr.args)

    def _fold(self, fn, args):
        args = sorted(args, key=sympy.default_sort_key)
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def mask(self, cond) -> str:
        return self._print(cond)

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    def _print_Clamp(self, expr):
        """torch.clamp, NaN propagating from ``x`` and both bounds (a GCC/Clang statement expression
        evaluates each operand once); an open side (``±oo``) is left out."""
        return _clamp_text(self, expr, "float", "", "({c}) ? ({a}) : ({b})")

    def _print_Lerp(self, expr):
        return f"{self.LERP}(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_And(self, expr):
        return "(" + self.AND.join(self.mask(a) for a in sorted(expr.args, key=str)) + ")"

    def _print_Or(self, expr):
        return "(" + self.OR.join(self.mask(a) for a in sorted(expr.args, key=str)) + ")"


class DoublePrinter(PrinterBase, C99CodePrinter):
    """Scalar math, once per tensor and chunk, in double: what Python computes on the host."""

    FUNCTIONS = {"exp": "exp", "log": "log", "Abs": "fabs"}

    def reciprocal(self, base, n: int) -> str | None:
        return f"(1.0 / {self.parenthesize(base, 50)})" if n == 1 else None

    def power(self, base, exp) -> str:
        return f"pow({self._print(base)}, {self._print(exp)})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"((double)(({x}) > 0.0) - (double)(({x}) < 0.0))"

    def _print_Clamp(self, expr):
        return _clamp_text(self, expr, "double", "", "({c}) ? ({a}) : ({b})")


class VecPrinter(CPrinter):
    """The same fp32 math on ``oc_vf`` (8 floats, a GCC/Clang vector extension; the bf16 SIMD loop):
    operators work lane-wise and take float scalars, comparisons give lane masks, selects are
    bitwise. Anything else (``powf``, ``expf`` …) has no vector form: the variant keeps the scalar
    loop only (``vexpr`` returns None)."""

    MAX, MIN, AND, OR = "oc_vmax", "oc_vmin", " & ", " | "  # comparisons give lane masks
    LERP, SQRT = "oc_vlerp", "oc_vsqrt"
    FUNCTIONS = {"Abs": "oc_vabs"}

    def select(self, cond: str, a: str, b: str) -> str:
        return f"oc_vsel({cond}, {a}, {b})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"({self.select(f'({x}) > 0.0f', '1.0f', '0.0f')} - {self.select(f'({x}) < 0.0f', '1.0f', '0.0f')})"

    def mask(self, cond) -> str:  # a hoisted host flag (a float) joins lane masks as all-ones or zeros
        return f"OC_VMASK({self._print(cond)})"

    def _print_Clamp(self, expr):
        return _clamp_text(self, expr, "oc_vf", "OC_VEC", "oc_vselect({c}, {a}, {b})")

    def _print_Not(self, expr):
        return f"(~{self.mask(expr.args[0])})"


_C, _D, _V = CPrinter(), DoublePrinter({"order": "none"}), VecPrinter()
_VEC_NODES = (sympy.Symbol, sympy.Number, sympy.NumberSymbol, sympy.core.numbers.Infinity,
              sympy.core.numbers.NegativeInfinity, sympy.Add, sympy.Mul, sympy.Max, sympy.Min, sympy.Abs,
              sympy.sign, sympy.Piecewise, sympy.functions.elementary.piecewise.ExprCondPair, Lerp, sympy.And,
              sympy.Or, sympy.Not, sympy.core.relational.Relational, sympy.logic.boolalg.BooleanAtom, Clamp)


def _clamp_text(printer, expr, ctype: str, wrap: str, select: str) -> str:
    """``Clamp(x, lo, hi)`` as one C statement expression over ``ctype`` values: ``x`` becomes ``lo``
    where ``x > lo`` is false and ``x`` is not NaN (so a NaN ``lo`` gives NaN), then ``hi`` likewise."""
    x, lo, hi = expr.args
    names = {"float": "oc_x", "double": "oc_xd", "oc_vf": "oc_vx"}
    v = names[ctype]
    decls = [f"{v} = {wrap}({printer._print(x)})"]
    steps = []
    for op, b, tag in ((">", lo, "lo"), ("<", hi, "hi")):
        if b in (-sympy.oo, sympy.oo):
            continue
        decls.append(f"{v}_{tag} = {wrap}({printer._print(b)})")
        steps.append(select.format(c=f"({v} != {v}) | ({v} {op} {v}_{tag})" if ctype == "oc_vf"
                                   else f"{v} != {v} || {v} {op} {v}_{tag}", a=v, b=f"{v}_{tag}"))
    body = "; ".join(f"{v} = {s}" for s in steps[:-1]) + ("; " if len(steps) > 1 else "") + steps[-1]
    return f"({{ {ctype} {', '.join(decls)}; {body}; }})"


def _flit(x: float) -> str:
    text = repr(x)
    if "e" not in text and "." not in text and "inf" not in text and "nan" not in text:
        text += ".0"
    return text + "f"


def cexpr(expr) -> str:
    """One per-element expression as C (golden-tested)."""
    return _C.doprint(sympy.sympify(expr))


def has_vector_form(expr) -> bool:
    """Whether every operation of ``expr`` has a lane-wise ``oc_vf`` form in :class:`VecPrinter`:
    arithmetic, comparisons and logic, selects, ``Max``/``Min``/``Abs``/``sign``/lerp, square
    roots and small integer powers (``powf``, ``expf``, ``logf`` … have none)."""
    for node in sympy.preorder_traversal(sympy.sympify(expr)):
        if isinstance(node, sympy.Pow):
            e = node.exp
            if not (abs(e) == sympy.Rational(1, 2) or (e.is_Integer and 1 <= abs(e) <= 4)):
                return False
        elif not isinstance(node, _VEC_NODES):
            return False
    return True


def vexpr(expr, scalar_names=()) -> str | None:
    """One per-element expression on ``oc_vf`` lanes, or None if it has no vector form. An
    expression of scalars only is splatted (``OC_VEC``), so it can be assigned to a lane vector."""
    expr = sympy.sympify(expr)
    if not has_vector_form(expr):
        return None
    text = _V.doprint(expr)
    return f"OC_VEC({text})" if _syms(expr) <= set(scalar_names) else text


# ── the plan as C ────────────────────────────────────────────────────────────────────────────────
def _syms(e) -> set[str]:
    return {s.name for s in sympy.sympify(e).free_symbols}


def _on(guard, env: dict) -> bool:
    g = sympy.sympify(guard)
    g = g.xreplace({s: sympy.true if env[s.name] else sympy.false for s in g.free_symbols})
    return bool(g == TRUE)


def _guard(guard) -> str | None:
    """A host guard over the flags, which are ``const int`` parameters of a stage body (the
    outermost and/or needs no parentheses of its own)."""
    if guard == TRUE:
        return None
    if isinstance(guard, (sympy.And, sympy.Or)):
        return _C.AND.join(_C.doprint(a) for a in sorted(guard.args, key=str)) if isinstance(guard, sympy.And) \
            else _C.OR.join(_C.doprint(a) for a in sorted(guard.args, key=str))
    return _C.doprint(guard)


def _if(guard, line: str) -> str:
    g = _guard(guard)
    return line if g is None else f"if ({g}) {line}"


def _when(guard, value: str, otherwise: str) -> str:
    g = _guard(guard)
    return value if g is None else f"({g}) ? {value} : {otherwise}"


def context(prog: Program) -> dict:
    plan = kernel_plan.build(prog)
    fn = prog.functional
    flags = list(plan.flags)
    host_floats = list(plan.scalars)
    ts_names = list(plan.per_tensor_names)
    scalar_src = {n: f"oc_h[{i}]" for i, n in enumerate(host_floats)}
    scalar_src.update({n: f"oc_ts[{i}]" for i, n in enumerate(ts_names)})
    scalar_src["numel"] = "(double)oc_numel"
    # a scale buffer holds one fp32 per block of OC_QBLOCK elements: a chunk's start is a whole block;
    # a reduced-shape buffer is read by a broadcast index from the tensor's start
    buffers = [{"name": b.name, "ctype": "float" if b.storage == "fp32" else f"OC_T_{b.name}", "const": b.role == "grad",
                "broadcast": b.broadcast, "offset": "start / OC_QBLOCK" if b.role == "scale" else "start"}
               for b in plan.buffers]
    # each stored buffer's storage code: the param's (-DOC_DTYPE) or, for a state, its own (8-bit
    # codes too, where the state names a scale buffer)
    storage = [{"name": b.name, "code": "OC_DTYPE" if b.storage != "state" else f"OC_DTYPE_{b.name}",
                "state": b.storage == "state", "scale": b.scale} for b in plan.buffers
               if b.role not in ("spill", "scale")]
    stages = [_stage(plan, st, flags, scalar_src) for st in plan.stages]
    return {
        "fn": fn,
        "name": prog.name,
        "flags": flags,
        "host_floats": host_floats,
        "buffers": buffers,
        "storage": storage,
        "stages": stages,
        "n_tscalars": max(1, len(ts_names)),
        "segments": [{"index": g.index, "after": g.after} for g in plan.segments],
        "broadcasts": [list(a) for a in plan.broadcasts],
        "broadcast_row": kernel_plan.BROADCAST_ROW,
        "qblock": blockformat.BLOCK,
        "interface": json.dumps({"function": f"{fn}_fused_step", "host": host_floats, "flags": flags,
                                 "buffers": [b.name for b in plan.buffers], "spills": len(plan.spills),
                                 "states": [b.name for b in plan.buffers if b.storage == "state"],
                                 "codes": [b.value for b in plan.scales]} | ({
                                     "segments": len(plan.segments), "broadcasts": [list(a) for a in plan.broadcasts],
                                     "reduced": {b.name: list(b.axes) for b in plan.buffers
                                                 if b.role == "state" and b.axes},
                                     "axis_buffers": [b.name for b in plan.axis_buffers],
                                     "segment_outputs": [list(g.outputs) for g in plan.segments]}
                                    if plan.segments else {}),
                                sort_keys=True),
    }


def _stage(plan: kernel_plan.KernelPlan, st: kernel_plan.Stage, flags: list[str], scalar_src: dict) -> dict:
    """One stage: its element loop written once over ``const int`` flags, and its variants (one per
    flag combination that runs a different set of statements) that call it with constant flags, so
    each inlined copy is straight-line, branch-free code that the C compiler vectorises."""
    fn = plan.fn
    hoisted: dict = {}
    scalar_names = set(scalar_src) | set(flags)
    body: list[str] = []  # the scalar loop's statements
    body_lanes: list[str] = []  # the same, accumulating reductions in 16 lanes (vectorises)
    vbody: list[str] | None = []  # the bf16 SIMD loop's; None: some statement has no vector form
    reductions = []
    loaded = {plan.buffer(a.buffer).value for a in st.loads}
    temps: list[str] = []
    rounded: list[str] = []  # buffers whose writes round (their stochastic-rounding keys)
    for s in st.body:
        hexpr = _hoist(s.expr, scalar_names, hoisted)
        rhs = cexpr(hexpr)
        vrhs = vexpr(hexpr, {h[0] for h in hoisted.values()} | set(flags))
        if vrhs is None:
            vbody = None
        if isinstance(s, kernel_plan.Reduce):
            acc = f"oc_acc_{s.name}"
            slot = st.reductions.index(s)
            reductions.append({"acc": acc, "op": s.op, "name": s.name, "slot": slot})
            for a, out in ((acc, body), (f"{acc}_lanes[oc_l]", body_lanes)):
                out.append(_if(s.guard, f"{a} = oc_nanmax({a}, {rhs});" if s.op == "max" else f"{a} += {rhs};"))
            if vbody is not None:  # committed after the NaN check, so a flagged block is not counted twice
                new = f"oc_vnanmax({acc}_v[oc_k], {vrhs})" if s.op == "max" else f"{acc}_v[oc_k] + {vrhs}"
                vbody.append(f"{acc}_next[oc_k] = {_when(s.guard, new, f'{acc}_v[oc_k]')};")
            continue
        t = s.target.name
        if t not in loaded and t not in temps:
            temps.append(t)
        if s.rounds:  # a later read sees the stored value, and the store is exact
            rhs, vrhs = f"OC_ROUND_{t}({rhs})", f"OC_VROUND_{t}({vrhs})"
            rounded.append(t)
        body.append(_if(s.guard, f"{t} = {rhs};"))
        body_lanes.append(body[-1])
        if vbody is not None:
            vbody.append(_if(s.guard, f"{t} = {vrhs};"))
    loads, stores = [], []
    for a in st.loads:
        b = plan.buffer(a.buffer)
        # a reduced-shape buffer: its element for this one (kernel_plan.broadcast_index), from the tensor's start
        at = f"oc_bidx(oc_bc + {kernel_plan.BROADCAST_ROW * plan.broadcast_of(b.name)}, oc_start + oc_i)" \
            if b.broadcast else "oc_i"
        value = f"oc_ptr_{b.name}[{at}]" if b.storage == "fp32" else f"OC_GET_{b.name}(oc_i)" if b.scale \
            else f"OC_LOAD_{b.name}(oc_ptr_{b.name}[{at}])"
        loads.append(f"float {b.value} = {_when(a.guard, value, '0.0f')};")
    for a in st.stores:
        b = plan.buffer(a.buffer)
        if b.scale:  # its element, or its place in the block that is encoded once complete (8-bit codes)
            stores.append(_if(a.guard, f"OC_PUT_{b.name}(oc_i, {b.value});"))
            continue
        value = b.value if b.storage == "fp32" else f"OC_EXACT_{b.name}({b.value})"
        stores.append(_if(a.guard, f"oc_ptr_{b.name}[oc_i] = {value};"))
    declared = [f"float {' = 0.0f, '.join(temps)} = 0.0f;"] if temps else []
    spills = any(plan.buffer(n).role in ("spill", "axis") or plan.buffer(n).broadcast for n in st.buffers())
    # fp32 spill rows and segments' buffers (a tensor function's result; broadcast loads) are not in
    # the even/odd lane order
    vector = None if vbody is None or spills else {
        "loads": [{"name": a.buffer, "value": plan.buffer(a.buffer).value, "guard": _guard(a.guard)}
                  for a in st.loads],
        "temps": temps, "body": vbody, "accs": [r["acc"] for r in reductions],
        "stores": [{"name": a.buffer, "value": plan.buffer(a.buffer).value, "guard": _guard(a.guard)}
                   for a in st.stores]}
    used = sorted(set().union(*[v[2] for v in hoisted.values()])) if hoisted else []
    variants, table = _variants(plan, st, flags)
    return {"index": st.index, "name": f"{fn}_stage{st.index}", "flags": flags, "variants": variants, "table": table,
            "scalars": [{"name": n, "src": scalar_src[n]} for n in used if n in scalar_src],
            "hoisted": [{"name": k, "expr": v} for k, v, _ in hoisted.values()],
            "element": loads + declared + body + stores, "element_lanes": loads + declared + body_lanes + stores,
            "reductions": reductions, "vector": vector,
            "codes": _codes(plan, st),
            "rounded": [{"name": n, "slot": plan.slot(n)} for n in dict.fromkeys(rounded)],
            "tscalars": [_tscalar(t, plan, flags) for t in st.own_per_tensor],
            "partials": [{"name": r.name, "op": r.op, "slot": k, "slot_ts": list(plan.per_tensor_names).index(r.name),
                          "guard": _guard_bits(r.guard, flags)} for k, r in enumerate(st.reductions)]}


def _codes(plan: kernel_plan.KernelPlan, st: kernel_plan.Stage) -> list[dict]:
    """The states this stage may read or write as 8-bit codes (``Buffer.scale``): per block, the
    decode of those it loads and the encode of those it stores, under the accesses' guards."""
    out = []
    for b in plan.buffers:
        if not b.scale:
            continue
        load = next((a for a in st.loads if a.buffer == b.name), None)
        store = next((a for a in st.stores if a.buffer == b.name), None)
        if load or store:
            out.append({"name": b.name, "scale": b.scale, "load": load is not None, "store": store is not None,
                        "load_guard": load and _guard(load.guard), "store_guard": store and _guard(store.guard)})
    return out


def _variants(plan, st, flags) -> tuple[list[dict], list[int]]:
    """The flag combinations that run a different set of statements (or read a flag in the math
    differently), and the table from flag bits to variant (-1: the stage does nothing)."""
    variants: list[dict] = []
    table: list[int] = []
    seen: dict = {}
    names = [b.name for b in plan.buffers]
    for bits in range(1 << len(flags)):
        env = {f: bool(bits >> i & 1) for i, f in enumerate(flags)}
        active = tuple(i for i, s in enumerate(st.body) if _on(s.guard, env))
        if not active:
            table.append(-1)
            continue
        read = sorted(set().union(*[_syms(st.body[i].expr) for i in active]) & set(env))
        key = (active, tuple(env[f] for f in read))
        if key not in seen:
            seen[key] = len(variants)
            uses = {a.buffer for a in st.loads + st.stores if _on(a.guard, env)}
            variants.append({"name": f"{plan.fn}_stage{st.index}_v{len(variants)}",
                             "mask": sum(1 << i for i, b in enumerate(names) if b in uses),
                             "flag_values": [int(env[f]) for f in flags],
                             "flags": ", ".join(f"{k}={int(v)}" for k, v in sorted(env.items())) or "none"})
        table.append(seen[key])
    return variants, table


def _guard_bits(guard, flags) -> str:
    """A host guard over the flag bits, for per-tensor statements (outside element loops)."""
    if guard == TRUE:
        return "1"
    g = sympy.sympify(guard)
    return _C.doprint(g.xreplace({s: sympy.Symbol(f"OC_FLAG({flags.index(s.name)})") for s in g.free_symbols}))


def _tscalar(t: kernel_plan.PerTensor, plan, flags) -> dict:
    src = {n: f"h[{i}]" for i, n in enumerate(plan.scalars)}
    src.update({n: f"ts_t[{i}]" for i, n in enumerate(plan.per_tensor_names)})
    src.update({n: f"OC_FLAG({i})" for i, n in enumerate(flags)})
    src["numel"] = "(double)size[t]"  # the whole tensor's, also for a local shard
    expr = sympy.sympify(t.expr)
    expr = expr.xreplace({x: sympy.Symbol(src[x.name], **x.assumptions0) for x in expr.free_symbols})
    return {"name": t.name, "slot": list(plan.per_tensor_names).index(t.name), "expr": _D.doprint(expr),
            "guard": _guard_bits(t.guard, flags)}


def _hoist(expr, scalar_names: set, hoisted: dict):
    """Replace every maximal scalar-only subexpression by a float constant computed in double."""
    expr = sympy.sympify(expr)
    syms = _syms(expr)
    if syms and syms <= scalar_names and not expr.is_Number:
        key = sympy.srepr(expr)
        if key not in hoisted:
            cname = f"oc_c{len(hoisted)}" if not isinstance(expr, sympy.Symbol) else f"oc_f_{expr.name}"
            hoisted[key] = (cname, _D.doprint(expr), syms)
        return sympy.Symbol(hoisted[key][0], real=True)
    if not expr.args or expr.is_Number:
        return expr
    if isinstance(expr, sympy.Piecewise):
        return sympy.Piecewise(*[(_hoist(v, scalar_names, hoisted), _hoist(c, scalar_names, hoisted))
                                 for v, c in expr.args], evaluate=False)
    args = [_hoist(a, scalar_names, hoisted) for a in expr.args]
    return expr.func(*args, evaluate=False) if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Pow)) \
        else expr.func(*args)


def render(prog: Program, spec_source: bytes, key: str) -> str:
    from .render import env, header, no_kernel
    reason = kernel_plan.unsupported(prog)
    if reason is not None:
        return no_kernel(prog, spec_source, key, "//", reason)
    body = env().get_template("fused.c.j2").render(**context(prog))
    return header(prog, spec_source, body, key, comment="//") + body
