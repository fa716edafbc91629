"""The kernel plan: what every kernel of one program does, decided once for the Triton and C backends.

A finished :class:`~optcompile.ir.Program` says *what* a step computes; the plan says how a kernel
computes it, in terms that no printer re-derives:

* the **buffers** and each one's storage (the group's dtype, the grad's dtype, each state's own
  dtype — ``state_precision`` — or fp32 scratch); a state that a kernel may keep in **8-bit
  codes** (``state_precision="8bit"``, optcompile/quantize.py) names its fp32 scale buffer
  (``Buffer.scale``): whether it holds codes is the build's / launch's parameter, like its dtype;
* per **stage** (the body split at reductions): the per-tensor values it computes first, the loads
  and stores with their host guards, the element statements in kernel form (interpolations and
  in-place groupings from forms.py, sums in one term order), and the reductions it feeds;
* **one rounding rule**: every write to a stored buffer is rounded to the buffer's storage right
  after it (round to nearest even, or stochastically under ``stochastic_rounding``: random bits
  from the buffer's position, the tensor and the element, optcompile/rounding.py), so a later read
  sees what memory would hold (Kahan measures the real rounding error) and the store itself is an
  exact cast;
* **one rule for values crossing a stage**: an element value (a temp, or ``grad`` after L2 decay)
  that a later stage reads goes through an fp32 scratch buffer (a *spill*), stored by the stage
  that sets it; a per-tensor value is recomputed from the reductions' totals, which stay in memory;
* **flags vs scalars**: host booleans that the kernels read only as conditions are compile-time
  flags (Triton ``tl.constexpr``, C variant bits); every other host value is an fp32 scalar;
* **values of a reduced shape** (axis reductions, states stored with ``axis=``): the statements
  that compute them run as torch ops in a *segment* between two stages (:class:`Segment`); a stage
  reads a reduced-shape state, or an axis value from an fp32 buffer the segment fills, by a
  broadcast index (:func:`broadcast_index`); the full-shape operand of an axis reduction reaches
  the segment through a spill;
* **tensor functions** (``spec.matrix_fn``, Muon's Newton–Schulz) are segment statements too: their
  input reaches the segment through a spill, and their result, an fp32 buffer of the param's shape
  and strides that the segment fills, is read by later stages at the element's own position.

A kernel printer (codegen/triton.py, codegen/c.py) walks the plan and spells it; it decides only
what is particular to its target (Triton's launch grid, C's variants and SIMD loop).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import sympy

from .codegen.forms import Forms
from .blockformat import scale_key
from .codegen.host import used_host_names
from .ir import TRUE, Assign, AxisReduction, Origin, Program, Reduction, TensorFunction, TensorScalar, axes_of
from .step_flags import STEP_FLAGS


@dataclass(frozen=True)
class Buffer:
    """Memory a kernel reads or writes per element."""

    name: str
    role: str  # "param" | "grad" | "state" | "spill" | "axis" (a value a segment computes: of a reduced
    # shape, or a tensor function's result, of the param's shape)
    storage: str  # "param": the group's dtype (param, kahan_comp); "grad": the grads' dtype; "state": the
    # state's own dtype (``state_precision``, a per-buffer parameter of a C build / Triton launch); "fp32": scratch
    value: str  # the element value it holds (a spill holds a temp, or ``grad`` after L2 decay)
    axes: tuple[int, ...] = ()  # a reduced shape (these dims are 1): stages read it by a broadcast index
    # a state a kernel may store as 8-bit codes: the name of its block-scale buffer (role "scale",
    # one fp32 per 256 elements, :func:`codes_in_kernel`); None: the kernels never see its codes
    scale: str | None = None

    @property
    def broadcast(self) -> bool:
        return bool(self.axes)


@dataclass(frozen=True)
class Access:
    """A load or store of one buffer in one stage, under a host guard."""

    buffer: str
    guard: Any = TRUE


@dataclass(frozen=True)
class Compute:
    """``target ← expr`` per element. ``rounds``: the target is a stored buffer, so the value is
    rounded to its storage right after the write. ``per_element``: ``expr`` reads an element value
    (else it is one scalar, broadcast)."""

    target: sympy.Symbol
    expr: Any
    guard: Any
    rounds: bool
    per_element: bool
    origin: Origin


@dataclass(frozen=True)
class Reduce:
    """``name ← op(expr)`` over the elements of each tensor; ``slot`` numbers the program's reductions."""

    name: str
    op: str  # "sum" | "mean" | "max"
    expr: Any
    guard: Any
    slot: int
    origin: Origin


