"""Spec → IR: classify every value by where it lives, turn SSA versions into variables, and split
host-level ``Piecewise`` into guarded statements (hoisting and CSE come last, in ``passes.finalize``).

The author's algebra is kept: sympy's canonical ordering happens, but nothing is expanded or
factored, so a built-in spec can reproduce optimi's rounding step for step.
"""
from __future__ import annotations

import dataclasses
import keyword

import sympy
from sympy.logic.boolalg import Boolean

from . import ir
from .ir import (DTYPE_EPS, GRAD, NDIM, NUMEL, PARAM, SIZES, STEP, TRUE, Assign, AxisReduction, HostScalar, IsNone,
                 Namer, Origin, Program, Reduction, StateBuffer, TensorFunction, TensorScalar, axes_of, satisfiable)
from .spec import GENERATED_CODE_NAMES, RESERVED_NAMES, OptimizerSpec, SpecError

def lower(spec: OptimizerSpec) -> Program:
    """The IR of a spec exactly as written: no weight decay, Kahan or accumulation yet."""
    file = spec.file
    state_syms = {st.symbol: st for st in spec.states}
    buffers = {PARAM} | set(state_syms)
    arg_syms = {s for a in spec.args for s in a.symbols}
    scalar_syms = {st.symbol for st in spec.states if st.scalar}  # per-param host values, stored as fp32
    sizes = {sympy.Symbol(n, integer=True, positive=True) for n in SIZES}
    host_syms = set(arg_syms) | {STEP, NDIM, DTYPE_EPS} | sizes | scalar_syms
    tscalar_syms: set[sympy.Symbol] = {NUMEL}
    if not spec._updated:
        raise SpecError("the spec never calls spec.update(direction, lr=...) (nor, with weight_decay=None, "
                        "spec.set_param(value)): it never writes the param", file, spec.origin.line)
    if "lr" not in {a.name for a in spec.args}:
        raise SpecError("missing required hyperparameter `lr`: declare lr = spec.hyper('lr', domain=Interval(0, oo))",
                        file, spec.origin.line)
    if spec.weight_decay is not None and "weight_decay" not in {a.name for a in spec.args}:
        raise SpecError(f"weight_decay={spec.weight_decay!r} needs a `weight_decay` hyperparameter: call "
                        "spec.weight_decay_hyper(default), or pass weight_decay=None for no decay", file,
                        spec.origin.line)

    stmts = _resolve_versions(spec, buffers)
    bool_syms = {s for a in spec.args if a.kind == "flag" for s in a.symbols}
    host: list[HostScalar] = []
    body: list = []
    _check_state_lists(spec)
    names = Namer({h.name for h in host} | {s.name for s in host_syms} | {st.name for st in spec.states}
                   | {"param", "grad"} | set(spec.lets) | {st.target.name for st in stmts})
    update_lr = decay_lr = None
    current: dict = {}  # scalar state → the symbol of its latest value

    def where(stmt) -> Origin:
        return Origin(file, stmt.origin.line)

    def guard_of(cond, stmt):
        return _host_guard(cond, host, host_syms, names, file, stmt.origin.line)

    for stmt in stmts:
        expr = stmt.expr
        syms = expr.free_symbols
        if stmt.kind == "let":
            if syms <= host_syms:
                # a sympy Symbol is also a Boolean: a let that merely renames a hyper is a float
                kind = "bool" if (isinstance(expr, Boolean) and not isinstance(expr, sympy.Symbol)) or \
                    expr in bool_syms else "float"
                if kind == "bool":
                    bool_syms.add(stmt.target)
                host.append(HostScalar(stmt.target.name, expr, kind, where(stmt)))
                host_syms.add(stmt.target)
            elif syms <= host_syms | tscalar_syms:
                if isinstance(expr, Boolean) and not isinstance(expr, sympy.Symbol):
                    raise SpecError("a condition on a per-tensor reduction cannot be lowered (a named "
                                    "condition is a host value); express the choice arithmetically, e.g. "
                                    "with Max/Min/sign", file, stmt.origin.line, expr)
                body.append(TensorScalar(stmt.target.name, expr, TRUE, where(stmt)))
                tscalar_syms.add(stmt.target)
            else:
                _check_elementwise_choices(expr, tscalar_syms, file, stmt.origin.line)
                if isinstance(expr, Boolean) and not isinstance(expr, sympy.Symbol) and \
                        not syms & (tscalar_syms | {GRAD, PARAM} | set(state_syms)):
                    raise SpecError("a boolean let must depend only on hyperparameters and step", file,
                                    stmt.origin.line, expr)
                body.extend(_split_piecewise(stmt.target, expr, TRUE, stmt, host_syms, guard_of, names))
        elif stmt.kind == "scalar":
            host.append(_scalar_update(spec, stmt, host_syms, scalar_syms, current, guard_of))
            host_syms.add(stmt.target)
            scalar_syms.add(stmt.target)
            current[stmt.state] = stmt.target
        elif stmt.kind == "matrix_fn":
            body.extend(_tensor_function(spec, stmt, host_syms, names, where(stmt), guard_of))
        elif stmt.kind == "reduce":
            op = _reduction_op(spec, stmt)
            if not (syms - host_syms - tscalar_syms):
                # the same value in every element: sum(c) = c·numel, mean(c) = max(c) = c
                value = expr * NUMEL if op == "sum" else expr
                if value.free_symbols <= host_syms:
                    host.append(HostScalar(stmt.target.name, value, "float", where(stmt)))
                    host_syms.add(stmt.target)
                else:
                    body.append(TensorScalar(stmt.target.name, value, TRUE, where(stmt)))
                    tscalar_syms.add(stmt.target)
                continue
            body.append(Reduction(stmt.target.name, op, expr, TRUE, where(stmt)))
            tscalar_syms.add(stmt.target)
        else:  # state / update / param writes
            guard = guard_of(stmt.when, stmt) if stmt.when is not TRUE and stmt.when != TRUE else TRUE
            if stmt.kind == "state":
                st = state_syms[stmt.target]
                if st.when is not True and st.when != TRUE:
                    guard = sympy.And(guard, guard_of(st.when, stmt))
            if stmt.kind == "update":
                update_lr, decay_lr = stmt.lr, stmt.decay_lr
                if (stmt.lr.free_symbols | (decay_lr.free_symbols if decay_lr is not None else set())) - \
                        host_syms - tscalar_syms:
                    raise SpecError("the learning rate of spec.update must not depend on param, grad or states",
                                    file, stmt.origin.line, stmt.lr)
            _check_elementwise_choices(expr, tscalar_syms, file, stmt.origin.line)
            split = _split_piecewise(stmt.target, expr, guard, stmt, host_syms, guard_of, names)
            if stmt.kind == "update":
                split = [dataclasses.replace(a, role="update") if a.target == "param" else a for a in split]
            body.extend(split)

    for st in spec.states:
        when = sympy.sympify(_when_expr(st.when))
        if _expand(when, {h.sym: h.expr for h in host}).free_symbols & {STEP}:
            raise SpecError(f"state {st.name!r}: when= decides once, at allocation, whether the buffer exists, so it "
                            "may depend on hyperparameters only, not on the step; put a step condition on the "
                            "writes instead (spec.assign(..., when=...))", file, st.origin.line, when)
        bad = st.init.free_symbols - arg_syms - {PARAM, GRAD}
        if bad:
            raise SpecError(f"state {st.name!r}: init may use only param, grad and hyperparameters, not "
                            f"{', '.join(sorted(s.name for s in bad))}", file, st.origin.line, st.init)
    _check_shapes(spec, body, host_syms | tscalar_syms)
    _check_host_conditions(spec, host, tscalar_syms)
    _check_conditional_reads(spec, host, body)
    _check_optional_reads(spec, host, body)
    host_defs = {h.sym: h.expr for h in host}
    buffers = [StateBuffer(st.name, _expand(st.init, host_defs), _expand(_when_expr(st.when), host_defs), "param",
                           Origin(file, st.origin.line), st.axes, st.nonnegative) for st in spec.states]
    states = tuple(b for b, st in zip(buffers, spec.states) if not st.scalar)
    read = set().union(*[sympy.sympify(h.expr).free_symbols for h in host],
                       *[sympy.sympify(s.expr).free_symbols for s in body], sympy.sympify(update_lr or 0).free_symbols)
    live = {st.symbol for st in spec.states if st.scalar and (st.symbol in read or st.symbol in current)}
    records = tuple(b for b, st in zip(buffers, spec.states) if st.scalar and st.symbol not in live)
    scalar_states = []
    for b, st in zip(buffers, spec.states):
        if st.symbol in live:
            if b.when != TRUE:
                raise SpecError(f"scalar state {st.name!r} is read or assigned by the step, so it always exists: "
                                "when= is for tensor states and records", file, st.origin.line, st.when)
            scalar_states.append(ir.ScalarState(st.name, b.init, current.get(st.symbol, st.symbol).name, b.origin,
                                                st.precision))
    # the flag that switches a proximal decay to decoupled (Adan's ``adam_wd``), as the spec's own symbol
    decoupled_flag = next((sym for a in spec.args if a.name == spec.decoupled_flag for sym in a.symbols), None)
    args = tuple(ir.Arg(a.name, a.kind, a.default, a.group_keys, a.domain, a.labels, a.doc, "", a.type, a.after,
                        a.errors, optional_keys=a.optional_keys, choices=a.choices) for a in spec.args)
    prog = Program(name=spec.name, functional=spec.functional, doc=spec.doc, spec_path=file, args=args,
                   states=states, host=tuple(host), body=tuple(body), update_lr=update_lr, decay_lr=decay_lr,
                   weight_decay=spec.weight_decay, kahan_default=spec.kahan_sum, uses_step=False,
                   decouple_wd_default=bool(spec.decouple_wd), decoupled_flag=decoupled_flag,
                   state_order=tuple(st.name for st in spec.states),
                   group_constants=tuple(spec.group_constants.items()), records=records, signature=spec.order,
                   state_dict_layout=spec.state_dict, torch_step=spec.torch_step, scalar_states=tuple(scalar_states),
                   param_ndims=spec.param_ndims, param_ndim_error=spec.param_ndim_error,
                   views=tuple((name, expr) for name, (expr, _) in spec.views.items()))
    _check_unused(spec, prog)
    return prog


