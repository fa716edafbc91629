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
agree bit for bit). Reductions keep the scalar loop's 16-lane partition; fp32 spill buffers and
functions without a vector form (``powf`` …) keep the variant scalar.

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

from ..ir import TRUE, Assign, Clamp, Program, Reduction, TensorScalar
from .forms import Forms, Lerp
from .host import used_host_names


class CPrinter(C99CodePrinter):
    """fp32 element math: ``sqrtf``, ``x*x`` for squares, float literals, ternaries for Piecewise."""

    def __init__(self, settings=None):
        super().__init__({"type_aliases": {real: float32}, **(settings or {})})

    def _print_Float(self, expr):
        return _flit(float(expr))

    def _print_Rational(self, expr):
        return _flit(float(expr.p) / float(expr.q))

    def _print_Integer(self, expr):
        return _flit(float(int(expr)))

    def _print_Half(self, expr):
        return "0.5f"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        b = self.parenthesize(base, 50)
        if exp == sympy.Rational(1, 2):
            return f"{self.SQRT}({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"(1.0f / {self.SQRT}({self._print(base)}))"
        if exp.is_Integer and 1 <= exp <= 4:
            return "(" + "*".join([b] * int(exp)) + ")"
        if exp.is_Integer and -4 <= exp <= -1:
            return "(1.0f / (" + "*".join([b] * int(-exp)) + "))"
        return f"powf({self._print(base)}, {self._print(exp)})"

    # Max/Min ignore a NaN operand (fmaxf's semantics; fmaxf itself does not vectorise)
    MAX, MIN, AND, OR = "oc_max", "oc_min", " && ", " || "
    LERP, SQRT = "oc_lerp", "sqrtf"

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


class DoublePrinter(C99CodePrinter):
    """Scalar math, once per tensor and chunk, in double: what Python computes on the host."""

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr.p) / float(expr.q))

    def _print_Integer(self, expr):
        return repr(float(int(expr)))

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp == sympy.Rational(1, 2):
            return f"sqrt({self._print(base)})"
        if exp == -1:
            return f"(1.0 / {self.parenthesize(base, 50)})"
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

    def select(self, cond: str, a: str, b: str) -> str:
        return f"oc_vsel({cond}, {a}, {b})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"({self.select(f'({x}) > 0.0f', '1.0f', '0.0f')} - {self.select(f'({x}) < 0.0f', '1.0f', '0.0f')})"

    def _print_Abs(self, expr):
        return f"oc_vabs({self._print(expr.args[0])})"

    def mask(self, cond) -> str:  # a hoisted host flag (a float) joins lane masks as all-ones or zeros
        return f"OC_VMASK({self._print(cond)})"

    def _print_Clamp(self, expr):
        return _clamp_text(self, expr, "oc_vf", "OC_VEC", "oc_vselect({c}, {a}, {b})")

    def _print_Not(self, expr):
        return f"(~{self.mask(expr.args[0])})"


_C, _D, _V = CPrinter(), DoublePrinter(), VecPrinter()
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


# ── the program as loops ─────────────────────────────────────────────────────────────────────────
def _syms(e) -> set[str]:
    return {s.name for s in sympy.sympify(e).free_symbols}


def _flags(prog: Program) -> list[str]:
    """Host booleans that guard statements: each combination is a specialised loop."""
    return sorted(set().union(*[_syms(s.guard) for s in prog.body]))


def _on(guard, env: dict) -> bool:
    g = sympy.sympify(guard)
    g = g.xreplace({s: sympy.true if env[s.name] else sympy.false for s in g.free_symbols})
    return bool(g == TRUE)


class _Stage:
    """One element loop: its statements, variants, per-tensor scalars and reductions."""

    def __init__(self, index, stmts):
        self.index = index
        self.elem = [s for s in stmts if isinstance(s, (Assign, Reduction))]
        self.tscalars = [s for s in stmts if isinstance(s, TensorScalar)]
        self.reductions = [s for s in stmts if isinstance(s, Reduction)]
        self.variants: list[dict] = []
        self.table: list[int] = []


