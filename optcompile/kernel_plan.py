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
  flags (Triton ``tl.constexpr``, C variant bits); every other host value is an fp32 scalar.

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
from .ir import TRUE, Assign, Origin, Program, Reduction, TensorScalar
from .step_flags import STEP_FLAGS


@dataclass(frozen=True)
class Buffer:
    """Memory a kernel reads or writes per element."""

    name: str
    role: str  # "param" | "grad" | "state" | "spill"
    storage: str  # "param": the group's dtype (param, kahan_comp); "grad": the grads' dtype; "state": the
    # state's own dtype (``state_precision``, a per-buffer parameter of a C build / Triton launch); "fp32": scratch
    value: str  # the element value it holds (a spill holds a temp, or ``grad`` after L2 decay)
    # a state a kernel may store as 8-bit codes: the name of its block-scale buffer (role "scale",
    # one fp32 per 256 elements, :func:`codes_in_kernel`); None: the kernels never see its codes
    scale: str | None = None


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

    @property
    def spills(self) -> tuple[Buffer, ...]:
        return tuple(b for b in self.buffers if b.role == "spill")

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

        out = [f"kernel plan {self.name}",
               "  buffers: " + ", ".join(f"{b.name} ({b.storage})" for b in self.buffers if b.role != "scale"),
               "  8-bit codes: " + (", ".join(f"{b.name} (scale {b.scale})" for b in self.buffers if b.scale) or "-"),
               f"  flags: {', '.join(self.flags) or '-'}",
               f"  scalars: {', '.join(self.scalars) or '-'}"]
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


def _spills(prog: Program, stages: list[list], stored: set[str]) -> tuple[dict[str, str], dict[int, set[str]]]:
    """Element values read in a later stage than one that sets them: name → its scratch buffer,
    and per stage the names it reads from scratch. ``grad`` spills only once a stage reassigns it."""
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
    for n in sorted(set().union(*reads_spilled.values()) if reads_spilled else set()):
        name = f"spill_{n}"
        while name in taken:
            name += "_"
        taken.add(name)
        names[n] = name
    return names, reads_spilled


def build(prog: Program) -> KernelPlan:
    stored = list(prog.stored())
    states = [s.name for s in prog.states]
    stages_ir = prog.stages()
    forms = Forms(prog).body(prog)
    temps = {s.target for s in prog.body if isinstance(s, Assign)}
    element = set(stored) | {"grad"} | temps
    spill_of, reads_spilled = _spills(prog, stages_ir, set(stored))
    buffers = [Buffer("param", "param", "param", "param"), Buffer("grad", "grad", "grad", "grad")]
    # a state's storage is its own (state_precision: the build's / launch's parameter per buffer);
    # kahan_comp compensates the param and is stored like it
    buffers += [Buffer(n, "state", "param" if n == "kahan_comp" else "state", n) for n in states]
    buffers += [Buffer(spill_of[n], "spill", "fp32", n) for n in spill_of]
    first_grad_write = next((k for k, st in enumerate(stages_ir)
                             if any(isinstance(s, Assign) and s.target == "grad" for s in st)), None)
    used = used_host_names(prog)
    flags, scalars = _flags_and_scalars(prog, used)
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
    return KernelPlan(prog.name, prog.functional, prog.spec_path, tuple(buffers), tuple(used), tuple(flags),
                      tuple(scalars), optional, tuple(stages), tuple(reductions), per_tensor_names)


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
        if b.role == "state" and b.storage == "state" and codes_in_kernel(b.name, stages):
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