@dataclass(frozen=True)
class PerTensor:
    """A per-tensor value, from host values, ``numel`` and the totals of earlier stages' reductions."""

    name: str
    expr: Any
    guard: Any
    stage: int  # the stage whose statement it is (it may be recomputed in later ones)
    origin: Origin


@dataclass(frozen=True)
class Stage:
    index: int
    per_tensor: tuple[PerTensor, ...]  # computed before the element loop: earlier stages' first
    loads: tuple[Access, ...]  # in buffer order
    body: tuple[Compute | Reduce, ...]
    stores: tuple[Access, ...]  # in buffer order; spills last
    totals: tuple[str, ...]  # reductions of earlier stages that this stage reads
    flags: tuple[str, ...]  # the flags this stage reads (statements, guards)
    scalars: tuple[str, ...]  # the host scalars it reads
    uses_numel: bool
    origins: tuple[Origin, ...]  # of its own statements, sorted

    @property
    def reductions(self) -> tuple[Reduce, ...]:
        return tuple(s for s in self.body if isinstance(s, Reduce))

    @property
    def own_per_tensor(self) -> tuple[PerTensor, ...]:
        return tuple(t for t in self.per_tensor if t.stage == self.index)

    def buffers(self) -> list[str]:
        """The buffers this stage touches: its loads', then its stores' (a spill load is read under
        the name of the value it holds, ``Buffer.value``)."""
        return list(dict.fromkeys(a.buffer for a in self.loads + self.stores))


@dataclass(frozen=True)
class Segment:
    """Torch ops between kernel stage ``after`` and the next (-1: before the first): the statements
    of a reduced shape (axis reductions, updates of reduced-shape states) and tensor functions
    (``spec.matrix_fn``), printed as the foreach backend prints them (codegen/segments.py). They
    read reduced-shape states and the spills of the full-shape values they reduce or transform,
    write the reduced-shape states back (rounded to their storage), and fill the ``outputs`` axis
    buffers that later stages read."""

    index: int
    after: int
    body: tuple[Assign | TensorFunction, ...]
    spills: tuple[str, ...]  # spill buffers it reads (each holds a full-shape value, ``Buffer.value``)
    states: tuple[str, ...]  # reduced-shape states it reads or writes
    written: tuple[str, ...]  # those it writes
    outputs: tuple[str, ...]  # axis buffers it fills


@dataclass(frozen=True)
class KernelPlan:
    name: str  # the optimizer (``AdamW``)
    fn: str  # the functional name (``adamw``)
    spec_path: str
    buffers: tuple[Buffer, ...]  # param, grad, states (kahan_comp last), spills, then scales
    host_inputs: tuple[str, ...]  # every host value the kernels read: the flags and the scalars
    flags: tuple[str, ...]  # compile-time host booleans
    scalars: tuple[str, ...]  # host values passed as fp32 scalars
    optional: tuple[str, ...]  # scalars that may be None (then 0.0)
    stages: tuple[Stage, ...]
    reductions: tuple[Reduce, ...]  # all of them, by slot
    per_tensor_names: tuple[str, ...]  # every per-tensor value (reductions included), in body order
    segments: tuple[Segment, ...] = ()  # torch ops between stages (values of a reduced shape)
    broadcasts: tuple[tuple[int, ...], ...] = ()  # the reduced shapes stages read, each an index table row

    @property
    def spills(self) -> tuple[Buffer, ...]:
        return tuple(b for b in self.buffers if b.role == "spill")

    @property
    def axis_buffers(self) -> tuple[Buffer, ...]:
        return tuple(b for b in self.buffers if b.role == "axis")

    def segments_after(self, stage: int) -> tuple[Segment, ...]:
        return tuple(g for g in self.segments if g.after == stage)

    def broadcast_of(self, name: str) -> int:
        """The index table row a broadcast buffer is read by (its reduced shape's position)."""
        return self.broadcasts.index(self.buffer(name).axes)

    @property
    def scales(self) -> tuple[Buffer, ...]:
        """The block-scale buffers of the states that may be stored as 8-bit codes (``Buffer.scale``)."""
        return tuple(b for b in self.buffers if b.role == "scale")

    def buffer(self, name: str) -> Buffer:
        return next(b for b in self.buffers if b.name == name)

    def slot(self, name: str) -> int:
        """A stored buffer's position (:func:`stored_slot`): it salts stochastic rounding's bits."""
        return stored_slot([b.name for b in self.buffers if b.role not in ("spill", "scale")], name)

    # ── text form, for golden tests and `optcompile show --plan` ──────────────────────────────
    def dump(self) -> str:
        def when(guard) -> str:
            return "" if guard == TRUE else f"  if {guard}"

        def text(e) -> str:
            return sympy.sstr(e, order="none")  # the plan's term order

        def segment(g: Segment) -> list[str]:
            lines = [f"  segment {g.index} (torch ops):"]
            for s in g.body:
                if isinstance(s, TensorFunction):
                    batched = ", batched over same-shaped params" if s.batched else ""
                    lines.append(f"    {s.name} = {s.fn}({', '.join(map(text, s.expr.args))}){when(s.guard)}"
                                 f"  (tensor function{batched})")
                else:
                    lines.append(f"    {s.target} = {text(s.expr)}{when(s.guard)}")
            return lines + [f"    fill {n} (fp32, {'broadcast' if self.buffer(n).axes else 'param shape'})"
                            for n in g.outputs]

        def shape(b: Buffer) -> str:
            return f", reduced along {list(b.axes)}" if b.axes else ""

        out = [f"kernel plan {self.name}",
               "  buffers: " + ", ".join(f"{b.name} ({b.storage}{shape(b)})" for b in self.buffers if b.role != "scale"),
               "  8-bit codes: " + (", ".join(f"{b.name} (scale {b.scale})" for b in self.buffers if b.scale) or "-"),
               f"  flags: {', '.join(self.flags) or '-'}",
               f"  scalars: {', '.join(self.scalars) or '-'}"]
        for g in self.segments_after(-1):
            out += segment(g)
        for st in self.stages:
            out.append(f"  stage {st.index}:" + (f"  totals {', '.join(st.totals)}" if st.totals else ""))
            for t in st.per_tensor:
                again = "" if t.stage == st.index else f"  (of stage {t.stage}, recomputed)"
                out.append(f"    per tensor {t.name} = {text(t.expr)}{when(t.guard)}{again}")
            for a in st.loads:
                out.append(f"    load {a.buffer}{when(a.guard)}")
            for s in st.body:
                if isinstance(s, Reduce):
                    out.append(f"    reduce {s.name} = {s.op}({text(s.expr)}){when(s.guard)}")
                else:
                    rounds = "  → rounded" if s.rounds else ""
                    out.append(f"    {s.target} = {text(s.expr)}{when(s.guard)}{rounds}")
            for a in st.stores:
                out.append(f"    store {a.buffer}{when(a.guard)}")
            for g in self.segments_after(st.index):
                out += segment(g)
        return "\n".join(out) + "\n"