def context(prog: Program) -> dict:
    fn = prog.functional
    flags = _flags(prog)
    stored = list(prog.stored())
    host_used = used_host_names(prog)
    host_bools = [h.name for h in prog.host if h.kind == "bool"] + ["update_parameters", "kahan"]
    host_floats = [n for n in host_used if n not in host_bools and n not in flags]
    tscalar_names = [s.name for s in prog.body if isinstance(s, (TensorScalar, Reduction))]
    scalar_src = {n: f"oc_h[{i}]" for i, n in enumerate(host_floats)}
    scalar_src.update({n: f"oc_ts[{i}]" for i, n in enumerate(tscalar_names)})
    scalar_src["numel"] = "(double)oc_numel"
    stages = [_Stage(i, st) for i, st in enumerate(prog.stages())]
    forms = Forms(prog).body(prog)  # lerps and in-place products, as the torch backends group them
    spills = _spills(prog, stages, stored)
    buffers = [{"name": b, "ctype": "OC_T", "const": b == "grad"} for b in ["param", "grad"] + stored[1:]]
    buffers += [{"name": f"spill_{n}", "ctype": "float", "const": False} for n in spills]

    for st in stages:
        seen: dict = {}
        for bits in range(1 << len(flags)):
            env = {f: bool(bits >> i & 1) for i, f in enumerate(flags)}
            active = tuple(i for i, s in enumerate(st.elem) if _on(s.guard, env))
            if not active:
                st.table.append(-1)
                continue
            # a flag the math reads (`Piecewise((a, f & (g > 0)), …)`) is a constant in the loop: part of the key
            read = sorted(set().union(*[_syms(st.elem[i].expr) for i in active]) & set(env))
            key = (active, tuple(env[f] for f in read))
            if key not in seen:
                seen[key] = len(st.variants)
                st.variants.append(_variant(prog, st, [st.elem[i] for i in active], stored, scalar_src,
                                            spills, f"{fn}_stage{st.index}_v{len(st.variants)}", env,
                                            [b["name"] for b in buffers], forms))
            st.table.append(seen[key])
    return {
        "fn": fn,
        "name": prog.name,
        "flags": flags,
        "host_floats": host_floats,
        "tscalars": tscalar_names,
        "buffers": buffers,
        "stages": [{"index": st.index, "variants": st.variants, "table": st.table,
                    "tscalars": [_tscalar(s, host_floats, tscalar_names, flags) for s in st.tscalars],
                    "reductions": [{"name": r.name, "op": r.op, "slot": k, "slot_ts": tscalar_names.index(r.name),
                                    "guard": _guard_c(r.guard, flags)} for k, r in enumerate(st.reductions)]}
                   for st in stages],
        "n_tscalars": max(1, len(tscalar_names)),
        "interface": json.dumps({"function": f"{fn}_fused_step", "host": host_floats, "flags": flags,
                                 "buffers": [b["name"] for b in buffers], "spills": len(spills)}, sort_keys=True),
    }


def _guard_c(guard, flags) -> str:
    """A host guard over the flag bits, for per-tensor statements (outside element loops)."""
    if guard == TRUE:
        return "1"
    g = sympy.sympify(guard)
    return _C.doprint(g.xreplace({s: sympy.Symbol(f"OC_FLAG({flags.index(s.name)})") for s in g.free_symbols}))


def _tscalar(s: TensorScalar, host_floats, tscalar_names, flags) -> dict:
    src = {n: f"h[{i}]" for i, n in enumerate(host_floats)}
    src.update({n: f"ts_t[{i}]" for i, n in enumerate(tscalar_names)})
    src.update({n: f"OC_FLAG({i})" for i, n in enumerate(flags)})
    src["numel"] = "(double)numel[t]"
    expr = sympy.sympify(s.expr)
    expr = expr.xreplace({x: sympy.Symbol(src[x.name], **x.assumptions0) for x in expr.free_symbols})
    return {"name": s.name, "slot": tscalar_names.index(s.name), "expr": _D.doprint(expr),
            "guard": _guard_c(s.guard, flags)}


def _spills(prog, stages, stored) -> dict[str, int]:
    """Element locals (temps, a reassigned ``grad``) read in a later stage than the one that sets
    them, with that stage: they go through an fp32 scratch buffer."""
    out: dict[str, int] = {}
    defined: dict[str, int] = {}
    for st in stages:
        local: set[str] = set()
        for s in st.elem:
            for n in sorted(_syms(s.expr)):
                if n in defined and n not in local and n not in stored and n not in out:
                    out[n] = defined[n]
            if isinstance(s, Assign) and s.target not in stored:
                local.add(s.target)
        for n in local:
            defined.setdefault(n, st.index)
    return out


