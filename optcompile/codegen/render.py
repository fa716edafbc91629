"""The one Jinja environment, and the module contexts built from a Program.

Templates hold structure (signatures, loops, the class); every line of math comes from a printer.
A rendered module is stamped with a header whose ``body:`` hash covers everything below it, so
the loader can tell a torn or edited file from a good one.
"""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import sympy
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..ir import TRUE, Program, Reduction
from ..fingerprint import templates_hash
from ..paths import specs_dir, templates_dir
from ..signature import NOT_APPLICABLE, constructor_params
from ..version import __version__
from . import eager, foreach
from ..stamp import stamp
from ..step_flags import VIEW_FLAGS
from .host import host_lines, pyexpr, used_host_names
from .tensor_code import Dialect, TensorCode

_ENV: Environment | None = None


def env() -> Environment:
    global _ENV
    if _ENV is None:
        _ENV = Environment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                           trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    return _ENV


def spec_display_path(path: str) -> str:
    p = Path(path).resolve()
    try:
        return "specs/" + p.relative_to(specs_dir().resolve()).as_posix()
    except ValueError:
        return p.name


def traffic(prog: Program) -> str:
    """Bytes an ideal fused pass moves per parameter (fp32, no Kahan): the benchmark's yardstick."""
    reads, writes = ["param", "grad"], []
    for s in prog.body:
        names = {x.name for x in sympy.sympify(s.expr).free_symbols}
        reads += [n for n in sorted(names) if n in prog.stored() and n not in reads and n != "kahan_comp"]
        t = getattr(s, "target", None)
        if t in prog.stored() and t not in writes and t != "kahan_comp":
            writes.append(t)
    short = lambda xs: " ".join(xs)  # noqa: E731
    return (f"{prog.name} fp32: reads {short(reads)}, writes {short(writes)} = "
            f"{4 * (len(reads) + len(writes))} B/param/step")


def header(prog: Program, spec_source: bytes, body: str, key: str, comment: str = "#") -> str:
    """Every backend's file of one compile carries ``key``: the one key its cache entry is named by."""
    path = spec_display_path(prog.spec_path)
    return stamp(comment=comment, spec_path=path, name=prog.name, spec_sha=hashlib.sha256(spec_source).hexdigest(),
                 version=__version__, templates_sha=templates_hash(), passes=", ".join(prog.passes),
                 key=key, body=body, traffic=traffic(prog))


# ── the Python module: host scalars, state init, eager, foreach, functional and class ───────────
_ANNOT = {"float": "float", "int": "int", "bool": "bool", "str": "str"}
SHARED_DOCS = {
    "kahan_sum": "Enables Kahan summation for more accurate parameter updates when training in low "
                 "precision (float16 or bfloat16). If unspecified, automatically applies for low precision "
                 "parameters",
    "foreach": "Enables the foreach implementation. If unspecified, uses the fused CPU kernel or Triton "
               "where they apply, else foreach on GPUs and the for-loop on CPU",
    "triton": "Enables the generated multi-tensor Triton kernels. If unspecified, used for params on a GPU "
              "when Triton works there",
    "gradient_release": "Fuses optimizer step and zero_grad as part of the parameter's backward pass. "
                        "Requires model hooks created with `prepare_for_gradient_release`",
    "fused": "Enables the generated fused multi-tensor C kernel for CPU params (keyword-only). If "
             "unspecified, used for CPU params when a C compiler is available",
    "state_precision": "Storage dtype of the optimizer states: None (each in its param's dtype), 'fp32', "
                       "'bf16', 'fp16', or a dict from state name to one of those; math stays fp32 "
                       "(keyword-only; kahan_comp follows the param)",
    "stochastic_rounding": "Round bf16/fp16 params and states stochastically instead of to nearest, an "
                           "alternative to Kahan summation (keyword-only; kahan_sum=True with it is an error)",
    "sr_seed": "Seed of stochastic rounding's counter-based random bits (keyword-only)",
}


def _wrap(name: str, doc: str, default: str | None) -> str:
    """One Args entry, wrapped at 100 columns with a hanging indent (torch's docstring style)."""
    text = f"{name}: " + doc[0].upper() + doc[1:] + (f" (default: {default})" if default is not None else "")
    return textwrap.fill(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 12).strip()


