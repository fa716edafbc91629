"""The whole pipeline in one call: spec → IR → passes → finalize → sources for every backend."""
from __future__ import annotations

import os
from typing import Callable

import sympy

from .ir import Program
from .lower import finalize, lower
from .passes import run_passes
from .spec import OptimizerSpec, load_spec
from .verify import verify

# file suffix → renderer(program, spec_source) -> text. Backends register themselves here.
GENERATORS: dict[str, Callable[[Program, bytes], str]] = {}


def _register_builtin_generators() -> None:
    from .codegen import render
    GENERATORS.setdefault(".py", render.render_module)
    try:
        from .codegen import triton as triton_codegen
        GENERATORS.setdefault("_triton.py", triton_codegen.render)
    except ImportError:
        pass
    try:
        from .codegen import c as c_codegen
        GENERATORS.setdefault("_fused.c", c_codegen.render)
    except ImportError:
        pass


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
             f"decouple_wd={spec.decouple_wd} flag={spec.decoupled_flag} consts={sorted(spec.group_constants.items())!r}",
             f"doc {spec.doc!r}"]
    lines += [f"arg {a.name} {a.kind} {a.type} {a.default!r} {a.domain} {a.labels} {a.after} {a.doc!r}" for a in spec.args]
    lines += [f"state {st.name} {e(st.init)} {e(st.when)} {st.scalar}" for st in spec.states]
    lines += [f"stmt {st.kind} {st.target} {e(st.expr)} {e(st.when)} {e(st.lr)}" for st in spec.stmts]
    return "\n".join(lines).encode()


def build_program(spec: OptimizerSpec, until: str | None = None) -> Program:
    """Lower and run the passes; ``until`` stops after that pass (for ``optcompile show --after``)."""
    prog = lower(spec)
    if os.environ.get("OPTCOMPILE_VERIFY") == "1":
        verify(prog)
    prog = run_passes(prog, until=until)
    return finalize(prog) if until is None else prog


def generate_sources(spec: OptimizerSpec) -> dict[str, str]:
    """``{suffix: text}`` for every registered backend, e.g. ``{".py": ..., "_triton.py": ...}``."""
    _register_builtin_generators()
    prog = build_program(spec)
    return {suffix: gen(prog, spec.source) for suffix, gen in GENERATORS.items()}