def buffer_names(prog: Program) -> tuple[str, ...]:
    """The plan's buffers before its spills: ``param, grad, *states`` (``kahan_comp`` last)."""
    return ("param", "grad", *[s.name for s in prog.states])


def stored_slot(names, name: str) -> int:
    """A buffer's position in :func:`buffer_names`: every backend salts stochastic rounding's random
    bits with it (optcompile/rounding.py), so it is decided here, once."""
    return list(names).index(name)


# ── building ───────────────────────────────────────────────────────────────────────────────────
def _names(e) -> set[str]:
    return {s.name for s in sympy.sympify(e).free_symbols}


def target_of(s) -> str:
    """The name a statement sets (a tensor function's result, a per-tensor value, an assignment's target)."""
    return s.name if isinstance(s, (TensorFunction, TensorScalar, Reduction)) else s.target


def _condition_names(e) -> set[str]:
    """Names read inside conditions (Piecewise conditions, relations, and/or/not) of ``e``."""
    out: set[str] = set()
    for node in sympy.preorder_traversal(sympy.sympify(e)):
        if isinstance(node, sympy.Piecewise):
            out |= set().union(*[_names(c) for _, c in node.args])
        elif isinstance(node, (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.Not)):
            out |= _names(node)
    return out


def any_of(guards) -> Any:
    """The Or of host guards, simplified (``a & b | a & ~b`` → ``a``)."""
    g = sympy.Or(*guards)
    if g in (sympy.true, sympy.false) or len(g.free_symbols) > 8:
        return g
    return sympy.simplify_logic(g, form="dnf")


def ordered_terms(e, element: set[str]):
    """``e`` with every sum in the kernels' one term order, as an unevaluated sympy expression that
    printers print argument by argument: left to right from a bare element value, element terms
    before scalar ones. That is the order the eager backend's in-place ops add in, so kernels and
    eager round alike (``param - decay*param - lr*m/(sqrt(v) + eps)``, not sympy's sorted order)."""
    e = sympy.sympify(e)
    if not e.args or e.is_Number:
        return e
    if isinstance(e, sympy.Piecewise):
        return sympy.Piecewise(*[(ordered_terms(v, element), ordered_terms(c, element)) for v, c in e.args],
                               evaluate=False)
    args = [ordered_terms(a, element) for a in e.args]
    if isinstance(e, sympy.Add):
        is_element = [bool(_names(t) & element) for t in args]
        start = next((i for i, t in enumerate(args) if t.is_Symbol and t.name in element), None)
        order = ([start] if start is not None else []) + \
            [i for i in range(len(args)) if is_element[i] and i != start] + \
            [i for i in range(len(args)) if not is_element[i]]
        return sympy.Add(*[args[i] for i in order], evaluate=False)
    if isinstance(e, (sympy.Mul, sympy.Pow)):
        return e.func(*args, evaluate=False)
    return e.func(*args)