def _arg_doc(a) -> str:
    """An argument's Args text: the spec's ``doc=`` (or the shared one), and a choice's values."""
    doc = a.doc or SHARED_DOCS.get(a.name, a.name)
    if a.kind == "choice":
        doc += "; one of " + ", ".join(map(repr, a.choices))
    return doc


def _annotation(a) -> str:
    if a.kind == "tuple":
        return "tuple[" + ", ".join(_ANNOT[a.type] + (" | None" if k in a.optional_keys else "") for k in a.keys) + "]"
    if a.optional or (a.kind == "choice" and None in a.choices):
        return f"{_ANNOT[a.type]} | None"
    return _ANNOT[a.type]


def _default(a) -> str | None:
    from ..spec import REQUIRED
    if a.default is REQUIRED:
        return None
    if a.kind == "tuple":
        return "(" + ", ".join(repr(v) for v in a.default) + ")"
    return repr(a.default)


def _validation(a) -> list[str]:
    """optimi's ValueErrors (or torch.optim's, with ``error=``), generated from each argument's
    sympy domain (an optional argument may also be None; an optional int must be an int)."""
    out = []
    if a.kind == "choice":
        message = a.errors[0] if a.errors else \
            f"Invalid {a.labels[0]}: {a.name}={{{a.name}!r}}; expected one of {', '.join(map(repr, a.choices))}"
        return [(f"if {a.name} not in {a.choices!r}:", f"raise ValueError(f{message!r})")]
    if a.kind == "optional_int":
        out.append((f"if {a.name} is not None and (isinstance({a.name}, bool) or not isinstance({a.name}, int)):",
                    f'raise ValueError(f"Invalid {a.labels[0]}: {a.name}={{{a.name}!r}} (an int or None)")'))
    if a.domain is None:
        return out
    dom = a.domain
    values = [(f"{a.name}[{i}]", k, a.labels[i]) for i, k in enumerate(a.keys)] if a.kind == "tuple" \
        else [(a.name, a.name, a.labels[0])]
    for i, (expr, key, label) in enumerate(values):
        dom = a.domain[i] if isinstance(a.domain, tuple) else a.domain
        conds = []
        if dom.inf != -sympy.oo:
            conds.append(f"{float(dom.inf)!r} {'<' if dom.left_open else '<='} {expr}")
        if dom.sup != sympy.oo:
            conds.append(f"{expr} {'<' if dom.right_open else '<='} {float(dom.sup)!r}")
        if not conds:
            continue
        cond = " and ".join(conds) if len(conds) > 1 else conds[0]
        shown = f"{{{expr}=}}" if a.kind == "tuple" else f"{expr}={{{expr}}}"
        test = f"{expr} is not None and not ({cond})" if a.key_optional(key) else f"not ({cond})"
        message = a.errors[i if len(a.errors) > 1 else 0] if a.errors else f"Invalid {label}: {shown}"
        out.append((f"if {test}:", f'raise ValueError(f{message!r})'))
    return out


def _signature(prog: Program, docs: dict) -> list[dict]:
    """The constructor's arguments after ``params`` (``optcompile.signature``), ready to print."""
    args = {a.name: a for a in prog.args}
    runtime = {"kahan_sum": ("bool | None", repr(prog.kahan_default)), "foreach": ("bool | None", "None"),
               "triton": ("bool | None", "None"), "gradient_release": ("bool", "False"),
               "fused": ("bool | None", "None"), "state_precision": ("str | dict | None", "None"),
               "stochastic_rounding": ("bool", "False"), "sr_seed": ("int", "0")}
    out, star = [], False
    for p in constructor_params(prog):
        if p.kind == "arg":
            a = args[p.name]
            annotation, default, doc = _annotation(a), _default(a), docs[a.name]
        elif p.kind == "runtime":
            annotation, default = runtime[p.name]
            doc = _wrap(p.name, SHARED_DOCS[p.name], default)
        else:
            annotation, default = "bool", "False"
            doc = _wrap(p.name, f"accepted for torch.optim's signature; must be False: {NOT_APPLICABLE[p.name]}",
                        default)
        out.append({"name": p.name, "annotation": annotation, "default": default, "doc": doc,
                    "star": p.keyword_only and not star})
        star = star or p.keyword_only
    return out


