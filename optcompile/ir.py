"""The IR: what one optimizer step computes, with nothing left of the DSL's Python.

Three levels, by where a value lives:

* ``HostScalar`` — depends only on hyperparameters, flags and the step: computed once per step
  per param group on the host (bias corrections, ρ_t, weight-decay factors, branch conditions).
* ``TensorScalar`` and ``Reduction`` — one value per parameter tensor (StableAdamW's RMS).
* ``Assign`` — per element. Statements run in order with *mutable* semantics: ``param``, ``grad``,
  states and temps are variables; an assignment to ``param`` or a state stores it, and a later read
  sees the stored value (rounded to the buffer's dtype). ``guard`` is a host boolean: the statement
  only runs when it is true (eager: ``if``; Triton: ``tl.constexpr``; C: a hoisted branch).

Programs are frozen; passes return new ones (``Program.replace``).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Union

import sympy

PARAM = sympy.Symbol("param", real=True)
GRAD = sympy.Symbol("grad", real=True)
STEP = sympy.Symbol("step", integer=True, positive=True)
NUMEL = sympy.Symbol("numel", integer=True, positive=True)
KAHAN_COMP = sympy.Symbol("kahan_comp", real=True)
NDIM = sympy.Symbol("ndim", integer=True, nonnegative=True)  # the param's number of dims (structural)
DTYPE_EPS = sympy.Symbol("dtype_eps", real=True, positive=True)  # torch.finfo(param.dtype).eps
SIZES = ("size0", "size1", "size2", "size3")  # the param's dims (spec.size(k)): structural, one per call
STRUCTURE = (NDIM.name, DTYPE_EPS.name, *SIZES)  # host inputs the runtime takes from the tensors of one call
TRUE = sympy.true


class Clamp(sympy.Function):
    """``Clamp(x, lo, hi)``, torch.clamp's semantics in every backend: ``min(max(x, lo), hi)``
    where a NaN ``x``, ``lo`` or ``hi`` gives NaN (the DSL's ``Max``/``Min`` ignore NaN operands,
    so a clamp is its own form) and ``lo > hi`` gives ``hi``. ``lo = -oo`` or ``hi = oo``: that side
    is open. The DSL writes it ``clamp(x, lo, hi)``."""

    nargs = 3

    @classmethod
    def eval(cls, x, lo, hi):
        if lo is sympy.S.NegativeInfinity and hi is sympy.S.Infinity:
            return x
        if all(a.is_number for a in (x, lo, hi)):
            if sympy.nan in (x, lo, hi):
                return sympy.nan
            return sympy.Min(sympy.Max(x, lo), hi)
        return None

    def _eval_is_real(self):
        return self.args[0].is_real


class AxisReduction(sympy.Function):
    """``AxisMean(x, k)``, ``AxisSum(x, k)``, ``AxisMax(x, k)``: ``x`` reduced along dim ``k`` of the
    tensor being stepped, keeping that dim as size 1 (``torch.mean(x, dim=k, keepdim=True)``). An
    element value of a reduced shape, which broadcasts against full-shape values; the DSL writes it
    ``spec.mean(x, axis=k)``."""

    nargs = 2
    op = ""

    @classmethod
    def of(cls, op: str, x, axis: int):
        return {"sum": AxisSum, "mean": AxisMean, "max": AxisMax}[op](x, sympy.Integer(axis))

    @property
    def axis(self) -> int:
        return int(self.args[1])

    def _eval_is_real(self):
        return self.args[0].is_real


class AxisSum(AxisReduction):
    op = "sum"


class AxisMean(AxisReduction):
    op = "mean"


class AxisMax(AxisReduction):
    op = "max"


def axes_of(expr, known: dict) -> frozenset | None:
    """The dims an element value is reduced along (``frozenset()``: the param's shape), from the
    axes of the buffers and temps it reads (``known``: name → axes); None: the same in every element
    (host and per-tensor values), which broadcasts to any shape. Operands broadcast: the result has
    the dims reduced in every operand that has a shape."""
    expr = sympy.sympify(expr)
    if isinstance(expr, sympy.Symbol):
        return known.get(expr.name)
    if isinstance(expr, AxisReduction):
        inner = axes_of(expr.args[0], known)
        return None if inner is None else inner | {expr.axis}
    if isinstance(expr, sympy.Piecewise):
        parts = [p for v, c in expr.args for p in (axes_of(v, known), axes_of(c, known))]
    else:
        parts = [axes_of(a, known) for a in expr.args]
    shaped = [p for p in parts if p is not None]
    return frozenset.intersection(*shaped) if shaped else None


class IsNone(sympy.logic.boolalg.BooleanFunction):
    """``IsNone(x)``: whether the optional hyperparameter ``x`` (default ``None``) is None in this
    param group; a host condition (``spec.is_none(x)``), printed only by the host printer."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        return None


class IsChoice(sympy.logic.boolalg.BooleanFunction):
    """``IsChoice(x, String(c))``: whether the choice hyperparameter ``x`` (``spec.hyper(...,
    choices=)``) is ``c`` in this param group; a host condition, printed only by the host printer."""

    nargs = 2

    @classmethod
    def eval(cls, x, choice):
        return None


class Fp32(sympy.Function):
    """``Fp32(x)``: ``x`` rounded to the nearest fp32 (ties to even; ±inf past its range). Lowering
    wraps a scalar state's new value in it, and each host operand of that value, so the assignment
    computes as torch's op on the 0-dim fp32 tensor the state is (NAdam's ``mu_product *= mu``).
    Host values only; printed by the host printer alone."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if isinstance(x, Fp32):
            return x
        return None

    def _eval_is_real(self):
        return self.args[0].is_real


@dataclass(frozen=True)
class Origin:
    """Where an IR value comes from: a line of the spec file, or the pass that added it."""

    file: str = ""
    line: int = 0
    added_by: str = ""  # the pass (``weight_decay``), for a value no spec line wrote

    def __bool__(self) -> bool:
        return bool(self.file or self.added_by)

    def __str__(self) -> str:
        if self.added_by:
            return f"pass {self.added_by}"
        return f"{self.file}:{self.line}" if self.file else ""

    def sort_key(self) -> tuple:
        return (not self.added_by, self.added_by, self.file, self.line)


NO_ORIGIN = Origin()


class Namer:
    """Fresh names ``prefix0``, ``prefix1`` … that none of ``taken`` (nor an earlier one) is."""

    def __init__(self, taken):
        self.taken = set(taken)

    def fresh(self, prefix: str) -> str:
        for i in itertools.count():
            name = f"{prefix}{i}"
            if name not in self.taken:
                self.taken.add(name)
                return name


def satisfiable(cond) -> bool:
    """Whether a host condition can hold, with each comparison (``momentum > 0``) a proposition
    and its negation (``momentum <= 0``) that proposition's negation; sympy's ``satisfiable``
    alone treats the two as unrelated. Unsure: True."""
    cond = sympy.sympify(cond)
    props: dict = {}
    for rel in sorted(cond.atoms(sympy.core.relational.Relational), key=sympy.default_sort_key):
        known = next((k for k in props if k == rel.negated or k == rel.reversed.negated), None)
        props[rel] = ~props[known] if known is not None else sympy.Dummy("c")
    try:
        return bool(sympy.satisfiable(cond.xreplace(props)))
    except (TypeError, ValueError, NotImplementedError):
        return True


@dataclass(frozen=True)
class Arg:
    """A constructor argument. ``keys`` are the param_group keys (``betas`` → beta1, beta2)."""

    name: str
    kind: str  # "float" | "tuple" | "flag" | "optional_float" | "optional_int" (None allowed) | "choice"
    default: Any
    keys: tuple[str, ...]
    domain: Any = None
    labels: tuple[str, ...] = ()
    doc: str = ""
    injected_by: str = ""  # the pass that added it, "" for spec arguments
    type: str = "float"  # annotation of each value: float, int or bool
    after: str | None = None  # placed right after this argument (e.g. SGD's torch_init after max_lr)
    errors: tuple[str, ...] = ()  # torch.optim-style ValueError messages (spec ``error=``)
    keyword_only: bool = False  # a pass's argument that comes after the runtime's, keyword-only (maximize)
    optional_keys: tuple[str, ...] = ()  # values of a tuple that may be None (Adafactor's eps1)
    choices: tuple = ()  # kind "choice": the values it may take (strings, and None where it is a choice)

    @property
    def optional(self) -> bool:
        """Whether the value may be None (``max_lr``, a spec's ``hyper(..., default=None)``)."""
        return self.kind.startswith("optional_")

    def key_optional(self, key: str) -> bool:
        """Whether this one value may be None: an optional argument, or a tuple value defaulting to None."""
        return self.optional or key in self.optional_keys


@dataclass(frozen=True)
class StateBuffer:
    """A per-parameter buffer in ``optimizer.state[p]``. ``when`` is a host condition on group values
    (checked at allocation); ``init`` may use param, grad and hyperparameters."""

    name: str
    init: Any = sympy.Integer(0)
    when: Any = TRUE
    dtype: str = "param"  # "param": the param's dtype, as optimi stores states
    origin: Origin = NO_ORIGIN
    axes: tuple[int, ...] = ()  # a reduced shape: these dims of the param's shape are 1
    nonnegative: bool | None = None  # the spec's declaration (spec.state(..., nonnegative=)); None: inferred


@dataclass(frozen=True)
class ScalarState:
    """A per-parameter 0-dim fp32 state that the step reads and writes (torch.optim's layout:
    NAdam's ``mu_product``, ASGD's ``eta``). The step reads its stored value as the host value
    ``name`` and stores the host value ``value`` (``name`` itself where the spec never assigns it);
    params of one group may hold different values, so the runtime steps each set of equal values
    with its own host scalars (``runtime.run_functional``)."""

    name: str
    init: Any
    value: str
    origin: Origin = NO_ORIGIN
    precision: str = "fp32"  # "fp64": a 0-dim fp64 tensor, its value computed in double (no Fp32 rounding)


@dataclass(frozen=True)
class HostScalar:
    name: str
    expr: Any
    kind: str = "float"  # "float" | "bool"
    origin: Origin = NO_ORIGIN
    guard: Any = TRUE  # computed only when true (RAdam's rect: sqrt of a negative otherwise), else 0

    @property
    def sym(self) -> sympy.Symbol:
        return sympy.Symbol(self.name) if self.kind == "bool" else sympy.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Assign:
    symbol: sympy.Symbol  # what is written: ``param``, a state, ``grad`` or a temp, as expressions read it
    expr: Any
    guard: Any = TRUE
    origin: Origin = NO_ORIGIN
    role: str = ""  # "update" (spec.update), "kahan", "decay_l2": what passes added or look for

    def __post_init__(self):
        if not isinstance(self.symbol, sympy.Symbol):
            raise TypeError(f"Assign: the target must be a sympy Symbol (e.g. ir.GRAD), not {self.symbol!r}")

    @property
    def target(self) -> str:
        return self.symbol.name

    @property
    def sym(self) -> sympy.Symbol:
        return self.symbol


@dataclass(frozen=True)
class Reduction:
    """``name ← op(expr)`` over all elements of one tensor; ``op`` is sum, mean or max."""

    name: str
    op: str
    expr: Any
    guard: Any = TRUE
    origin: Origin = NO_ORIGIN

    @property
    def sym(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, real=True)


@dataclass(frozen=True)
class TensorScalar:
    name: str
    expr: Any
    guard: Any = TRUE
    origin: Origin = NO_ORIGIN

    @property
    def sym(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, real=True)


@dataclass(frozen=True)
class TensorFunction:
    """``name ← fn(x, *args)``: a host tensor function of one whole tensor between elementwise stages
    (``spec.matrix_fn``: Muon's Newton–Schulz orthogonalization). ``expr`` is ``Tuple(x, *args)``:
    ``x`` an element value of this stage (a temp), ``args`` host values; the result is an element
    value of the param's shape, read by later stages. ``fn`` names the function, whose ``source``
    the generated module holds; ``batched``: it takes a stack of same-shaped tensors at once."""

    name: str
    fn: str
    expr: Any
    guard: Any = TRUE
    origin: Origin = NO_ORIGIN
    source: str = ""
    batched: bool = False

    @property
    def sym(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, real=True)

    @property
    def input(self) -> sympy.Symbol:
        return self.expr.args[0]

    @property
    def args(self) -> tuple:
        return tuple(self.expr.args[1:])


Stmt = Union[Assign, Reduction, TensorScalar, TensorFunction]

STAGE_BOUNDARIES = (Reduction, TensorFunction)  # what later stages read only after a whole stage ran


@dataclass(frozen=True)
class Program:
    name: str
    functional: str
    doc: str
    spec_path: str
    args: tuple[Arg, ...]
    states: tuple[StateBuffer, ...]
    host: tuple[HostScalar, ...]
    body: tuple[Stmt, ...]
    update_lr: Any  # the effective learning rate of spec.update (host or tensor scalar expr)
    weight_decay: str | None
    kahan_default: bool | None
    uses_step: bool  # whether the step reads ``step`` (set by finalize)
    passes: tuple[str, ...] = ()
    records: tuple[StateBuffer, ...] = ()  # 0-dim states kept for state_dict layout only (init, never read)
    decouple_wd_default: bool = False  # the default of the ``decouple_wd`` flag the L2 decay pass adds
    decoupled_flag: sympy.Symbol | None = None  # proximal decay: the flag that makes it decoupled instead
    state_order: tuple[str, ...] = ()  # every state as the spec declares it (records included)
    group_constants: tuple[tuple[str, Any], ...] = ()  # param_group entries the spec fixes
    state_dict_layout: str = "optimi"  # "torch": torch.optim's state_dict layout (and a step count)
    torch_step: bool = True  # the torch layout keeps a per-param step (not torch.optim.Muon's)
    signature: tuple[str, ...] = ()  # spec.signature(): constructor order after params ("*": keyword-only)
    decay_lr: Any = None  # the lr weight decay uses where it is not update_lr (spec.update's decay_lr=)
    scalar_states: tuple[ScalarState, ...] = ()  # 0-dim fp32 states the step reads (host inputs) and writes
    param_ndims: tuple[int, ...] = ()  # spec.param_ndim(): the param ranks the class accepts (empty: any)
    param_ndim_error: str = ""  # its ValueError message, formatted with the param's ``size``
    views: tuple[tuple[str, Any], ...] = ()  # spec.eval_view: ("eval", param value), ("train", param value)

    def replace(self, **changes) -> "Program":
        return dataclasses.replace(self, **changes)

    # ── lookups ────────────────────────────────────────────────────────────────────────────────
    def arg(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)

    def host_names(self) -> set[str]:
        keys = {k for a in self.args for k in a.keys}
        return keys | {h.name for h in self.host} | {"step", *STRUCTURE} | {s.name for s in self.scalar_states}

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_``, ``base__`` …: a name a pass adds (``decay``) that no argument,
        state or value of the program has (a user's ``decay`` hyperparameter keeps its own)."""
        taken = self.host_names() | set(self.stored()) | {"grad", "numel"} | \
            {getattr(s, "name", None) or s.target for s in self.body}
        while base in taken:
            base += "_"
        return base

    def tensor_scalar_names(self) -> set[str]:
        return {s.name for s in self.body if isinstance(s, (TensorScalar, Reduction))} | {"numel"}

    def uses_numel(self) -> bool:
        """Whether a statement reads ``numel`` (the element count of the tensor being stepped)."""
        return any(NUMEL.name in {x.name for x in sympy.sympify(s.expr).free_symbols} for s in self.body)

    def whole_tensor(self) -> bool:
        """Whether a step reads whole-tensor values (reductions, per-tensor scalars, ``numel``, axis
        reductions, reduced-shape states, ``ndim``); if not, any slice of a tensor steps exactly like
        the whole (CPU chunking, DTensor shards)."""
        return self.uses_numel() or self.has_axes() or NDIM.name in self.structure() or \
            any(isinstance(s, (Reduction, TensorScalar, TensorFunction)) for s in self.body) or \
            any(n in self.structure() for n in SIZES)

    def tensor_functions(self) -> tuple[TensorFunction, ...]:
        return tuple(s for s in self.body if isinstance(s, TensorFunction))

    def by_shape(self) -> bool:
        """Whether the runtime calls each step function on params of one shape: the spec reads the
        param's sizes (``spec.size(k)``) or batches a tensor function over same-shaped params."""
        return any(n in self.structure() for n in SIZES) or any(f.batched for f in self.tensor_functions())

    def has_axes(self) -> bool:
        """Whether values of a reduced shape occur: axis reductions or states stored reduced."""
        return any(s.axes for s in self.states) or any(
            sympy.sympify(s.expr).atoms(AxisReduction) for s in self.body)

    def structure(self) -> tuple[str, ...]:
        """The structural host inputs (``ndim``, ``dtype_eps``) the host scalars or the body read."""
        used = set()
        for x in [h.expr for h in self.host] + [h.guard for h in self.host] + [s.expr for s in self.body] + \
                [s.guard for s in self.body] + [s.when for s in self.states]:
            used |= {v.name for v in sympy.sympify(x).free_symbols}
        return tuple(n for n in STRUCTURE if n in used)

    def stored(self) -> tuple[str, ...]:
        """Buffers written back to memory, in a fixed order: param first, then states."""
        return ("param",) + tuple(s.name for s in self.states)

    def stages(self) -> list[list[Stmt]]:
        """Split the body at reductions: a stage may only use reductions of earlier stages.

        Stages never move a statement backwards (stage numbers are monotonic in body order), so the
        reads and writes of buffers keep their order.
        """
        stage_of: dict[str, int] = {}
        stages: list[list[Stmt]] = [[]]
        current = 0
        for stmt in self.body:
            deps = [stage_of[s.name] + (1 if isinstance(self._def(s.name), STAGE_BOUNDARIES) else 0)
                    for s in sympy.sympify(stmt.expr).free_symbols if s.name in stage_of]
            current = max([current] + deps)
            while len(stages) <= current:
                stages.append([])
            stages[current].append(stmt)
            if isinstance(stmt, (Reduction, TensorScalar, TensorFunction)):
                stage_of[stmt.name] = current
        return stages

    def _def(self, name: str):
        return next((s for s in self.body if getattr(s, "name", None) == name), None)

    # ── text form, for golden tests and `optcompile show --ir` ────────────────────────────────
    def dump(self) -> str:
        out = [f"program {self.name}  (passes: {', '.join(self.passes) or '-'})"]
        for a in self.args:
            inj = f"  [{a.injected_by}]" if a.injected_by else ""
            out.append(f"  arg {a.name}: {a.kind} = {a.default!r}{inj}")
        for s in self.states:
            when = "" if s.when == TRUE else f"  when {s.when}"
            out.append(f"  state {s.name} = {s.init}{when}")
        for s in self.records:
            out.append(f"  record {s.name} = {s.init}  (0-dim, not read by the step)")
        for s in self.scalar_states:
            out.append(f"  scalar state {s.name} = {s.init}  (0-dim {s.precision}, per param; stores {s.value})")
        for h in self.host:
            guard = "" if h.guard == TRUE else f"  [only if {h.guard}]"
            out.append(f"  host {h.name}: {h.kind} = {h.expr}{guard}")
        for i, stage in enumerate(self.stages()):
            out.append(f"  stage {i}:")
            for st in stage:
                guard = "" if st.guard == TRUE else f"if {st.guard}: "
                if isinstance(st, Assign):
                    out.append(f"    {guard}{st.target} = {st.expr}")
                elif isinstance(st, Reduction):
                    out.append(f"    {guard}{st.name} = {st.op}({st.expr})  # per tensor")
                elif isinstance(st, TensorFunction):
                    batched = ", batched" if st.batched else ""
                    out.append(f"    {guard}{st.name} = {st.fn}({', '.join(map(str, st.expr.args))})  "
                               f"# tensor function{batched}")
                else:
                    out.append(f"    {guard}{st.name} = {st.expr}  # per tensor scalar")
        for name, expr in self.views:
            out.append(f"  view {name}: param = {expr}")
        out.append(f"  update lr = {self.update_lr}")
        return "\n".join(out) + "\n"
