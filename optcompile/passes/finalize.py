"""The last pass: the IR as the printers want it. Host math moves out of per-element code into
host scalars named after what they are (``one_minus_beta1``), each statement is CSE'd into
temporaries, values used only under a guard get that guard, internal names that collide with a
name the generated code uses step aside, and the program records whether it reads the step."""
from __future__ import annotations

import builtins
import dataclasses
import itertools

import sympy
from sympy.logic.boolalg import BooleanAtom

from ..ir import STEP, TRUE, Assign, HostScalar, Namer, Program, Reduction, TensorScalar
from ..spec import GENERATED_CODE_NAMES, RESERVED_NAMES
from ..step_flags import STEP_FLAGS

# Every name the generated code may use outside its private namespaces (`_…` in Python and Triton,
# `oc_…`/`OC_…` in C): modules and helpers, Python builtins, the step functions' own parameters,
# C keywords, types, functions and macros. An internal name equal to one is renamed (`finalize`).
CODE_NAMES = GENERATED_CODE_NAMES | RESERVED_NAMES | frozenset(dir(builtins)) | {
    "params", "grads", "kahan_comps", *STEP_FLAGS, "state", "group", "numel",
    "sqrt", "sqrtf", "pow", "powf", "exp", "expf", "log", "logf", "fabs", "fabsf", "fmax", "fmaxf", "fmin",
    "fminf", "floor", "ceil", "INFINITY", "NAN", "NULL", "HUGE_VAL", "HUGE_VALF", "int8_t", "int16_t",
    "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t", "uint64_t", "size_t", "float_t", "double_t",
    "memcpy", "malloc", "calloc", "free", "bool", "true", "false", "_Bool",
}


def finalize(prog: Program) -> Program:
    """After the other passes: hoist host math out of per-element code, CSE each statement, place
    host scalars used only under a guard inside that guard, and record whether the step is used."""
    if "finalize" in prog.passes:  # hoisting and CSE are done once; their names are now the program's
        return prog
    host = list(prog.host)
    host_names = prog.host_names()
    taken = host_names | set(prog.stored()) | {"grad", "numel"} | \
        {getattr(s, "name", None) or s.target for s in prog.body}  # a state `h0` is not a hoisted `h0`
    hoisted: dict = {}
    counter = itertools.count()

    def fresh(expr) -> str:
        name = _describe(expr)
        if name is None:
            name = f"h{next(counter)}"
            while name in taken:
                name = f"h{next(counter)}"
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def hoist(expr):
        expr = sympy.sympify(expr)
        if isinstance(expr, (sympy.Symbol, sympy.Number, BooleanAtom)) or not expr.args:
            return expr
        if isinstance(expr, sympy.Expr) and expr.free_symbols and {s.name for s in expr.free_symbols} <= host_names:
            if _trivial_host(expr):
                return expr
            if isinstance(expr, sympy.Pow) and expr.exp == -1:  # keep the division: x/(1 + λ), not x·h
                return sympy.Pow(hoist(expr.base), -1)
            if expr not in hoisted:
                hoisted[expr] = HostScalar(fresh(expr), expr, "float")
                host.append(hoisted[expr])
            return hoisted[expr].sym
        return expr.func(*[hoist(a) for a in expr.args]) if not isinstance(expr, sympy.Piecewise) else \
            sympy.Piecewise(*[(hoist(e), c) for e, c in expr.args])

    body: list = []
    cse_names = Namer({s.name for s in prog.body if hasattr(s, "name")} | {s.target for s in prog.body
                       if isinstance(s, Assign)} | host_names | set(prog.stored()) | {"grad"})
    for stmt in prog.body:
        expr = hoist(stmt.expr)
        if isinstance(stmt, Assign):
            temps, (expr,) = sympy.cse([expr], symbols=(sympy.Symbol(cse_names.fresh("t"), real=True)
                                                        for _ in itertools.count()), order="canonical")
            temps, expr = _inline_reciprocals(temps, expr)
            for name, value in temps:
                body.append(Assign(name, value, stmt.guard, stmt.origin))
            body.append(dataclasses.replace(stmt, expr=expr))
        else:
            body.append(dataclasses.replace(stmt, expr=expr))
    prog = prog.replace(host=tuple(host), body=tuple(_guard_temps(prog, body)))
    prog = _guard_host_scalars(prog)
    used = set().union(*(sympy.sympify(h.expr).free_symbols for h in prog.host)) | \
        set().union(*(sympy.sympify(s.expr).free_symbols for s in prog.body))
    # torch.optim's state_dict layout keeps a step count for every algorithm but Muon
    uses_step = STEP.name in {x.name for x in used} or (prog.state_dict_layout == "torch" and prog.torch_step)
    return _out_of_the_way(prog.replace(uses_step=uses_step))


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _describe(expr, depth: int = 0) -> str | None:
    """A name for a hoisted host value that says what it is (``1 - beta1`` → ``one_minus_beta1``,
    ``eps**2`` → ``eps_squared``), or None when no short one does."""
    expr = sympy.sympify(expr)
    if depth > 2:
        return None
    if isinstance(expr, sympy.Symbol):
        return expr.name
    if expr.is_Integer and 0 <= expr < len(_NUMBER_WORDS):
        return _NUMBER_WORDS[int(expr)]
    name = None
    if isinstance(expr, sympy.Add) and len(expr.args) == 2:
        c, rest = expr.as_coeff_Add()
        if c != 0:  # ``1 - x``, ``x + 1`` (read as ``1 + x``)
            word = _describe(c, depth + 1)
            neg = rest.could_extract_minus_sign()
            other = _describe(-rest if neg else rest, depth + 1)
            name = word and other and f"{word}_{'minus' if neg else 'plus'}_{other}"
    elif isinstance(expr, sympy.Pow):
        base = _describe(expr.base, depth + 1)
        words = {2: "squared", 3: "cubed"}
        if base and expr.exp in words:
            name = f"{base}_{words[int(expr.exp)]}"
        elif base and expr.exp == sympy.Rational(1, 2):
            name = f"sqrt_{base}"
        elif base and expr.exp == -1:
            name = f"inv_{base}"
    elif isinstance(expr, sympy.Mul) and len(expr.args) == 2 and all(isinstance(a, sympy.Symbol) for a in expr.args):
        a, b = expr.args
        name = f"{a.name}_times_{b.name}"
    return name if name and len(name) <= 32 else None