def _init_lines(prog: Program) -> list[str]:
    """``_init_state``: optimi's lazy allocation, with ``kahan_comp`` always present."""
    code = TensorCode(prog, Dialect())
    code.host = {k for a in prog.args for k in a.keys} | {"kahan"}
    read = {x.name for st in prog.states + prog.records for x in sympy.sympify(st.init).free_symbols |
            sympy.sympify(st.when).free_symbols} | {x.name for st in prog.scalar_states
                                                     for x in sympy.sympify(st.init).free_symbols}
    keys = sorted(read & {k for a in prog.args for k in a.keys})
    lines = [f"{k} = group[{k!r}]" for k in keys]
    structure = {x.name for st in prog.states for x in sympy.sympify(st.when).free_symbols}
    lines += [line for n, line in (("ndim", "ndim = param.dim()"),
                                   ("dtype_eps", "dtype_eps = torch.finfo(param.dtype).eps")) if n in structure]
    for st in prog.scalar_states:  # torch.optim's layout: a 0-dim fp32 tensor on the CPU (read on the host)
        dtype = "torch.float64" if st.precision == "fp64" else "torch.float32"
        lines.append(f"state[{st.name!r}] = torch.tensor(float({pyexpr(st.init)}), dtype={dtype})")
    if any(sympy.Symbol("grad", real=True) in sympy.sympify(st.init).free_symbols for st in prog.states):
        lines.append("grad = param.grad")
    for st in prog.states:
        if st.name == "kahan_comp":  # 0-dim records first, so the state_dict keys keep optimi's order
            for r in prog.records:
                record = f"torch.tensor({pyexpr(r.init)}, dtype=param.dtype, device=param.device)"
                lines += ([f"state[{r.name!r}] = {record}"] if r.when == TRUE else
                          [f"state[{r.name!r}] = {record} if {pyexpr(r.when)} else None"])
        init = sympy.piecewise_fold(sympy.sympify(st.init))
        block = []
        branches = init.args if isinstance(init, sympy.Piecewise) else ((init, TRUE),)
        for i, (value, cond) in enumerate(branches):
            code.lines, code.indent = [], ""
            if st.axes:  # a reduced shape: the param's with these dims 1 (hyperparameter inits only)
                rhs = f"_reduced_full(param, {st.axes!r}, {pyexpr(value)}, {st.name!r})"
            elif value.is_Number and value == 0:
                rhs = "torch.zeros_like(param, memory_format=torch.preserve_format)"
            elif value.is_Number:
                rhs = f"torch.full_like(param, {float(value)!r}, memory_format=torch.preserve_format)"
            elif {x.name for x in value.free_symbols} <= code.host:  # hyperparameters only
                rhs = f"torch.full_like(param, {pyexpr(value)}, memory_format=torch.preserve_format)"
            else:
                rhs = code.atom(value)
                if rhs in ("param", "grad"):
                    rhs = f"{rhs}.detach().clone(memory_format=torch.preserve_format)"
            body = code.lines + [f"state[{st.name!r}] = {rhs}"]
            if cond == TRUE and i == 0:
                block += body
            else:
                block.append(("if" if i == 0 else "elif" if cond != TRUE else "else") +
                             ("" if cond == TRUE else f" {pyexpr(cond)}") + ":")
                block += ["    " + x for x in body]
        if st.when != TRUE:
            lines.append(f"if {pyexpr(st.when)}:")
            lines += ["    " + x for x in block]
            lines += ["else:", f"    state[{st.name!r}] = None"]
        else:
            lines += block
    return lines


SHARD_COMBINED_OPS = ("sum", "mean", "max")  # reductions every backend combines from per-shard partials


def shard_reductions(prog: Program) -> bool:
    """Whether every reduction of ``prog`` is the all-reduce of per-shard partials, so that a
    sharded DTensor steps its local shard (optcompile/sharding.py); else the runtime steps the
    full tensor. Axis reductions have no such rule yet: a sharded dim may be the one reduced."""
    return not prog.has_axes() and not prog.tensor_functions() and all(s.op in SHARD_COMBINED_OPS for s in prog.body if isinstance(s, Reduction))