# ── helpers ────────────────────────────────────────────────────────────────────────────────────
def _tensor_function(spec: OptimizerSpec, stmt, host_syms: set, names: Namer, origin: Origin, guard_of) -> list:
    """``spec.matrix_fn(fn, x, *args)``: the input as an element temp (so the stage computing it is
    an ordinary elementwise one), then the tensor function reading it, a stage boundary."""
    decl = next(m for m in spec.matrix_fns if m.symbol == stmt.target)
    x, *args = stmt.expr.args
    where = (spec.file, stmt.origin.line)
    if not spec.param_ndims:
        raise SpecError(f"spec.matrix_fn({decl.fn}, ...): declare the param ranks the function takes with "
                        "spec.param_ndim(...) (Muon: spec.param_ndim(2)), so other params get a clear error", *where)
    for a in args:
        if sympy.sympify(a).free_symbols - host_syms:
            bad = ", ".join(sorted(v.name for v in sympy.sympify(a).free_symbols - host_syms))
            raise SpecError(f"spec.matrix_fn({decl.fn}, ...): its extra arguments are host values "
                            f"(hyperparameters, host lets, numbers), not per-element or per-tensor ones ({bad})", *where)
    if not sympy.sympify(x).free_symbols - host_syms:
        raise SpecError(f"spec.matrix_fn({decl.fn}, x): x is the same in every element; the function takes an "
                        "element value (a tensor of the param's shape)", *where)
    if sympy.sympify(x).atoms(AxisReduction):
        raise SpecError(f"spec.matrix_fn({decl.fn}, x): x may not be of a reduced shape (an axis reduction)", *where)
    inp = sympy.Symbol(names.fresh(f"{decl.fn}_in"), real=True)
    return [*_split_piecewise(inp, x, TRUE, stmt, host_syms, guard_of, names),
            TensorFunction(stmt.target.name, decl.fn, sympy.Tuple(inp, *args), TRUE, origin, decl.source,
                           decl.batched)]


