"""The constructor's argument order: optimi's by default, or the one a spec names (torch.optim's).

Default (optimi 0.3.3's signature, then optcompile's keyword-only extras): the spec's and the
weight-decay pass's arguments, ``kahan_sum, foreach, triton, gradient_release``, then ``*, fused,
state_precision, stochastic_rounding, sr_seed`` and the keyword-only arguments of later passes
(``maximize``). A spec that calls
``spec.signature(...)`` gets exactly that order; whatever it leaves out follows keyword-only in
the default order, so optcompile's own extras come after the other library's arguments.
``capturable`` and ``differentiable`` exist only to take torch.optim's signature: always False.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Program

RUNTIME_ARGS = ("kahan_sum", "foreach", "triton", "gradient_release", "fused", "state_precision",
                "stochastic_rounding", "sr_seed")
KEYWORD_ONLY_RUNTIME_ARGS = ("fused", "state_precision", "stochastic_rounding", "sr_seed")  # optcompile's own
NOT_APPLICABLE = {
    "capturable": "CUDA-graph capture of the step is torch.optim's; optcompile's steps read the step count "
                  "on the host",
    "differentiable": "optcompile's steps update in place under no_grad and cannot be differentiated",
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "arg" (a Program arg), "runtime" (RUNTIME_ARGS) or "not_applicable"
    keyword_only: bool


def constructor_params(prog: Program) -> list[Param]:
    """Every constructor argument after ``params``, in order."""
    default = ([Param(a.name, "arg", False) for a in prog.args if not a.keyword_only]
               + [Param(n, "runtime", n in KEYWORD_ONLY_RUNTIME_ARGS) for n in RUNTIME_ARGS]
               + [Param(a.name, "arg", True) for a in prog.args if a.keyword_only])
    if not prog.signature:
        return default
    known = {p.name: p for p in default} | {n: Param(n, "not_applicable", False) for n in NOT_APPLICABLE}
    unknown = [n for n in prog.signature if n != "*" and n not in known]
    if unknown:
        from .spec import SpecError
        raise SpecError(f"spec.signature names {', '.join(map(repr, unknown))}, which is not an argument of "
                        f"{prog.name}; its arguments are {', '.join(known)}", prog.spec_path)
    out, keyword_only = [], False
    for n in prog.signature:
        if n == "*":
            keyword_only = True
        else:
            out.append(Param(n, known[n].kind, keyword_only))
    listed = set(prog.signature)
    return out + [Param(p.name, p.kind, True) for p in default if p.name not in listed]
