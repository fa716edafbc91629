"""The whole pipeline in one call: spec → IR → passes (finalize last) → sources for every backend."""
from __future__ import annotations

import os

import sympy

from .backends import registry
from .fingerprint import cache_key
from .ir import Program
from .lower import lower
from .passes import run_passes
from .spec import OptimizerSpec, load_spec
from .verify import verify


def as_spec(spec_or_path) -> OptimizerSpec:
    """A loaded spec. One built in memory (not by ``load_spec``) is keyed by its declarations, not
    by the bytes of the file that built it: two specs made by one function must not share a key."""
    if isinstance(spec_or_path, OptimizerSpec):
        if not hasattr(spec_or_path, "source"):
            spec_or_path.source = fingerprint(spec_or_path)
            spec_or_path.path = spec_or_path.file
        return spec_or_path
    return load_spec(spec_or_path)


def fingerprint(spec: OptimizerSpec) -> bytes:
    """Every declaration of a spec as deterministic text (sympy ``srepr`` for expressions)."""
    def e(x):
        return sympy.srepr(sympy.sympify(x)) if x is not None else "None"

    lines = [f"spec {spec.name} {spec.functional} wd={spec.weight_decay} kahan={spec.kahan_sum!r} "
             f"decouple_wd={spec.decouple_wd} flag={spec.decoupled_flag} consts={sorted(spec.group_constants.items())!r}"
             + (f" state_dict={spec.state_dict}" if spec.state_dict != "optimi" else "")
             + ("" if spec.torch_step else " torch_step=False"),
             f"doc {spec.doc!r}"]
    lines += [f"arg {a.name} {a.kind} {a.type} {a.default!r} {a.domain} {a.labels} {a.after} {a.doc!r} {a.errors!r}"
              + (f" choices={a.choices!r}" if a.choices else "") for a in spec.args]
    lines += [f"signature {spec.order!r}"] if spec.order else []
    lines += [f"state {st.name} {e(st.init)} {e(st.when)} {st.scalar}" + (f" axes={st.axes}" if st.axes else "")
              + (f" precision={st.precision}" if st.precision != "fp32" else "")
              + (f" nonnegative={st.nonnegative}" if st.nonnegative is not None else "") for st in spec.states]
    lines += [f"view {name} {e(expr)}" for name, (expr, _) in spec.views.items()]
    lines += [f"stmt {st.kind} {st.target} {e(st.expr)} {e(st.when)} {e(st.lr)}" for st in spec.stmts]
    return "\n".join(lines).encode()


def build_program(spec: OptimizerSpec, until: str | None = None) -> Program:
    """Lower and run the passes; ``until`` stops after that pass (for ``optcompile show --after``)."""
    prog = lower(spec)
    if os.environ.get("OPTCOMPILE_VERIFY") == "1":
        verify(prog)
    return run_passes(prog, until=until)  # the last pass, finalize, hoists and CSEs for the printers


def generate_sources(spec: OptimizerSpec, key: str | None = None) -> dict[str, str]:
    """``{suffix: text}`` for every generated file (``optcompile.backends.registry``), e.g.
    ``{".py": ..., "_triton.py": ..., "_fused.c": ...}``, each stamped with ``key``: the key its
    cache entry is named by (the spec's cache key unless the caller has it already)."""
    key = key if key is not None else cache_key(spec.functional, spec.source)
    prog = build_program(spec)
    return {suffix: backend.generate(prog, spec.source, key) for suffix, backend in registry.files().items()}


def backend_source(spec: OptimizerSpec, name: str, state_precision: str | None = None) -> str:
    """What ``optcompile show --backend NAME`` prints: a backend's own file, or, for a step that is
    a function of the Python module (eager, foreach), the host-scalar function and that step
    function, as the module generator rendered them. ``state_precision`` (fused and Triton): the
    file specialized for states stored so (:func:`storage_prelude`)."""
    backend = registry.get(name)
    prog = build_program(spec)
    if backend.in_module:
        if state_precision is not None:
            raise ValueError(f"--state-precision specializes the fused and triton kernels; the {backend.name} step "
                             "is the same code under every state precision")
        from .codegen.render import module_functions
        functions = module_functions(prog)
        return "\n\n".join(functions[f].rstrip() + "\n" for f in ("host", backend.name))
    text = backend.generate(prog, spec.source, cache_key(spec.functional, spec.source))
    return text if state_precision is None else storage_prelude(prog, backend.name, state_precision) + text


PRECISIONS = ("fp32", "bf16", "fp16", "8bit")


def storage_prelude(prog: Program, backend: str, precision: str) -> str:
    """The storage a kernel is specialized for when every state is stored in ``precision``, in
    the kernel's own terms: the fused C file's build defines (``-DOC_DTYPE_<state>``: 3 int8 and 4
    uint8 codes, by the state's sign, optcompile/nonnegative.py) or the Triton launch's
    ``DTYPE_<state>`` constexprs. A state the kernels cannot take as codes
    (``kernel_plan.codes_in_kernel``) is stepped in fp32, decoded around the launch."""
    from . import kernel_plan
    from .nonnegative import nonnegative_states
    if precision not in PRECISIONS:
        raise ValueError(f"state precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if prog.has_axes():
        return ""  # no kernels: the file says so
    plan = kernel_plan.build(prog)
    unsigned = set(nonnegative_states(prog))
    lines = []
    for b in plan.buffers:
        if b.storage != "state":
            continue
        if precision == "8bit" and b.scale:
            code, what = (4, "uint8") if b.name in unsigned else (3, "int8")
            note = f"{what} 8-bit codes, block scales in {b.scale}"
        elif precision == "8bit":
            code, what, note = 0, "float32", "fp32: decoded around the launch (a later stage reads it)"
        else:
            code, what = {"fp32": (0, "float32"), "bf16": (1, "bfloat16"), "fp16": (2, "float16")}[precision]
            note = what
        lines.append(f"#define OC_DTYPE_{b.name} {code}  // {note}" if backend == "fused"
                     else f"#   DTYPE_{b.name} = tl.{what}  ({note})")
    if backend == "fused":
        return (f"// state_precision={precision!r}: the build defines of the states (the param's storage is "
                "-DOC_DTYPE)\n" + "\n".join(lines) + "\n\n")
    return (f"# state_precision={precision!r}: the launch's state dtypes (constexprs; the file is the same "
            "under every precision)\n" + "\n".join(lines) + "\n\n")