def _flags_and_scalars(prog: Program, used: list[str]) -> tuple[list[str], list[str]]:
    """Host booleans read only as conditions are flags; everything else the kernels read is a scalar
    (a "bool" host value that also appears in arithmetic, e.g. a let aliasing a float, is a number)."""
    declared_flags = {k for a in prog.args if a.kind == "flag" for k in a.keys} | set(STEP_FLAGS)
    bools = {h.name for h in prog.host if h.kind == "bool"} | declared_flags
    conditions = set().union(*[_names(s.guard) | _condition_names(s.expr) for s in prog.body])
    arithmetic = set().union(*[_names(s.expr) for s in prog.body]) - conditions
    bools -= {n for n in arithmetic if n not in declared_flags}
    return [n for n in used if n in bools], [n for n in used if n not in bools]


def _shown(o: Origin) -> Origin:
    """``specs/adamw.py:22``; never an absolute path (generated text must not depend on the host)."""
    if o.file and os.path.isabs(o.file):
        from .codegen.render import spec_display_path
        return dataclasses.replace(o, file=spec_display_path(o.file))
    return o


def _spills(prog: Program, stages: list[list], stored: set[str],
            segment_reads: dict[int, set[str]] | None = None) -> tuple[dict[str, str], dict[int, set[str]]]:
    """Element values read in a later stage than one that sets them (or by a segment after it,
    ``segment_reads``: segment index → names): name → its scratch buffer, and per stage the names it
    reads from scratch. ``grad`` spills only once a stage reassigns it."""
    temps = {s.target for s in prog.body if isinstance(s, Assign) and s.target not in stored}
    set_before: set[str] = set()  # element values some earlier stage assigned
    reads_spilled: dict[int, set[str]] = {}
    for k, stage in enumerate(stages):
        local: set[str] = set()
        for s in stage:
            for n in sorted(_names(s.expr) & temps - local):
                if n == "grad" and n not in set_before:
                    continue  # not reassigned yet: the grad buffer itself
                if n not in set_before:
                    raise ValueError(f"{prog.name}: `{n}` is read before it is set ({_shown(s.origin)})")
                reads_spilled.setdefault(k, set()).add(n)
            if isinstance(s, Assign) and s.target in temps:
                local.add(s.target)
        set_before |= local
    taken = set(prog.stored()) | {"grad"}
    names = {}
    for n in sorted(set().union(*reads_spilled.values(), *(segment_reads or {}).values())):
        name = f"spill_{n}"
        while name in taken:
            name += "_"
        taken.add(name)
        names[n] = name
    return names, reads_spilled