def _check_state_lists(spec: OptimizerSpec) -> None:
    """The functional form and every step function take a state's buffers as one list named
    ``<state>s`` (optimi's ``exp_avgs``): that name must be free, as the API names are."""
    api = {s.name: a.origin for a in spec.args for s in a.symbols} | {st.name: st.origin for st in spec.states}
    for st in spec.states:
        lst = f"{st.name}s"
        why = ("is a Python keyword" if keyword.iskeyword(lst) else
               f"is also the name declared at line {api[lst].line}" if lst in api else
               "is a name the runtime or the generated code uses" if lst in RESERVED_NAMES | GENERATED_CODE_NAMES
               else None)
        if why:
            raise SpecError(f"state {st.name!r}: its buffers are passed as a list named {lst!r}, which {why}; "
                            f"rename {'one of them' if lst in api else 'the state'}", spec.file, st.origin.line)


def _check_elementwise_choices(expr, tscalar_syms: set, file: str, line: int) -> None:
    """A per-element Piecewise may branch on host values (a guard) or on elements (a where), but
    not on a per-tensor value: no backend has a per-tensor select inside its element loop."""
    for pw in sympy.preorder_traversal(expr):
        if isinstance(pw, sympy.Piecewise):
            for _, cond in pw.args:
                if sympy.sympify(cond).free_symbols & tscalar_syms:
                    raise SpecError("an elementwise Piecewise cannot branch on a per-tensor value (a reduction or "
                                    "numel); compute a "
                                    "per-tensor factor instead, e.g. f = spec.let('f', Piecewise((1, r > 1), "
                                    "(0, True))) and use f*a + (1 - f)*b", file, line, cond)