def module_context(prog: Program) -> dict:
    from .. import kernel_plan
    from .segments import function as segment_function
    no_kernel_reason = kernel_plan.unsupported(prog)
    plan = kernel_plan.build(prog) if no_kernel_reason is None else None
    segments = segment_function(prog, plan) if plan is not None and plan.segments else []
    keys = step_keys(prog)
    host_inputs = keys + [s.name for s in prog.scalar_states] + (["step"] if prog.uses_step else []) + \
        list(prog.structure()) + ["update_parameters", "kahan"] + \
        ([f"{flag}=False" for flag in VIEW_FLAGS] if prog.views else [])
    used = used_host_names(prog)
    states = [s.name for s in prog.states if s.name != "kahan_comp"]
    spec_args = [a for a in prog.args]
    first_line, _, rest = (prog.doc or prog.name).partition("\n")
    return {
        "prog": prog,
        "name": prog.name,
        "fn": prog.functional,
        "summary": first_line.strip(),
        "doc_rest": rest.strip("\n"),
        "args": [{"name": a.name, "annotation": _annotation(a), "default": _default(a),
                  "doc": _wrap(a.name, _arg_doc(a), _default(a)), "keys": a.keys, "kind": a.kind} for a in spec_args],
        "kahan_default": repr(prog.kahan_default),
        # optimi checks its own arguments first, then the base class checks lr and weight_decay
        # torch.optim-style specs (error=) check in declaration order, as torch does
        "validations": [v for a in (spec_args if any(a.errors for a in spec_args) else sorted(
            spec_args, key=lambda a: ("lr", "weight_decay").index(a.name) + 1 if a.name in ("lr", "weight_decay")
            else 0)) for v in _validation(a)],
        "signature": _signature(prog, {a.name: _wrap(a.name, _arg_doc(a), _default(a))
                                       for a in spec_args}),
        "not_applicable": [n for n in prog.signature if n in NOT_APPLICABLE],
        "host_inputs": host_inputs,
        "host_lines": host_lines(prog),
        "host_used": used,
        "scalar_states": [s.name for s in prog.scalar_states],
        "rounds_fp32": any(s.precision == "fp32" for s in prog.scalar_states),  # imports round_fp32
        "scalar_values": [s.value for s in prog.scalar_states],
        "scalar_state_names": repr(tuple(s.name for s in prog.scalar_states)),
        "states": states,
        "state_lists": [f"{s}s" for s in states] + ["kahan_comps"],
        "buffers": ["param", "grad"] + states + ["kahan_comp"],
        "init_lines": _init_lines(prog),
        "eager": eager.context(prog),
        "foreach": foreach.context(prog),
        "segments": segments,
        "uses_step": prog.uses_step,
        "tensor_functions": list(dict.fromkeys(f.source.rstrip() for f in prog.tensor_functions())),
        "whole_tensor": prog.whole_tensor(),
        "shard_reductions": shard_reductions(prog),
        "structure_extra": (f', "structure": {prog.structure()!r}' if prog.structure() else "") + (
            f', "kernels": False, "no_kernel": {no_kernel_reason!r}' if no_kernel_reason else "") + (
            f', "kernel_segments": _segments_{prog.functional}' if segments else "") + (
            ', "by_shape": True' if prog.by_shape() else "") + (
            f', "param_ndims": {prog.param_ndims!r}, "param_ndim_error": {prog.param_ndim_error!r}'
            if prog.param_ndims else "") + (
            f', "axes": {dict((st.name, st.axes) for st in prog.states if st.axes)!r}'
            if any(st.axes for st in prog.states) else "") + _nonnegative_extra(prog),
        # torch.optim's state_dict layout: its tuple hyperparameters, saved under their own name
        "views": [name for name, _ in prog.views],
        "layout_extra": (', "views": True' if prog.views else "") + (
            f', "scalar_fp64": {tuple(s.name for s in prog.scalar_states if s.precision == "fp64")!r}'
            if any(s.precision == "fp64" for s in prog.scalar_states) else "") + ("" if prog.state_dict_layout == "optimi" else
        f', "state_dict": "torch", "tuple_keys": {dict((a.name, a.keys) for a in prog.args if a.kind == "tuple")!r}'),
        "max_lr": prog.arg("max_lr") is not None,
        "traffic": traffic(prog),
        "functional_params": _functional_params(prog),
        "functional_extras": _functional_extras(prog),
        "hyper_keys": repr(tuple(keys)),
        "hyper_dict": "{" + ", ".join(f"{k!r}: {k}" for k in keys) + "}",
        "functional_positional": _functional_positional(prog),
        "state_names": repr(tuple(states)),
        "group_constants": [(k, repr(v)) for k, v in prog.group_constants],
    }