def _out_of_the_way(prog: Program) -> Program:
    """Internal names (lets, branch conditions, hoisted and per-tensor scalars, reductions, temps)
    that equal a name the generated code uses get a trailing ``_``, in every backend: a let ``torch``
    is ``torch_``, a let ``ms`` next to a state ``m`` (whose list is ``ms``) is ``ms_``. API names
    (hyperparameters, flags, states) keep theirs: the DSL keeps them off these names."""
    api = {k for a in prog.args for k in a.keys} | set(prog.stored()) | {"grad", "step", "numel", *STEP_FLAGS} | \
        {s.name for s in prog.scalar_states}
    internal: list[str] = []
    for n in [h.name for h in prog.host] + [s.target if isinstance(s, Assign) else s.name for s in prog.body]:
        if n not in api and n not in internal:
            internal.append(n)
    tscalars = [s.name for s in prog.body if isinstance(s, (Reduction, TensorScalar))]
    buffers = [b.name for b in prog.states + prog.records] + [s.name for s in prog.scalar_states]
    fixed = CODE_NAMES | {f"{b}s" for b in buffers} | {b[len("spill_"):] for b in buffers if b.startswith("spill_")}
    taken = set(api) | set(internal)
    mapping: dict[str, str] = {}
    for _ in range(len(internal) + 1):  # a renamed per-tensor scalar renames its 0-dim tensor `<name>_t`
        vocab = fixed | {f"{mapping.get(t, t)}_t" for t in tscalars}
        clashes = [n for n in internal if mapping.get(n, n) in vocab]
        if not clashes:
            break
        for n in clashes:
            new = mapping.get(n, n) + "_"
            while new in vocab or new in taken:
                new += "_"
            taken.add(new)
            mapping[n] = new
    if not mapping:
        return prog

    def ren(e):
        e = sympy.sympify(e)
        return e.xreplace({x: sympy.Symbol(mapping[x.name], **x.assumptions0) for x in e.free_symbols
                           if x.name in mapping})

    def name(n):
        return mapping.get(n, n)

    host = tuple(dataclasses.replace(h, name=name(h.name), expr=ren(h.expr), guard=ren(h.guard)) for h in prog.host)
    body = tuple(dataclasses.replace(s, expr=ren(s.expr), guard=ren(s.guard), **(
        {"symbol": ren(s.symbol)} if isinstance(s, Assign) else {"name": name(s.name)})) for s in prog.body)
    scalar_states = tuple(dataclasses.replace(s, value=name(s.value)) for s in prog.scalar_states)
    return prog.replace(host=host, body=body, update_lr=None if prog.update_lr is None else ren(prog.update_lr),
                        scalar_states=scalar_states,
                        decay_lr=None if prog.decay_lr is None else ren(prog.decay_lr))