def _scalar_update(spec: OptimizerSpec, stmt, host_syms: set, exact: set, current: dict, guard_of) -> HostScalar:
    """A scalar state's new value as a host scalar, computed as torch's op on its 0-dim fp32 tensor
    computes it: each host operand rounded to fp32 (scalar states already are), the result rounded
    to fp32; an fp64 one (``precision="fp64"``) in Python floats, which are doubles. Under ``when=`` the value is kept where the condition is false."""
    name = next(st.name for st in spec.states if st.symbol == stmt.state)
    bad = stmt.expr.free_symbols - host_syms
    if bad:
        raise SpecError(f"scalar state {name!r} holds one value per param: its new value may read "
                        "hyperparameters, the step, host lets and scalar states, not per-element or per-tensor "
                        f"values ({', '.join(sorted(s.name for s in bad))})", spec.file, stmt.origin.line, stmt.expr)
    st = next(st for st in spec.states if st.symbol == stmt.state)
    value = stmt.expr if st.precision == "fp64" else ir.Fp32(_fp32_operands(stmt.expr, exact))  # fp64: Python floats
    if stmt.when != TRUE:
        guard = guard_of(stmt.when, stmt)
        value = sympy.Piecewise((value, guard), (current.get(stmt.state, stmt.state), True))
    return HostScalar(stmt.target.name, value, "float", Origin(spec.file, stmt.origin.line))


def _fp32_operands(expr, exact: set):
    """``expr`` with every host symbol and non-integer constant rounded to fp32 (``ir.Fp32``), as
    torch rounds a Python scalar to a float32 tensor's dtype; exponents and conditions are kept."""
    if expr in exact or isinstance(expr, Boolean) and not isinstance(expr, sympy.Symbol):
        return expr
    if isinstance(expr, sympy.Symbol):
        return ir.Fp32(expr)
    if expr.is_Number:
        return expr if expr.is_Integer or expr.is_infinite else ir.Fp32(expr)
    if isinstance(expr, sympy.Pow):
        return sympy.Pow(_fp32_operands(expr.base, exact), expr.exp)
    if isinstance(expr, sympy.Piecewise):
        return sympy.Piecewise(*[(_fp32_operands(v, exact), c) for v, c in expr.args])
    if not expr.args:
        return expr
    return expr.func(*[_fp32_operands(a, exact) for a in expr.args])


def _reduction_op(spec: OptimizerSpec, stmt) -> str:
    return next(r.op for r in spec.reductions if r.symbol == stmt.target)


def _expand(expr, defs: dict):
    """Host lets replaced by their definitions: state init runs from param-group values alone."""
    expr = sympy.sympify(expr)
    for _ in range(16):
        new = expr.xreplace(defs)
        if new == expr:
            return expr
        expr = new
    return expr


def _when_expr(when):
    return TRUE if when is True else when