def step_keys(prog: Program) -> list[str]:
    """param_group keys the step reads, in argument order. Keys used only to allocate state
    (SGD's ``torch_init``) are not arguments of the functional form, as in optimi."""
    used = {x.name for h in prog.host for x in sympy.sympify(h.expr).free_symbols | sympy.sympify(h.guard).free_symbols}
    for st in prog.body:
        used |= {x.name for x in sympy.sympify(st.expr).free_symbols | sympy.sympify(st.guard).free_symbols}
    init_only = {k for st in prog.states + prog.records for k in
                 {x.name for x in sympy.sympify(st.init).free_symbols | sympy.sympify(st.when).free_symbols}} - used
    return [k for a in prog.args for k in a.keys if k not in init_only]


def _functional_positional(prog: Program) -> list[str]:
    """``params, grads, <state>s…, kahan_comps=None`` with optimi's annotations; 0-dim records
    (``eps_sqs``) are accepted in their place and ignored, since the step never reads them; scalar
    states (``mu_products``) are read and written, as torch.optim's functional forms do."""
    order = prog.state_order or [s.name for s in prog.states + prog.records + prog.scalar_states]
    conditional = {s.name for s in prog.states if s.when != TRUE}
    out = ["params: list[Tensor]", "grads: list[Tensor]"]
    out += [f"{n}s: list[Tensor | None]" if n in conditional else f"{n}s: list[Tensor]" for n in order
            if n != "kahan_comp"]
    return out + ["kahan_comps: list[Tensor | None] | None = None"]


def _functional_params(prog: Program) -> list[str]:
    """optimi's functional keyword arguments: hyperparameters, ``step``, then the decay switches;
    arguments placed after those (Adan's ``adam_wd``) keep their constructor default."""
    out = []
    keys = set(step_keys(prog))
    for a in prog.args:
        if a.keyword_only:
            continue  # after the runtime's switches (_functional_extras)
        if a.injected_by and prog.uses_step and "step: Tensor" not in out:
            out.append("step: Tensor")
        for k in a.keys:
            if k not in keys:
                continue
            if a.kind == "choice":
                out.append(f"{k}: {_annotation(a)}")
            elif a.key_optional(k):
                out.append(f"{k}: {_ANNOT[a.type]} | None = None")
            elif a.kind == "flag":
                out.append(f"{k}: bool = {a.default!r}" if a.name == "decouple_lr" or a.after else f"{k}: bool")
            else:
                out.append(f"{k}: {_ANNOT[a.type]}")
    if prog.uses_step and "step: Tensor" not in out:
        out.append("step: Tensor")
    return out


def _nonnegative_extra(prog: Program) -> str:
    """The states that are never negative (optcompile/nonnegative.py): unsigned 8-bit codes."""
    from ..nonnegative import nonnegative_states
    names = nonnegative_states(prog)
    return f', "nonnegative": {names!r}' if names else ""


def _functional_extras(prog: Program) -> list[str]:
    """Keyword-only arguments of passes after optimi's (``maximize``), with their defaults."""
    keys = set(step_keys(prog))
    return [f"{k}: {_ANNOT[a.type]} = {a.default!r}" for a in prog.args if a.keyword_only for k in a.keys if k in keys]


NO_KERNEL = "the triton and fused backends run the foreach step (torch ops) instead"


def no_kernel(prog: Program, spec_source: bytes, key: str, comment: str, reason: str) -> str:
    """The kernel file of a program the kernel plan does not take (``kernel_plan.unsupported``):
    stamped like any other, never loaded (the module says ``kernels: False``; runtime._dispatch)."""
    body = f"{comment} {prog.name}: no kernels ({reason}); {NO_KERNEL}.\n"
    return header(prog, spec_source, body, key, comment=comment) + body


def render_module(prog: Program, spec_source: bytes, key: str) -> str:
    body = env().get_template("module.py.j2").render(**module_context(prog), key=key)
    return header(prog, spec_source, body, key) + body


def module_functions(prog: Program) -> dict[str, str]:
    """The module's ``host`` scalar function and its ``eager`` and ``foreach`` step functions, each
    exactly as the module renders it (the template's blocks), for ``optcompile show``."""
    template = env().get_template("module.py.j2")
    context = template.new_context(module_context(prog))
    return {name: "".join(template.blocks[name](context)) for name in ("host", "eager", "foreach")}