def _guard_temps(prog: Program, body: list) -> list:
    """A temporary or per-tensor value computed for readers that all run under a common guard gets
    that guard too (Ranger's ``slow_t`` only on lookahead steps; Adafactor's factored statistics only
    for params with ndim > 1, where their dims exist): no work whose result is unused."""
    stored = set(prog.stored()) | {"grad"}
    body = list(body)
    for i in reversed(range(len(body))):
        s = body[i]
        if isinstance(s, Assign) and s.target in stored:
            continue
        sym, readers = s.sym, []
        for r in body[i + 1:]:
            if sym in sympy.sympify(r.expr).free_symbols:  # readers of any later version: safe superset
                readers.append(r)
        if not readers:
            continue
        common = set.intersection(*[_conjuncts(r.guard) for r in readers]) - _conjuncts(s.guard) - {TRUE}
        if common:
            body[i] = dataclasses.replace(s, guard=sympy.And(s.guard, *sorted(common, key=str)))
    return body


def _inline_reciprocals(temps, expr):
    """CSE would name ``1/denom`` when two terms divide by it; torch divides (``addcdiv``), and a
    reciprocal followed by a multiply rounds differently, so reciprocals stay inline (negations too:
    ``sub`` and ``alpha=-c`` are free)."""
    keep, sub = [], {}
    for name, value in temps:
        value = value.xreplace(sub)
        if (isinstance(value, sympy.Pow) and value.exp == -1) or (-value).is_Symbol:  # 1/x, -x: not worth a temp
            sub[name] = value
        else:
            keep.append((name, value))
    return keep, expr.xreplace(sub)


def _trivial_host(expr) -> bool:
    """Host expressions printed inline rather than hoisted: ``-lr``, ``2*x``."""
    if isinstance(expr, sympy.Mul) and len(expr.args) == 2:
        a, b = expr.args
        return a.is_Number and isinstance(b, sympy.Symbol)
    return False


def _guard_host_scalars(prog: Program) -> Program:
    """Give each host float used only under a common guard that guard (evaluated as 0 otherwise).
    A scalar state's new value is stored after every step, so it is never guarded."""
    stored = {s.value for s in prog.scalar_states}
    uses: dict[str, list] = {}
    for s in prog.body:
        for sym in sympy.sympify(s.expr).free_symbols:
            uses.setdefault(sym.name, []).append(s.guard)
    for h in prog.host:
        for sym in sympy.sympify(h.expr).free_symbols:
            uses.setdefault(sym.name, []).append(None)  # resolved below, in order
    host = list(prog.host)
    for i in reversed(range(len(host))):
        h = host[i]
        if h.kind != "float" or h.name not in uses or h.name in stored:
            continue
        guards = [g if g is not None else _guard_of_host_user(host, h.name) for g in uses[h.name]]
        if any(g is None or g == TRUE for g in guards):
            continue
        common = set.intersection(*[_conjuncts(g) for g in guards])
        if common:
            host[i] = HostScalar(h.name, h.expr, h.kind, h.origin, sympy.And(*sorted(common, key=str)))
    return prog.replace(host=_in_dependency_order(host))


def _in_dependency_order(host: list) -> tuple:
    """Host scalars ordered so that each comes after what its value *and its guard* read (a
    branch condition is created when the branch is lowered, after the lets used inside it)."""
    names = {h.name for h in host}
    done: list = []
    placed: set = set()

    def place(h, seen=()):
        if h.name in placed:
            return
        deps = {s.name for s in sympy.sympify(h.expr).free_symbols | sympy.sympify(h.guard).free_symbols} & names
        for d in sorted(deps):
            if d not in seen and d != h.name:
                place(next(x for x in host if x.name == d), seen + (h.name,))
        placed.add(h.name)
        done.append(h)

    for h in host:
        place(h)
    return tuple(done)


def _guard_of_host_user(host, name):
    users = [h for h in host if name in {s.name for s in sympy.sympify(h.expr).free_symbols}]
    if not users or any(u.guard == TRUE for u in users):
        return None
    return sympy.And(*[u.guard for u in users]) if len(users) == 1 else None


def _conjuncts(g) -> set:
    return set(g.args) if isinstance(g, sympy.And) else {g}