def _host_guard(cond, host: list, host_syms: set, names: Namer, file: str, line: int):
    """A host condition as a boolean symbol: itself if already one, else a new host scalar."""
    cond = sympy.sympify(cond)
    if cond == TRUE or cond is True:
        return TRUE
    if cond.free_symbols - host_syms:
        bad = ", ".join(sorted(s.name for s in cond.free_symbols - host_syms))
        raise SpecError(f"condition uses per-element or per-tensor values ({bad}); a `when=` or branch "
                        "condition must depend only on hyperparameters and step", file, line, cond)
    if isinstance(cond, sympy.Symbol):
        return cond
    if isinstance(cond, sympy.Not) and isinstance(cond.args[0], sympy.Symbol):
        return cond
    for h in host:
        if h.kind == "bool" and h.expr == cond:
            return h.sym
    h = HostScalar(names.fresh("cond"), cond, "bool", Origin(file, line))
    host.append(h)
    host_syms.add(h.sym)
    return h.sym


def _nest_host_tails(expr, host_syms):
    """``Piecewise((a, g > 0), (b, beta > 0.5), (c, True))``: the branches from the first host-only
    condition after an elementwise one become a nested Piecewise, which then splits into guarded
    statements like any host Piecewise (the elementwise ``where`` keeps its tensor conditions)."""
    def nest(pw):
        args = list(pw.args)
        for i, (_, cond) in enumerate(args):
            if i and cond != TRUE and cond.free_symbols <= host_syms and \
                    not all(c.free_symbols <= host_syms for _, c in args[:i]):
                return sympy.Piecewise(*args[:i], (sympy.Piecewise(*args[i:]), True))
        return pw
    return expr.replace(lambda e: isinstance(e, sympy.Piecewise), nest)


def _split_piecewise(target: sympy.Symbol, expr, guard, stmt, host_syms, guard_of, names: Namer) -> list:
    """``x = Piecewise((a, c1), (b, True))`` with host conditions → guarded assignments."""
    expr = _nest_host_tails(sympy.sympify(expr), host_syms)
    origin = Origin(stmt.origin.file, stmt.origin.line)
    out: list = []
    # a host-conditioned Piecewise inside a larger expression: one statement per branch
    nested = [p for p in sympy.preorder_traversal(expr) if isinstance(p, sympy.Piecewise) and p is not expr
              and all(c.free_symbols <= host_syms for _, c in p.args)]
    if nested:
        pw = nested[0]
        taken = sympy.false
        for value, cond in pw.args:
            g = guard_of(cond, stmt) if cond != TRUE else TRUE
            branch = sympy.And(guard, g, sympy.Not(taken)) if taken != sympy.false else sympy.And(guard, g)
            out.extend(_split_piecewise(target, expr.xreplace({pw: value}), branch, stmt, host_syms, guard_of, names))
            taken = sympy.Or(taken, g)
        return out
    if isinstance(expr, sympy.Piecewise) and all(c.free_symbols <= host_syms for _, c in expr.args):
        taken = sympy.false
        for value, cond in expr.args:
            g = guard_of(cond, stmt) if cond != TRUE else TRUE
            branch = sympy.And(guard, g, sympy.Not(taken)) if taken != sympy.false else sympy.And(guard, g)
            out.extend(_split_piecewise(target, value, branch, stmt, host_syms, guard_of, names))
            taken = sympy.Or(taken, g)
        return out
    out.append(Assign(target, expr, sympy.simplify_logic(guard) if guard != TRUE else TRUE, origin))
    return out