def _variant(prog, st, stmts, stored, scalar_src, spills, name, env, buffer_names, forms) -> dict:
    """Straight-line C for one flag combination: loads, statements, rounding, stores."""
    scalar_src = {**scalar_src, **{f: "1.0" if on else "0.0" for f, on in env.items()}}  # constants here
    scalar_names = set(scalar_src)
    hoisted: dict = {}
    body: list[str] = []
    body_lanes: list[str] = []  # the same, accumulating reductions in 16 lanes (vectorises)
    declared: set[str] = set()
    loads: list[str] = []
    loaded: list[str] = []  # the names the loads define, in order
    spilled_io = False  # reads or writes an fp32 spill buffer
    written: list[str] = []
    reductions: list[dict] = []
    rounded: set[str] = set()
    vbody: list[str] | None = []  # the bf16 SIMD loop's body; None: this variant has none
    later_reads = [set().union(*[_syms(r.expr) for r in stmts[i + 1:]]) for i in range(len(stmts))]
    for i, s in enumerate(stmts):
        for n in sorted(_syms(s.expr)):
            if n in scalar_names or n in declared:
                continue
            if n in spills and spills[n] < st.index:
                loads.append(f"float {n} = oc_ptr_spill_{n}[oc_i];")
                spilled_io = True
            elif n in stored or n == "grad":
                loads.append(f"float {n} = OC_LOAD(oc_ptr_{n}[oc_i]);")
            else:
                raise NotImplementedError(f"{prog.name}: {n} is read before it is set in stage {st.index}")
            loaded.append(n)
            declared.add(n)
        hexpr = _hoist(forms[id(s)], scalar_names, hoisted)
        rhs = cexpr(hexpr)
        vrhs = vexpr(hexpr, {h[0] for h in hoisted.values()})
        if vrhs is None:
            vbody = None
        if isinstance(s, Reduction):
            acc = f"oc_acc_{s.name}"
            reductions.append({"acc": acc, "op": s.op, "name": s.name, "slot": st.reductions.index(s)})
            for a, out in ((acc, body), (f"{acc}_lanes[oc_l]", body_lanes)):
                out.append(f"{a} = oc_nanmax({a}, {rhs});" if s.op == "max" else f"{a} += {rhs};")
            if vbody is not None:  # committed after the NaN check, so a flagged block is not counted twice
                new = f"oc_vnanmax({acc}_v[oc_k], {vrhs})" if s.op == "max" else f"{acc}_v[oc_k] + {vrhs}"
                vbody.append(f"{acc}_next[oc_k] = {new};")
            continue
        t = s.target
        if t in stored and t in later_reads[i]:
            rhs = f"OC_ROUND({rhs})"  # a later read sees the stored (rounded) value
            vrhs = f"oc_vround({vrhs}, &oc_nan)"
            rounded.add(t)
        else:
            rounded.discard(t)
        decl = "" if t in declared else "float "
        declared.add(t)
        body.append(f"{decl}{t} = {rhs};")
        body_lanes.append(body[-1])
        if vbody is not None:
            vbody.append(f"{'oc_vf ' if decl else ''}{t} = {vrhs};")
        if t in stored and t not in written:
            written.append(t)
    # a value already rounded to the storage type is stored exactly (bf16: its top 16 bits)
    stores = [f"oc_ptr_{b}[oc_i] = OC_STORE{'_EXACT' if b in rounded else ''}({b});" for b in stored if b in written]
    grad_passed_through = False
    for n, stage in spills.items():
        if stage == st.index and n in declared:
            stores.append(f"oc_ptr_spill_{n}[oc_i] = {n};")
            spilled_io = True
        elif stage == st.index and n == "grad":  # not reassigned under these flags: pass it through
            stores.append("oc_ptr_spill_grad[oc_i] = OC_LOAD(oc_ptr_grad[oc_i]);")
            spilled_io = grad_passed_through = True
    if spilled_io:
        vbody = None  # fp32 spill buffers are not in the even/odd lane order: scalar loop only
    vector = None if vbody is None else {
        "loads": loaded, "body": vbody, "accs": [r["acc"] for r in reductions],
        "stores": [{"name": b, "bits": f"oc_vbits({b})" if b in rounded else f"oc_vrne({b}, &oc_nan)"}
                   for b in stored if b in written]}
    uses = set(loaded) | set(written) | {n for n in spills if n in declared}
    if grad_passed_through:
        uses |= {"grad"}
    used = sorted(set().union(*[v[2] for v in hoisted.values()]))
    mask = sum(1 << i for i, b in enumerate(buffer_names) if b in uses or b.removeprefix("spill_") in uses)
    return {"name": name, "mask": mask, "flags": ", ".join(f"{k}={int(v)}" for k, v in sorted(env.items())) or "none",
            "scalars": [{"name": n, "src": scalar_src[n]} for n in used],
            "hoisted": [{"name": k, "expr": v} for k, v, _ in hoisted.values()], "loads": loads, "body": body,
            "body_lanes": body_lanes,
            "stores": stores, "reductions": reductions, "uses": sorted(uses), "vector": vector}


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
    from .render import env, header
    body = env().get_template("fused.c.j2").render(**context(prog))
    return header(prog, spec_source, body, key, comment="//") + body

