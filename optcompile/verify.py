"""IR invariants, checked after lowering and after every pass (``OPTCOMPILE_VERIFY=1``), so a
broken pass fails at the pass and not inside a generated kernel."""
from __future__ import annotations

import sympy

from .ir import Assign, Program, Reduction, TensorFunction, TensorScalar
from .step_flags import STEP_FLAGS


class VerifyError(AssertionError):
    pass


def verify(prog: Program, after: str = "lower") -> None:
    host = prog.host_names() | set(STEP_FLAGS)
    defined = set(host) | {"param", "grad", "numel"} | {s.name for s in prog.states}
    stored = set(prog.stored())
    for h in prog.host:
        bad = {s.name for s in sympy.sympify(h.expr).free_symbols} - host
        if bad:
            raise VerifyError(f"after {after}: host scalar {h.name} uses non-host values {sorted(bad)}")
    for s in prog.body:
        free = {x.name for x in sympy.sympify(s.expr).free_symbols}
        missing = free - defined
        if missing:
            raise VerifyError(f"after {after}: {getattr(s, 'target', getattr(s, 'name', '?'))} reads "
                              f"undefined {sorted(missing)}")
        gfree = {x.name for x in sympy.sympify(s.guard).free_symbols}
        if gfree - host:
            raise VerifyError(f"after {after}: guard {s.guard} is not a host condition")
        if isinstance(s, Assign):
            if s.target == "grad" and s.role != "decay_l2" and not free:
                raise VerifyError(f"after {after}: grad overwritten")
            defined.add(s.target)
        elif isinstance(s, (Reduction, TensorScalar)):
            if isinstance(s, TensorScalar) and free - host - {x.name for x in prog.body if isinstance(x, (Reduction, TensorScalar))} - {"numel"}:
                raise VerifyError(f"after {after}: tensor scalar {s.name} uses per-element values")
            defined.add(s.name)
        elif isinstance(s, TensorFunction):
            if {x.name for a in s.args for x in sympy.sympify(a).free_symbols} - host:
                raise VerifyError(f"after {after}: tensor function {s.name}'s arguments are not host values")
            defined.add(s.name)
    for st in prog.states:
        if st.name not in stored:
            raise VerifyError(f"after {after}: state {st.name} not stored")