def build(prog: Program) -> KernelPlan:
    """The plan of ``prog``; NotImplementedError (naming what) for a program the kernels cannot take."""
    original = prog
    split = _AxisSplit(prog) if prog.has_axes() or prog.tensor_functions() else None
    stages_ir = prog.stages() if split is None else split.stages
    segments_ir = [] if split is None else split.segments
    if split is not None:
        prog = split.program  # the kernels' statements: axis reductions replaced by the values segments fill
    stored = list(prog.stored())
    states = [s.name for s in prog.states]
    forms = Forms(prog).body(prog, stages_ir)
    temps = {s.target for s in prog.body if isinstance(s, Assign)}
    axis_values = [] if split is None else split.outputs
    element = set(stored) | {"grad"} | temps | set(axis_values)
    segment_reads = {i: set().union(*[_names(s.expr) for s in body]) & (temps - set(stored))
                     for i, (_, body) in enumerate(segments_ir)}
    spill_of, reads_spilled = _spills(prog, stages_ir, set(stored), segment_reads)
    buffers = [Buffer("param", "param", "param", "param"), Buffer("grad", "grad", "grad", "grad")]
    # a state's storage is its own (state_precision: the build's / launch's parameter per buffer);
    # kahan_comp compensates the param and is stored like it
    buffers += [Buffer(s.name, "state", "param" if s.name == "kahan_comp" else "state", s.name, tuple(s.axes))
                for s in prog.states]
    buffers += [Buffer(spill_of[n], "spill", "fp32", n) for n in spill_of]
    buffers += [Buffer(n, "axis", "fp32", n, split.axes[n]) for n in axis_values]
    first_grad_write = next((k for k, st in enumerate(stages_ir)
                             if any(isinstance(s, Assign) and s.target == "grad" for s in st)), None)
    used = used_host_names(original)  # segments' host values included
    flags, scalars = _flags_and_scalars(original, used)
    tensor_stmts = [s for s in prog.body if isinstance(s, TensorScalar)]
    reductions: list[Reduce] = []
    stage_of_value: dict[str, int] = {}
    for k, stage in enumerate(stages_ir):
        for s in stage:
            if isinstance(s, (TensorScalar, Reduction)):
                stage_of_value[s.name] = k
    per_tensor_names = tuple(s.name for s in prog.body if isinstance(s, (TensorScalar, Reduction)))
    elems = [[s for s in st if isinstance(s, (Assign, Reduction))] for st in stages_ir]

    stages: list[Stage] = []
    for k, stage in enumerate(stages_ir):
        per_tensor = _per_tensor(k, stage, tensor_stmts, stage_of_value)
        body: list[Compute | Reduce] = []
        for s in stage:
            if isinstance(s, TensorScalar):
                continue
            expr = ordered_terms(forms[id(s)], element)
            if isinstance(s, Reduction):
                red = Reduce(s.name, s.op, expr, s.guard, len(reductions), s.origin)
                reductions.append(red)
                body.append(red)
                continue
            body.append(Compute(s.symbol, expr, s.guard, s.target in stored,
                                bool(_names(s.expr) & element), s.origin))
        elem = elems[k]
        # spill stores: each value a later stage reads from scratch, written by the stages that set it;
        # the first stage that reassigns grad stores it either way (reassigned or not, under its flags)
        spill_stores = []
        for n, spill in spill_of.items():
            later = [s.guard for j in range(k + 1, len(stages_ir)) if n in reads_spilled.get(j, ())
                     for s in elems[j] if n in _names(s.expr)]
            later += [s.guard for i, (after, body) in enumerate(segments_ir) if after >= k and n in segment_reads[i]
                      for s in body if n in _names(s.expr)]
            writers = [s.guard for s in elem if isinstance(s, Assign) and s.target == n]
            if later and n == "grad" and k == first_grad_write:
                spill_stores.append(Access(spill, any_of(later)))
            elif later and writers:
                spill_stores.append(Access(spill, any_of(writers)))
        loads, stores = [], []  # an access whose guard can never hold (``f & ~f``) is left out
        for b in buffers:
            if b.role == "spill":
                if b.value in reads_spilled.get(k, ()):
                    readers = [s for s in elem if b.value in _names(s.expr)]
                    loads.append(Access(b.name, any_of([r.guard for r in readers])))
                continue
            if b.name == "grad" and "grad" in reads_spilled.get(k, ()):
                continue  # a reassigned grad comes from scratch
            readers = [s.guard for s in elem if b.name in _names(s.expr)]
            if b.name in spill_of and any(a.buffer == spill_of[b.name] for a in spill_stores):
                readers.append(next(a.guard for a in spill_stores if a.buffer == spill_of[b.name]))
            if readers:
                loads.append(Access(b.name, any_of(readers)))
            writers = [s for s in elem if isinstance(s, Assign) and s.target == b.name]
            if b.name in stored and writers:
                stores.append(Access(b.name, any_of([w.guard for w in writers])))
        stores += spill_stores
        loads = [a for a in loads if a.guard != sympy.false]
        stores = [a for a in stores if a.guard != sympy.false]
        stmts_read = [s.expr for s in elem] + [t.expr for t in per_tensor]
        guards = [s.guard for s in elem] + [t.guard for t in per_tensor] + \
            [a.guard for a in loads + stores]
        read = set().union(*[_names(e) for e in stmts_read + guards]) if stmts_read or guards else set()
        totals = tuple(r.name for r in reductions if stage_of_value[r.name] < k and r.name in read)
        stages.append(Stage(
            index=k, per_tensor=per_tensor, loads=tuple(loads), body=tuple(body), stores=tuple(stores),
            totals=totals, flags=tuple(f for f in flags if f in read), scalars=tuple(n for n in scalars if n in read),
            uses_numel="numel" in read,
            origins=tuple(sorted({_shown(s.origin) for s in stage if s.origin}, key=Origin.sort_key))))
    buffers = _with_scales(buffers, stages)
    optional = tuple(k for a in prog.args for k in a.keys if a.key_optional(k))
    reduced_states = {b.name for b in buffers if b.role == "state" and b.axes}
    segments = []
    for i, (after, body) in enumerate(segments_ir):
        read = set().union(*[_names(s.expr) for s in body])
        written = [target_of(s) for s in body if target_of(s) in reduced_states]
        later_reads = set().union(*[_names(s.expr) for st in stages_ir[after + 1:] for s in st]) if after + 1 < \
            len(stages_ir) else set()
        segments.append(Segment(
            i, after, tuple(body), tuple(spill_of[n] for n in sorted(segment_reads[i])),
            tuple(b.name for b in buffers if b.name in reduced_states and b.name in read | set(written)),
            tuple(dict.fromkeys(written)),
            tuple(n for n in dict.fromkeys(target_of(s) for s in body) if n in axis_values and n in later_reads)))
    broadcasts = tuple(dict.fromkeys(b.axes for b in buffers if b.axes and any(
        b.name in {a.buffer for a in st.loads} for st in stages)))
    return KernelPlan(prog.name, prog.functional, prog.spec_path, tuple(buffers), tuple(used), tuple(flags),
                      tuple(scalars), optional, tuple(stages), tuple(reductions), per_tensor_names,
                      tuple(segments), broadcasts)