def _resolve_versions(spec: OptimizerSpec, buffers: set) -> list:
    """Rewrite SSA values (``m = spec.assign(m, ...)``) as reads of mutable buffers, inserting a
    snapshot temp where the author reads a value after its buffer was overwritten."""
    from .spec import Stmt
    version_of: dict = {b: (b, -1) for b in buffers}  # symbol → (buffer, index of defining stmt)
    version_of.update(spec.alias)
    writes: dict = {}  # buffer → indices of writing stmts
    for i, st in enumerate(spec.stmts):
        if st.kind in ("state", "update", "param"):
            writes.setdefault(st.target, []).append(i)

    def stale(sym, at: int) -> bool:
        buf, defined = version_of[sym]
        return any(defined < w < at for w in writes.get(buf, ()))

    snapshots: dict = {}  # version symbol → (snapshot name, index of the overwriting write)
    taken = set(spec._names) | spec._made  # a snapshot `m_old` must not be a name the user declared
    for i, st in enumerate(spec.stmts):
        exprs = [st.expr] + ([st.lr] if st.lr is not None else [])
        for sym in set().union(*(e.free_symbols for e in exprs)):
            if sym in version_of and stale(sym, i) and sym not in snapshots:
                buf, defined = version_of[sym]
                first_write = min(w for w in writes[buf] if w > defined)
                label = "old" if defined < 0 else f"v{defined}"
                name = f"{buf.name}_{label}"
                while name in taken:
                    name += "_"
                taken.add(name)
                snapshots[sym] = (name, first_write)
    out = []
    for i, st in enumerate(spec.stmts):
        for sym, (name, at) in sorted(snapshots.items(), key=lambda kv: kv[1][0]):
            if at == i:
                out.append(Stmt(sympy.Symbol(name, real=True), version_of[sym][0], st.origin, "let"))
                spec.lets.setdefault(name, st.origin)
        sub = {}
        for sym in set(st.expr.free_symbols) | (st.lr.free_symbols if st.lr is not None else set()):
            if sym in snapshots and stale(sym, i):
                sub[sym] = sympy.Symbol(snapshots[sym][0], real=True)
            elif sym in version_of:
                sub[sym] = version_of[sym][0]
        out.append(Stmt(st.target, st.expr.xreplace(sub), st.origin, st.kind, st.when,
                        st.lr.xreplace(sub) if st.lr is not None else None,
                        st.decay_lr.xreplace(sub) if st.decay_lr is not None else None, st.state))
    return out


def _check_shapes(spec: OptimizerSpec, body, scalar_syms) -> None:
    """Values of a reduced shape (``spec.mean(x, axis=k)``, states with ``axis=``) broadcast against
    full-shape ones; a state is updated in place, so what it is assigned must fit its shape, and an
    axis reduction reduces an element value (of a value the same in every element it would be that
    value, or a multiple of a dim's size)."""
    known = {"param": frozenset(), "grad": frozenset()}
    known |= {st.name: frozenset(st.axes) for st in spec.states}
    for s in body:
        expr = sympy.sympify(s.expr)
        for red in expr.atoms(AxisReduction):
            if not red.args[0].free_symbols - scalar_syms:
                raise SpecError(f"spec.{red.op}(..., axis={red.axis}) of a value that is the same in every element; "
                                "reduce an element value (param, grad, a state or math on them)", spec.file,
                                s.origin.line, red.args[0])
        if isinstance(s, Reduction):
            continue
        if isinstance(s, TensorFunction):  # of a full-shape input (checked in _tensor_function)
            known[s.name] = frozenset()
            continue
        axes = axes_of(expr, known)
        target = s.name if isinstance(s, TensorScalar) else s.target
        if isinstance(s, Assign) and target in known and target not in ("param", "grad") and axes is not None:
            want = known[target]
            if not want <= axes:
                shape = lambda a: f"reduced along {sorted(a)}" if a else "the param's shape"  # noqa: E731
                raise SpecError(f"state {target!r} has {shape(want)}, but the value assigned has {shape(axes)} "
                                "(a state is updated in place: reduce the value with spec.mean/sum/max(..., axis=) "
                                "to the state's shape)", spec.file, s.origin.line, expr)
            continue
        if isinstance(s, Assign) and target in ("param", "grad"):
            continue
        if isinstance(s, Assign):  # a temp set in several branches: the larger shape
            axes = axes if axes is not None else frozenset()
            known[target] = known[target] & axes if target in known else axes


def _check_host_conditions(spec: OptimizerSpec, host, tscalar_syms) -> None:
    for h in host:
        if sympy.sympify(h.expr).free_symbols & tscalar_syms:
            raise SpecError("a per-tensor reduction cannot be used in a host value or condition", spec.file,
                            h.origin.line, h.expr)


def _check_conditional_reads(spec: OptimizerSpec, host, body) -> None:
    """A state with ``when=c`` exists only when ``c`` holds: every read must be guarded by ``c``.
    Guards are compared in terms of hyperparameters, so ``nesterov & (momentum > 0)`` implies
    ``momentum > 0``."""
    bools = {h.sym: h.expr for h in host if h.kind == "bool"}

    def expand(e):
        e = sympy.sympify(e)
        for _ in range(len(bools) + 1):
            e, before = e.xreplace(bools), e
            if e == before:
                break
        return e

    for st in spec.states:
        if st.when is True or st.when == TRUE:
            continue
        when = sympy.sympify(st.when)
        for s in body:
            if st.symbol not in sympy.sympify(s.expr).free_symbols:
                continue
            if satisfiable(sympy.And(expand(s.guard), sympy.Not(expand(when)))):
                raise SpecError(f"state {st.name!r} exists only when `{when}`, but is read here where that may "
                                f"be false; guard the read with when= or a Piecewise on `{when}`",
                                spec.file, s.origin.line, s.expr)