def unsupported(prog: Program) -> str | None:
    """Why the kernel backends cannot take ``prog`` (then they run its foreach step), or None."""
    try:
        build(prog)
    except NotImplementedError as exc:
        return str(exc)
    return None


BROADCAST_ROW = 6  # numbers per tensor and reduced shape in the kernels' broadcast tables


def broadcast_index(shape, axes, strides=None) -> tuple[int, ...]:
    """How a kernel finds, for the element at memory position ``i`` of a dense tensor of ``shape``
    (and ``strides``; contiguous if None), the element of a contiguous buffer of that shape with the
    dims ``axes`` set to 1 (a reduced-shape state or axis value):
    ``j = ((i % L) // A) * B + ((i % C) // D) * E``. Dims, in memory order, merge into runs that are
    all reduced or all kept (and contiguous in the buffer too); each kept run is one term
    ``((i % (stride·size)) // stride) * buffer stride``, so two kept runs fit (``(..., R, C)``
    reduced along -2 keeps ``...`` and ``C``). Over a contiguous 2-D ``(R, C)``: along -1,
    ``j = i // C``; along -2, ``j = i % C``. Raises ValueError for three kept runs (the kernels then
    step those tensors with the torch code)."""
    shape = tuple(shape)
    n = len(shape)
    if 0 in shape:
        return (1, 1, 0, 1, 1, 0)  # no elements: never read
    if strides is None:
        strides = [1] * n
        for d in range(n - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
    reduced = {a % n for a in axes} if n else set()
    out_strides = [1] * n  # the buffer's (contiguous, in the param's dim order)
    for d in range(n - 2, -1, -1):
        out_strides[d] = out_strides[d + 1] * (1 if d + 1 in reduced else shape[d + 1])
    dims = sorted((d for d in range(n) if shape[d] != 1), key=lambda d: -strides[d])  # memory order
    runs: list[list] = []  # [kept, memory stride, size, buffer stride] of the innermost dim so far
    for d in dims:
        kept = d not in reduced
        if runs and runs[-1][0] == kept and (not kept or runs[-1][3] == out_strides[d] * shape[d]):
            runs[-1][1], runs[-1][2] = strides[d], runs[-1][2] * shape[d]
            runs[-1][3] = out_strides[d] if kept else 0
        else:
            runs.append([kept, strides[d], shape[d], out_strides[d] if kept else 0])
    terms = []
    for kept, stride, size, out in runs:
        if kept:
            terms.append((stride * size, stride, out))
    if len(terms) > 2:
        raise ValueError(f"a buffer of shape {shape} reduced along {tuple(axes)}: more than two runs of kept dims")
    terms += [(1, 1, 0)] * (2 - len(terms))
    (L, A, B), (C, D, E) = terms
    return (L, A, B, C, D, E)


class _AxisSplit:
    """A program with values of a reduced shape or tensor functions, as kernel stages and the
    segments between them.

    Each statement is a *kernel* statement (full-shape element math, per-tensor values) or a
    *segment* statement (an assignment of a reduced shape: a reduced-shape state, a reduced temp;
    a tensor function, whose input is a kernel temp that reaches the segment through a spill).
    An axis reduction inside a kernel statement becomes a segment temp (``axis0 = AxisMean(…)``)
    that the kernel reads by a broadcast index; the full-shape operand of an axis reduction is a
    kernel temp (``axis_in0``), which reaches the segment through a spill. Statements are then
    placed at positions 0, 1, 2 … (even: kernel stage, odd: segment) by their dependencies
    (reads after writes, writes after reads and writes), body order kept within a position; a
    kernel statement reads a reduction one stage later, as ``Program.stages`` does."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.axes: dict[str, tuple[int, ...]] = {}  # reduced temps → their reduced dims
        self.known = {"param": frozenset(), "grad": frozenset()} | {st.name: frozenset(st.axes) for st in prog.states}
        self.reduced_states = {st.name for st in prog.states if st.axes}
        self.per_tensor = {s.name for s in prog.body if isinstance(s, (Reduction, TensorScalar))} | {"numel"}
        self.stored = set(prog.stored())
        self.taken = prog.host_names() | self.stored | {"grad", "numel"} | \
            {getattr(s, "name", None) or s.target for s in prog.body}
        self.count = self.inputs = 0  # axis values, full-shape operands: their names' numbers
        self.out: list[tuple[str, Any]] = []  # ("kernel" | "segment", statement)
        for s in prog.body:
            self.statement(s)
        self.place()

    def fresh(self, base: str) -> str:
        while base in self.taken:
            base += "_"
        self.taken.add(base)
        return base

    def shape(self, e) -> frozenset | None:
        return axes_of(e, self.known)

    def statement(self, s) -> None:
        if isinstance(s, TensorScalar):
            self.out.append(("kernel", s))
            return
        if isinstance(s, TensorFunction):
            self.tensor_function(s)
            return
        shape = self.shape(s.expr)
        if isinstance(s, Reduction):
            if shape:
                raise NotImplementedError(f"{self.prog.name}: spec.{s.op}() of a value of a reduced shape "
                                          f"({_shown(s.origin)}) has no kernel form")
            self.out.append(("kernel", dataclasses.replace(s, expr=self.kernel_expr(s.expr, s.guard, s.origin))))
            return
        if s.target in self.reduced_states or shape:
            expr = self.segment_expr(s.expr, s.guard, s.origin)
            bad = sorted(_names(expr) & self.per_tensor)
            if bad:
                raise NotImplementedError(f"{self.prog.name}: a value of a reduced shape ({_shown(s.origin)}) reads "
                                          f"the per-tensor {', '.join(bad)}, which the kernels' torch segments do "
                                          "not take")
            if s.target not in self.stored:
                self.known[s.target] = shape or frozenset()
                self.axes[s.target] = tuple(sorted(shape or ()))
            self.out.append(("segment", dataclasses.replace(s, expr=expr)))
            return
        if s.target not in self.stored:
            self.known[s.target] = frozenset()  # a kernel temp: one value per element
        self.out.append(("kernel", dataclasses.replace(s, expr=self.kernel_expr(s.expr, s.guard, s.origin))))

    def tensor_function(self, s: TensorFunction) -> None:
        """``s`` as a segment statement over a kernel temp (a state or the grad it reads is copied
        into one first); its result is a full-shape value that later kernel statements read."""
        x = s.input
        if not (isinstance(x, sympy.Symbol) and x.name not in self.stored | {"grad"} and
                self.known.get(x.name) == frozenset()):
            sym = sympy.Symbol(self.fresh(f"{s.fn}_in"), real=True)
            self.known[sym.name] = frozenset()
            self.out.append(("kernel", Assign(sym, x, s.guard, s.origin)))
            s = dataclasses.replace(s, expr=sympy.Tuple(sym, *s.args))
        bad = sorted(_names(s.expr) & self.per_tensor)
        if bad:
            raise NotImplementedError(f"{self.prog.name}: a tensor function ({_shown(s.origin)}) reads the "
                                      f"per-tensor {', '.join(bad)}, which the kernels' torch segments do not take")
        self.known[s.name] = frozenset()
        self.axes[s.name] = ()
        self.out.append(("segment", s))

    @staticmethod
    def outermost(e) -> list:
        found, stack = [], [sympy.sympify(e)]
        while stack:
            node = stack.pop()
            if isinstance(node, AxisReduction):
                found.append(node)
            else:
                stack.extend(node.args)
        return list(dict.fromkeys(found))

    def kernel_expr(self, e, guard, origin):
        """``e`` with each axis reduction replaced by the segment temp that holds it."""
        sub = {}
        for red in self.outermost(e):
            name = self.fresh(f"axis{self.count}")
            self.count += 1
            value = self.segment_expr(red, guard, origin)
            sym = sympy.Symbol(name, real=True)
            self.known[name] = self.shape(red)
            self.axes[name] = tuple(sorted(self.known[name]))
            self.out.append(("segment", Assign(sym, value, guard, origin)))
            sub[red] = sym
        return sympy.sympify(e).xreplace(sub) if sub else e

    def segment_expr(self, e, guard, origin):
        """``e`` for a segment: the full-shape operand of each axis reduction as a kernel temp."""
        sub = {}
        for red in self.outermost(e):
            x = red.args[0]
            if self.shape(x):  # reduced already: the segment computes it
                sub[red] = red.func(self.segment_expr(x, guard, origin), red.args[1])
                continue
            x = self.kernel_expr(x, guard, origin)
            if not (isinstance(x, sympy.Symbol) and x.name not in self.stored | {"grad"}):
                name = self.fresh(f"axis_in{self.inputs}")
                self.inputs += 1
                sym = sympy.Symbol(name, real=True)
                self.known[name] = frozenset()
                self.out.append(("kernel", Assign(sym, x, guard, origin)))
                x = sym
            sub[red] = red.func(x, red.args[1])
        return sympy.sympify(e).xreplace(sub) if sub else e

    def place(self) -> None:
        written: dict[str, int] = {}  # name → position of its last write
        kind_of: dict[str, str] = {}  # name → what its last write is: "reduce", "kernel", "segment"
        read: dict[str, int] = {}  # name → the last position that reads it
        positions = []
        for kind, s in self.out:
            name = getattr(s, "name", None) or s.target
            need = 0
            for n in _names(s.expr):
                if n not in written:
                    continue
                p = written[n]
                if kind == "segment" and kind_of[n] == "reduce":
                    raise NotImplementedError(f"{self.prog.name}: a value of a reduced shape reads the per-tensor {n}")
                need = max(need, p + (2 if kind_of[n] == "reduce" else 1 if kind_of[n] != kind else 0))
            for p in (written.get(name), read.get(name)):
                if p is not None:
                    need = max(need, p + (0 if p % 2 == (kind == "segment") else 1))
            pos = need + (need % 2 != (kind == "segment"))
            positions.append(pos)
            written[name] = pos
            kind_of[name] = "reduce" if isinstance(s, Reduction) else kind
            for n in _names(s.expr):
                read[n] = max(read.get(n, 0), pos)
        last = max(positions, default=0)
        stages: list[list] = []
        segments: list[tuple[int, list]] = []
        for pos in range(last + 1):
            stmts = [s for (kind, s), p in zip(self.out, positions) if p == pos]
            if not stmts:
                continue
            if pos % 2 == 0:
                stages.append(stmts)
            elif segments and segments[-1][0] == len(stages) - 1:
                segments[-1][1].extend(stmts)  # no stage between: one segment
            else:
                segments.append((len(stages) - 1, stmts))
        self.stages = stages or [[]]
        self.segments = segments
        kernel = [s for st in stages for s in st]
        self.program = self.prog.replace(body=tuple(kernel))
        kernel_reads = set().union(*[_names(s.expr) for s in kernel]) if kernel else set()
        self.outputs = [n for n in self.axes if n in kernel_reads]


def codes_in_kernel(name: str, stages) -> bool:
    """Whether state ``name`` can be loaded and stored as 8-bit codes inside the kernels: every
    stage that reads it runs no later than the one stage that writes it, so each load decodes the
    codes the step began with and the one store encodes the final values (a later stage reading
    a value stored earlier in the step would see it quantized; such a state is decoded around the
    launch instead, runtime's ``_step_eightbit``)."""
    stores = [st.index for st in stages if any(a.buffer == name for a in st.stores)]
    loads = [st.index for st in stages if any(a.buffer == name for a in st.loads)]
    return len(stores) <= 1 and all(k <= j for k in loads for j in stores)


def _with_scales(buffers: list[Buffer], stages) -> list[Buffer]:
    """``buffers`` with each state that may be stored as codes naming its scale buffer, and those
    scale buffers appended (after the spills: the earlier buffers keep their places)."""
    out, scales = [], []
    for b in buffers:
        if b.role == "state" and b.storage == "state" and not b.axes and codes_in_kernel(b.name, stages):
            b = dataclasses.replace(b, scale=scale_key(b.name))
            scales.append(Buffer(b.scale, "scale", "fp32", b.name))
        out.append(b)
    return out + scales


def _per_tensor(k: int, stage: list, tensor_stmts: list[TensorScalar], stage_of_value: dict) -> tuple[PerTensor, ...]:
    """The per-tensor values stage ``k`` computes: its own, after the earlier ones it reads (which
    are recomputed: they depend only on host values, ``numel`` and totals that stay in memory)."""
    own = [s for s in stage if isinstance(s, TensorScalar)]
    needed = set().union(*[_names(s.expr) | _names(s.guard) for s in stage]) if stage else set()
    chosen: list[TensorScalar] = []
    for s in reversed([t for t in tensor_stmts if stage_of_value[t.name] < k]):
        if s.name in needed:
            chosen.append(s)
            needed |= _names(s.expr) | _names(s.guard)
    return tuple(PerTensor(s.name, s.expr, s.guard, stage_of_value[s.name], s.origin)
                 for s in list(reversed(chosen)) + own)