def _reads_under(expr, ctx, sym) -> list:
    """The conditions under which ``expr`` reads ``sym``: ``ctx``, narrowed inside each ``Piecewise``
    branch by that branch's condition (and the negation of the earlier ones); testing ``IsNone(sym)``
    is not a read."""
    expr = sympy.sympify(expr)
    if sym not in expr.free_symbols or isinstance(expr, IsNone):
        return []
    if expr == sym:
        return [ctx]
    if isinstance(expr, sympy.Piecewise):
        out, taken = [], sympy.false
        for value, cond in expr.args:
            out += _reads_under(cond, sympy.And(ctx, sympy.Not(taken)), sym)
            out += _reads_under(value, sympy.And(ctx, cond, sympy.Not(taken)), sym)
            taken = sympy.Or(taken, cond)
        return out
    return [c for a in expr.args for c in _reads_under(a, ctx, sym)]


def _check_optional_reads(spec: OptimizerSpec, host, body) -> None:
    """An optional hyperparameter (default None) may be read only where ``spec.is_none(x)`` is false:
    in a ``Piecewise`` branch or under a ``when=`` that excludes None. Else the host code would do
    arithmetic on None (a TypeError mid-step) and the kernels would read a placeholder."""
    optional = [(a, s) for a in spec.args for s in a.symbols
                if a.kind.startswith("optional_") or s.name in a.optional_keys]
    if not optional:
        return
    bools = {h.sym: h.expr for h in host if h.kind == "bool"}

    def expand(e):
        e = sympy.sympify(e)
        for _ in range(len(bools) + 1):
            e, before = e.xreplace(bools), e
            if e == before:
                break
        return e

    sites = [(h.expr, h.guard, h.origin.line) for h in host] + [(s.expr, s.guard, s.origin.line) for s in body]
    sites += [(st.init, _when_expr(st.when), st.origin.line) for st in spec.states]
    for a, sym in optional:
        for expr, guard, line in sites:
            for ctx in _reads_under(expr, guard, sym):
                if satisfiable(sympy.And(expand(ctx), IsNone(sym))):
                    raise SpecError(f"hyperparameter {sym.name!r} may be None (its default), but is read here "
                                    f"where it can be; read it under spec.is_none({sym.name}) being false, e.g. "
                                    f"Piecewise((..., spec.is_none({sym.name})), (<uses {sym.name}>, True)) or "
                                    f"when=~spec.is_none({sym.name})", spec.file, line, expr)


def _check_unused(spec: OptimizerSpec, prog: Program) -> None:
    """Every declared argument and state must be used: an unused one is almost always a typo."""
    used = set()
    for h in prog.host:
        used |= sympy.sympify(h.expr).free_symbols
    for s in prog.body:
        used |= sympy.sympify(s.expr).free_symbols | sympy.sympify(s.guard).free_symbols
    for st in prog.states + prog.records:
        used |= sympy.sympify(st.init).free_symbols | sympy.sympify(st.when).free_symbols
    for st in prog.scalar_states:
        used |= sympy.sympify(st.init).free_symbols
    used |= sympy.sympify(prog.update_lr or 0).free_symbols | sympy.sympify(prog.decay_lr or 0).free_symbols
    for _, expr in prog.views:
        used |= sympy.sympify(expr).free_symbols
    used_names = {s.name for s in used}
    for a in spec.args:
        if a.name == "weight_decay" and spec.weight_decay is not None:
            continue
        if a.name == spec.decoupled_flag:
            continue
        if not any(s.name in used_names for s in a.symbols):
            raise SpecError(f"argument {a.name!r} is declared but never used", spec.file, a.origin.line)
    for st in spec.states:
        if st.name not in used_names and not st.scalar:
            raise SpecError(f"state {st.name!r} is declared but never read", spec.file, st.origin.line)
