"""The spec DSL: an optimizer written once, as sympy expressions.

A spec file builds one :class:`OptimizerSpec` named ``spec``. Every call records the spec file
and line it came from, so that any later error (here, in lowering, or in a pass) can point at the
line the author wrote. Nothing here knows about backends: the spec is data.

DSL reference (``specs/*.py`` use all of it):

* ``OptimizerSpec(name, weight_decay=..., kahan_sum=None, decouple_wd=False, decoupled_flag=None,
  group_constants={}, state_dict="optimi")``: ``weight_decay`` is the decay the compiler injects: ``"decoupled"``
  (p·(1 − lr·wd)), ``"l2"`` (g + wd·p, with a ``decouple_wd`` switch defaulting to ``decouple_wd``),
  ``"proximal"`` (Adan: (p − lr·d)/(1 + lr·wd), or decoupled when the flag named by
  ``decoupled_flag`` is on) or ``None``; all add ``decouple_lr``/``max_lr``. ``kahan_sum`` is the
  constructor default. ``group_constants`` are fixed param_group entries kept only for another
  library's state_dict layout (AdamW's ``decouple_wd=True``). ``state_dict="torch"``: the class
  saves torch.optim's layout (a per-param ``step``, tuple hyperparameters such as ``betas`` under
  their own name, no state that is None) and loads it, so its state_dicts go both ways with the
  torch.optim class of the same name; it then counts steps even where the math does not read them,
  unless ``torch_step=False``: torch's class keeps no step (torch.optim.Muon), and none is counted,
  saved or expected where the math does not read ``step``.
* ``hyper(name, default, domain, names=, type=int|float, after=, error=)``: a constructor argument
  (a tuple such as ``betas`` with ``names=``); ``domain`` (a sympy Interval, or one per element of a
  tuple) generates optimi's ValueErrors, or torch.optim's with ``error=`` (a message with the
  argument in braces, ``"Invalid epsilon value: {eps}"``; one per element of a tuple, or one for all).
  ``default=None`` makes it optional (``int | None``); ``is_none(x)`` is the host condition to branch
  on, and the math may read ``x`` only where that condition is false.
  ``hyper(name, default, choices=(None, "a", "b"), error=)``: a string argument taking one of the
  choices (None among them where it may be None); returns a dict from each choice to its host
  condition (``adjust["match_rms_adamw"]``), the only way the math reads it.
  ``flag(name, default, after=)``: a bool. ``after="max_lr"`` places it after the injected ones.
* ``signature(*names)``: the constructor's argument order after ``params`` where it must be another
  library's (torch.optim's): spec arguments, pass-added ones (``maximize``), the runtime's
  (``foreach``, ``kahan_sum`` …), ``"*"`` for the keyword-only marker, and ``capturable`` /
  ``differentiable``, accepted for torch.optim's signature and refused when True. Arguments it does
  not name follow, keyword-only. Without it: the spec's arguments in order, then the runtime's.
* ``state(name, init=0, when=True)``: a per-param buffer (param shape and dtype); ``init`` may use
  ``param``, ``grad`` and hypers (Ranger's ``init=param``, Adan's ``init=-grad``); ``when`` is a
  host condition for its existence. ``state(name, init, scalar=True)``: one value per param, a
  0-dim tensor. Read or assigned by the step it is an fp32 scalar state (torch.optim's NAdam
  ``mu_product``, ASGD ``eta``): a host value per param, ``assign`` gives it a new one from
  hyperparameters, the step and scalar states, computed as torch's op on the fp32 tensor (host
  operands rounded to fp32, the result rounded to fp32; a ``let`` computes in double first).
  Never read, it is a record in the param's dtype for state_dict layout (StableAdamW's ``eps_sq``).
  ``precision="fp64"``: a scalar state stored in fp64 and assigned in double (Schedule-Free's
  running ``weight_sum``).
* ``let(name, expr)``: a named value; where it lives follows from what it reads: hypers and
  ``step`` → host scalar (once per step), reductions → per-tensor scalar, else per element.
* ``assign(state, expr, when=)``: ``state ← expr`` (SSA: returns the new value; reading an older
  value later snapshots it). ``when`` is a host condition (e.g. ``spec.every(k)``).
* ``update(direction, lr=)``: ``param ← param − lr·direction``, once; ``lr`` may be per tensor
  (StableAdamW's clipped ``lr_t``) and is the lr weight decay uses. ``set_param(expr, when=)``:
  a later param write (Ranger's ``p ← slow``); with ``weight_decay=None`` also the update itself,
  written directly (no ``update``; Schedule-Free's interpolation, fine at ``lr = 0``).
* ``eval_view(eval=, train=)``: two views of the params, elementwise from the param and the states;
  the class gets ``train()``/``eval()`` (``train_mode`` in param groups; ``step()`` in eval raises).
* ``mean/sum/max(expr)``: per-tensor reductions; math on them alone (``sqrt(mean(…))``) is done in
  the compute dtype before it becomes a Python float.
* ``numel``: the element count of the tensor being stepped (per tensor, like a reduction);
  ``sum(c)`` of a host or per-tensor ``c`` is ``c·numel``, ``mean(c)`` and ``max(c)`` are ``c``.
* ``clamp(x, lo, hi)`` (``lo``/``hi`` may be None): torch.clamp, NaN-propagating, unlike Max/Min.
* ``every(k)``: ``step % k == 0``. ``Piecewise`` on host conditions becomes guarded branches (a host
  let used only in one branch is computed only there: RAdam's ``rect``); on per-element conditions
  a ``where``.
* Semantics the passes add: anything after the param update that reads the param (lookahead) runs
  only on updating steps (optimizer accumulation) and, under Kahan summation, reads the exact
  param ``param + kahan_comp``; every param write is Kahan-compensated.
* Rounding: the author's algebra is kept (sympy may reorder factors); to pin the rounding of a
  product of three or more host values, name two-factor parts with ``let`` (RAdam's ``rect``).
"""
from __future__ import annotations

import builtins
import dis
import importlib.util
import inspect
import itertools
import keyword
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy
from sympy.codegen.ast import String

from .ir import DTYPE_EPS, NDIM, SIZES, AxisReduction, Clamp, IsChoice, IsNone
from .step_flags import STEP_FLAGS
from sympy import (Abs, And, Eq, Ge, Gt, Interval, Le, Lt, Max, Min, Mod, Ne, Not, Or,  # noqa: F401
                   Piecewise, Rational, oo, sign, sqrt, exp, log)

__all__ = ["OptimizerSpec", "SpecError", "load_spec", "Interval", "oo", "sqrt", "Abs", "sign", "exp",
           "log", "Max", "Min", "clamp", "Piecewise", "Eq", "Ne", "Gt", "Ge", "Lt", "Le", "And", "Or", "Not",
           "Mod", "Rational", "REQUIRED", "RESERVED_NAMES", "SUPPORTED_FUNCTIONS"]


class SpecError(ValueError):
    """A spec is wrong. The message names the spec file, the line and the offending expression."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, expr: Any = None):
        self.file, self.line, self.expr, self.reason = file, line, expr, message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        what = f" (in `{expr}`)" if expr is not None else ""
        super().__init__(f"{where}{message}{what}")


def clamp(x: Any, lo: Any = None, hi: Any = None):
    """``x`` limited to ``[lo, hi]`` as torch.clamp computes it: NaN if ``x``, ``lo`` or ``hi`` is
    NaN (``Max``/``Min`` ignore NaN instead), ``hi`` where ``lo > hi``; ``lo`` or ``hi`` None leaves
    that side open. Constant bounds with ``lo > hi`` are refused: they clamp everything to ``hi``."""
    frame = sys._getframe(1)
    where = (_display(frame.f_code.co_filename), frame.f_lineno)
    if lo is None and hi is None:
        raise SpecError("clamp(x) needs a bound: clamp(x, lo, hi), clamp(x, lo=...) or clamp(x, hi=...)", *where)
    try:
        x, lo_, hi_ = (sympy.sympify(v) for v in (x, -oo if lo is None else lo, oo if hi is None else hi))
    except (sympy.SympifyError, TypeError) as exc:
        raise SpecError(f"clamp: an operand is not a sympy expression ({exc})", *where) from None
    for name, b in (("lo", lo_), ("hi", hi_)):
        if b is sympy.nan or (b.is_number and not b.is_extended_real):
            raise SpecError(f"clamp: {name}={b} is not a real number", *where)
    if lo_.is_number and hi_.is_number and bool(lo_ > hi_):
        raise SpecError(f"clamp: lo={lo_} is greater than hi={hi_}, so every value would become {hi_}; "
                        "swap the bounds", *where, Clamp(x, lo_, hi_, evaluate=False))
    return Clamp(x, lo_, hi_)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()

# Names the runtime owns: a spec may not declare hyperparameters, flags or states with them.
RESERVED_NAMES = frozenset({
    "param", "grad", "step", "params", "grads", "kahan_comp", "kahan_comps", "kahan_sum", "foreach",
    "triton", "fused", "gradient_release", "optimizer_accumulation", "setup", "decouple_wd",
    "decouple_lr", "max_lr", "group", "state", "numel", "self", "closure", "defaults", *STEP_FLAGS,
    "state_precision", "stochastic_rounding", "sr_seed", "sr_step", "code_scales", "code_scale", "ndim", "dtype_eps", *SIZES,
})

# Names the generated code itself uses at module level (modules, helpers, the builtins and C math
# functions it calls, Triton's constexpr arguments) or that no backend language accepts. Its other
# names start with `_` (Python, Triton) or `oc_` (C), which user names cannot. Hyperparameters,
# flags and states are the optimizer's API (constructor arguments, state keys), so they may not take
# these names; a `let` may: it is renamed in the generated code (`torch` → `torch_`).
GENERATED_CODE_NAMES = frozenset({
    "torch", "math", "tl", "triton", "libdevice", "fp32", "Tensor", "Iterable", "LOW_PRECISION",
    "CompiledOptimizer", "OptimizerInfo", "run_functional", "launch_plan", "BLOCK_SIZE", "lowp",
    "DTYPE", "GRAD_DTYPE", "ALIGNED", "SR", "abs", "bool", "dict", "enumerate", "isinstance", "len", "max", "min",
    "range", "super", "zip", "ValueError", "sqrt", "pow", "exp", "log", "fabs", "fmax", "fmin",
} | set(keyword.kwlist) | {
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "enum", "extern",
    "float", "goto", "inline", "int", "long", "register", "restrict", "short", "signed", "sizeof",
    "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "fmaxf", "fminf",
    "sqrtf", "fabsf", "expf", "logf", "powf", "NULL", "INFINITY", "NAN",
})

# sympy node types a spec may use, and what each means in every backend.
SUPPORTED_FUNCTIONS = {
    "sqrt": "square root (x**(1/2)); x**(-1/2) is printed as rsqrt",
    "Abs": "absolute value", "sign": "sign, with sign(0) = 0", "exp": "e**x", "log": "natural log",
    "Max": "elementwise maximum (ignores NaN)", "Min": "elementwise minimum (ignores NaN)",
    "clamp": "torch.clamp(x, lo, hi): NaN propagates; lo or hi may be None",
    "Piecewise": "a choice: on host conditions a branch, on tensor conditions a where()",
    "Mod": "remainder, host scalars only (e.g. step % k)",
}
_ALLOWED_NODES = (sympy.Symbol, sympy.Number, sympy.NumberSymbol, sympy.Add, sympy.Mul, sympy.Pow,
                  Abs, sign, exp, log, Max, Min, Clamp, IsNone, AxisReduction, Piecewise, Mod, sympy.logic.boolalg.BooleanAtom,
                  sympy.core.relational.Relational, And, Or, Not, sympy.functions.elementary.piecewise.ExprCondPair)

_LABELS = {"lr": "learning rate", "eps": "epsilon", "weight_decay": "weight decay", "momentum": "momentum"}


@dataclass(frozen=True)
class Origin:
    """Where in the spec file a declaration was written."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Arg:
    """One constructor argument: a hyperparameter (float), a tuple of them, or a boolean flag."""

    name: str
    default: Any
    symbols: tuple[sympy.Symbol, ...]
    kind: str  # "float" | "tuple" | "flag" | "optional_float" | "optional_int"
    domain: sympy.Set | None
    doc: str
    origin: Origin
    labels: tuple[str, ...] = ()
    after: str | None = None
    type: str = "float"
    errors: tuple[str, ...] = ()  # torch.optim-style messages (``error=``): one per value, or one for all
    optional_keys: tuple[str, ...] = ()  # values of a tuple whose default is None (may be None)
    choices: tuple = ()  # kind "choice": the values the argument may take (strings, and None if one is)

    @property
    def group_keys(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.symbols)


@dataclass
class State:
    name: str
    symbol: sympy.Symbol
    init: sympy.Expr
    when: Any  # host condition under which the buffer exists, or True
    origin: Origin
    scalar: bool = False  # a 0-dim record (optimi's eps_sq), never read by the math
    axes: tuple[int, ...] = ()  # dims of the param's shape set to 1 (the shape of spec.mean(x, axis=...))
    nonnegative: bool | None = None  # declared sign (None: inferred, optcompile/nonnegative.py)
    precision: str = "fp32"  # a scalar state's storage: "fp32" (torch.optim's 0-dim tensors) or "fp64"


@dataclass
class Stmt:
    """One assignment as the author wrote it: a state update, a named value, or the param update."""

    target: sympy.Symbol
    expr: sympy.Expr
    origin: Origin
    kind: str  # "state" | "let" | "update" | "param"
    when: Any = True
    lr: sympy.Expr | None = None
    decay_lr: sympy.Expr | None = None  # spec.update's decay_lr=: the lr weight decay uses, if not lr
    state: sympy.Symbol | None = None  # kind "scalar": the scalar state whose new value ``target`` is


@dataclass
class MatrixFnDecl:
    """A host tensor function as ``spec.matrix_fn`` received it: its name and source, checked."""

    symbol: sympy.Symbol
    fn: str
    source: str
    batched: bool
    origin: Origin


@dataclass
class ReductionDecl:
    symbol: sympy.Symbol
    op: str
    expr: sympy.Expr
    origin: Origin
    axis: int | None = None  # None: over all elements (per tensor); else along one dim, keepdim


@dataclass
class OptimizerSpec:
    """An optimizer as math (see the module docstring for the DSL reference).

    ``weight_decay`` names the decay style the compiler injects (``"decoupled"``, ``"l2"`` with a
    ``decouple_wd`` switch, ``"proximal"`` (Adan), or ``None`` for no decay arguments at all);
    ``kahan_sum`` is the constructor default for Kahan summation of low-precision params;
    ``group_constants`` are fixed param_group entries kept for state_dict layout.
    """

    name: str
    weight_decay: str | None = "decoupled"
    kahan_sum: bool | None = None
    decouple_wd: bool = False
    decoupled_flag: str | None = None
    group_constants: dict = field(default_factory=dict)
    state_dict: str = "optimi"  # "torch": torch.optim's state_dict layout (optcompile/checkpoint.py)
    torch_step: bool = True  # state_dict="torch": the torch class keeps a per-param step (Muon's does not)
    doc: str = ""
    functional: str | None = None
    args: list[Arg] = field(default_factory=list)
    states: list[State] = field(default_factory=list)
    stmts: list[Stmt] = field(default_factory=list)
    reductions: list[ReductionDecl] = field(default_factory=list)
    lets: dict[str, Origin] = field(default_factory=dict)
    file: str = "<spec>"
    origin: Origin | None = None
    order: tuple[str, ...] = ()  # spec.signature(): the constructor's argument order, "*" keyword-only
    matrix_fns: list[MatrixFnDecl] = field(default_factory=list)
    param_ndims: tuple[int, ...] = ()  # spec.param_ndim(): the param ranks the class accepts
    param_ndim_error: str = ""

    def __post_init__(self) -> None:
        self.file = _caller_file()
        self.origin = _origin(self.file)
        if not self.name.isidentifier():
            raise SpecError(f"spec name {self.name!r} is not a Python identifier", self.file, self.origin.line)
        if self.weight_decay not in ("decoupled", "l2", "proximal", None):
            raise SpecError(f"weight_decay={self.weight_decay!r}: expected 'decoupled', 'l2', 'proximal' or None",
                            self.file, self.origin.line)
        if self.state_dict not in ("optimi", "torch"):
            raise SpecError(f"state_dict={self.state_dict!r}: expected 'optimi' or 'torch'", self.file, self.origin.line)
        if not self.torch_step and self.state_dict != "torch":
            raise SpecError("torch_step=False is for state_dict='torch' (a torch.optim class that keeps no step)",
                            self.file, self.origin.line)
        if not self.doc:
            module = sys.modules.get(_spec_module_name(self.file))
            self.doc = (getattr(module, "__doc__", None) or "").strip() if module else ""
        self.functional = self.functional or self.name.lower()
        self.param = sympy.Symbol("param", real=True)
        self.grad = sympy.Symbol("grad", real=True)
        self.step = sympy.Symbol("step", integer=True, positive=True)
        self.numel = sympy.Symbol("numel", integer=True, positive=True)  # elements of the tensor being stepped
        self.ndim = NDIM  # the param's number of dims: a structural host value (one per call, see runtime)
        self.dtype_eps = DTYPE_EPS  # torch.finfo(param.dtype).eps: a host value per (device, dtype) group
        self._names: dict[str, Origin] = {"param": self.origin, "grad": self.origin, "step": self.origin,
                                          "numel": self.origin, "ndim": self.origin, "dtype_eps": self.origin,
                                          **{n: self.origin for n in SIZES}}
        self._is_none: dict[sympy.Symbol, sympy.Symbol] = {}  # optional hyper → its `is_none` host bool
        self._made: set[str] = set()  # symbol names the DSL made: reductions, SSA versions, renamed lets
        self._versions = itertools.count(1)
        self._updated = False
        self._direct = False  # the param is written by spec.set_param alone (no spec.update)
        self.views: dict[str, tuple[sympy.Expr, Origin]] = {}  # spec.eval_view: "eval"/"train" → param value
        self.alias: dict[sympy.Symbol, tuple[sympy.Symbol, int]] = {}  # value after stmt i of a buffer
        self.scalar_versions: dict[sympy.Symbol, sympy.Symbol] = {}  # a scalar state's new value → the state

    # ── declarations ───────────────────────────────────────────────────────────────────────────
    def hyper(self, name: str, default: Any = REQUIRED, domain: sympy.Set | None = None, *, names=None,
              doc: str = "", labels=None, after: str | None = None, type: type = float, error=None,
              choices=None):
        """A float hyperparameter (``names=`` makes a tuple such as ``betas``); returns its symbol(s).

        ``default=None`` makes an optional one (``int | None`` with ``type=int``): branch on
        ``spec.is_none(x)``; the math may read ``x`` only where that is false. ``error``: torch.optim's
        ValueError message(s) for values outside ``domain``.

        ``choices=("a", "b", ...)`` (strings, and ``None`` if the argument may be None): a string
        argument that takes one of these values, validated at construction (``error``, formatted
        with the argument, or a message listing the choices). It returns no symbol but a dict from
        each choice to the host condition "the argument is that choice in this param group", for
        ``Piecewise`` and ``when=``; the math reads the argument only through these conditions."""
        origin = _origin(self.file)
        if choices is not None:
            return self._choice(name, default, choices, origin, domain=domain, names=names, doc=doc, labels=labels,
                                after=after, error=error)
        if type not in (int, float):
            raise SpecError(f"hyper {name!r}: type={getattr(type, '__name__', type)!r}; expected int or float "
                            "(a bool is spec.flag)", self.file, origin.line)
        errors = (error,) if isinstance(error, str) else tuple(error or ())
        if isinstance(domain, (tuple, list)) and not (isinstance(default, (tuple, list)) or names is not None):
            raise SpecError(f"hyper {name!r}: one domain per element is for tuple hyperparameters", self.file,
                            origin.line)
        if isinstance(default, (tuple, list)) or names is not None:
            names = tuple(names or ())
            if isinstance(default, (tuple, list)) and len(names) != len(default):
                raise SpecError(f"hyper {name!r}: {len(names)} names for a default of {len(default)} values",
                                self.file, origin.line)
            syms = tuple(self._new_symbol(n, origin) for n in names)
            labels = tuple(labels or (f"{n} parameter" for n in names))
            if isinstance(domain, (tuple, list)):
                domain = tuple(domain)
                if len(domain) != len(names):
                    raise SpecError(f"hyper {name!r}: {len(domain)} domains for {len(names)} values", self.file,
                                    origin.line)
            if len(errors) not in (0, 1, len(names)):
                raise SpecError(f"hyper {name!r}: {len(errors)} error messages for {len(names)} values", self.file,
                                origin.line)
            optional = tuple(n for n, v in zip(names, default) if v is None) if default is not REQUIRED else ()
            self._add_arg(Arg(name, tuple(default) if default is not REQUIRED else default, syms, "tuple",
                              domain, doc, origin, labels, after, type.__name__, errors, optional))
            return syms
        sym = self._new_symbol(name, origin)
        if type is int and default is not REQUIRED and default is not None and (
                isinstance(default, bool) or not isinstance(default, int)):
            raise SpecError(f"hyper {name!r}: default={default!r} is not an int or None (type=int)",
                            self.file, origin.line)
        if len(errors) > 1:
            raise SpecError(f"hyper {name!r}: {len(errors)} error messages for one value", self.file, origin.line)
        kind = f"optional_{type.__name__}" if default is None else "float"
        self._add_arg(Arg(name, default, (sym,), kind, domain, doc, origin,
                          (labels or _LABELS.get(name, name),), after, type.__name__, errors))
        return sym

    def _choice(self, name, default, choices, origin, *, domain, names, doc, labels, after, error) -> dict:
        """``hyper(name, default, choices=...)``: a string argument and one host condition per choice."""
        where = (self.file, origin.line)
        if domain is not None or names is not None:
            raise SpecError(f"hyper {name!r}: a choice hyperparameter takes no domain= or names= (its values are "
                            "the choices)", *where)
        choices = tuple(choices) if isinstance(choices, (tuple, list)) else None
        if not choices or len(choices) < 2 or len(set(choices)) != len(choices) or \
                any(c is not None and not (isinstance(c, str) and c) for c in choices):
            raise SpecError(f"hyper {name!r}: choices= must be two or more distinct non-empty strings (and None where "
                            "the argument may be None)", *where)
        if default is not REQUIRED and default not in choices:
            raise SpecError(f"hyper {name!r}: default={default!r} is not one of the choices {choices!r}", *where)
        if error is not None and not isinstance(error, str):
            raise SpecError(f"hyper {name!r}: a choice hyperparameter takes one error message", *where)
        sym = self._new_symbol(name, origin, real=False)
        self._add_arg(Arg(name, default, (sym,), "choice", None, doc, origin, (labels or _LABELS.get(name, name),),
                          after, "str", (error,) if error else (), choices=choices))
        conditions = {}
        for c in choices:
            cond = sympy.Symbol(self._fresh(f"{name}_is_" + ("none" if c is None else
                                                             "".join(ch if ch.isalnum() else "_" for ch in c))))
            test = IsNone(sym) if c is None else IsChoice(sym, String(c))
            self.stmts.append(Stmt(cond, test, origin, "let"))
            conditions[c] = cond
        return conditions

    def weight_decay_hyper(self, default: float = 0.0, doc: str = "", error=None):
        """Declare ``weight_decay`` at this place in the signature; the weight-decay pass uses it."""
        return self.hyper("weight_decay", default, Interval(0, oo), doc=doc or "weight decay coefficient", error=error)

    def signature(self, *names: str) -> None:
        """The constructor's arguments after ``params``, in order (``"*"``: the rest are keyword-only),
        for a class that must take another library's signature (torch.optim's). Names are checked
        when the program is lowered, where the arguments the passes add are known."""
        origin = _origin(self.file)
        if self.order:
            raise SpecError("spec.signature called twice", self.file, origin.line)
        bad = [n for n in names if not isinstance(n, str) or not (n == "*" or n.isidentifier())]
        if bad or len(set(names)) != len(names) or names.count("*") > 1:
            raise SpecError(f"spec.signature{names!r}: expected distinct argument names and at most one '*'",
                            self.file, origin.line)
        self.order = tuple(names)
        self.order_origin = origin

    def flag(self, name: str, default: bool = False, *, doc: str = "", after: str | None = None):
        """A boolean constructor argument, usable in ``Piecewise`` conditions and ``when=``."""
        origin = _origin(self.file)
        sym = self._new_symbol(name, origin)
        self._add_arg(Arg(name, bool(default), (sym,), "flag", None, doc, origin, (name,), after, "bool"))
        return sym

    def state(self, name: str, init: Any = 0, *, when: Any = True, scalar: bool = False, axis: Any = None,
              nonnegative: bool | None = None, precision: str = "fp32"):
        """A per-parameter buffer saved in ``optimizer.state[p][name]`` (param shape and dtype).

        ``axis=-1`` (or a tuple of dims) stores it in a reduced shape: the param's with those dims
        set to 1, the shape of ``spec.mean(x, axis=-1)`` (Adafactor's row and column factors).
        ``scalar=True``: one value per param, a 0-dim tensor initialised from hyperparameters. If
        the step reads or assigns it, it is an fp32 *scalar state* (torch.optim's NAdam
        ``mu_product``): read as a host value of its param, written by ``assign``. If not, it is a
        record in the param's dtype, kept only so that state_dicts match another library's layout
        (optimi's StableAdamW ``eps_sq``). ``precision="fp64"``: a scalar state stored as a 0-dim
        fp64 tensor and computed in double, as a Python float is (a running sum such as
        Schedule-Free's ``weight_sum``, kept as exactly as the reference's group value).
        ``nonnegative=True`` declares that the state is never negative (``False``: that it may be),
        where the compiler cannot infer it (optcompile/nonnegative.py): under
        ``state_precision="8bit"`` a non-negative state takes an unsigned code (optcompile/quantize.py).
        """
        origin = _origin(self.file)
        if precision not in ("fp32", "fp64") or (precision != "fp32" and not scalar):
            raise SpecError(f"state {name!r}: precision={precision!r}; a scalar state (scalar=True) is 'fp32' or "
                            "'fp64' (a tensor state's storage is the constructor's state_precision)", self.file,
                            origin.line)
        sym = self._new_symbol(name, origin)
        init = self._expr(init, origin, "init")
        if scalar and init.free_symbols & {self.param, self.grad}:
            raise SpecError(f"scalar state {name!r}: init may use hyperparameters only", self.file, origin.line, init)
        axes = self._axes(axis, origin, f"state {name!r}") if axis is not None else ()
        if axes and (scalar or init.free_symbols & {self.param, self.grad}):
            raise SpecError(f"state {name!r}: a reduced-shape state (axis=) is not a scalar record and its init may "
                            "use hyperparameters only", self.file, origin.line, init)
        if nonnegative is not None and not isinstance(nonnegative, bool):
            raise SpecError(f"state {name!r}: nonnegative must be True, False or None, not {nonnegative!r}",
                            self.file, origin.line)
        self.states.append(State(name, sym, init, when, origin, scalar, axes, nonnegative, precision))
        return sym

    def let(self, name: str, expr: Any):
        """Name a value. Host-only math (hypers, step) runs once per step; the name survives codegen."""
        origin = _origin(self.file)
        expr = self._expr(expr, origin, name)
        sym = self._new_symbol(name, origin, real=not isinstance(expr, sympy.logic.boolalg.Boolean), let=True)
        self.lets[name] = origin
        self.stmts.append(Stmt(sym, expr, origin, "let"))
        return sym

    def assign(self, state: sympy.Symbol, expr: Any, *, when: Any = True):
        """``state ← expr`` (per element; per param for a scalar state). Returns the new value;
        ``when=`` makes it conditional."""
        origin = _origin(self.file)
        if state in (self.param, self.grad) or getattr(state, "name", None) in ("param", "grad", "step", "numel"):
            raise SpecError(f"cannot assign to `{state}`: only states can be assigned (use spec.update for "
                            "the parameter)", self.file, origin.line, state)
        base = self._state_of(state, origin)
        expr = self._expr(expr, origin, base.name)
        if base.scalar:  # a host value per param: each new value is its own symbol (no buffer to snapshot)
            new = sympy.Symbol(self._fresh(f"{base.name}_new"), real=True)
            self.stmts.append(Stmt(new, expr, origin, "scalar", when=_cond(when), state=base.symbol))
            self.scalar_versions[new] = base.symbol
            return new
        new = sympy.Symbol(self._fresh(f"{base.name}__v{next(self._versions)}"), real=True)
        self.stmts.append(Stmt(base.symbol, expr, origin, "state", when=_cond(when)))
        self.alias[new] = (base.symbol, len(self.stmts) - 1)
        return new

    def update(self, direction: Any, *, lr: Any = None, decay_lr: Any = None):
        """The parameter step ``param ← param − lr·direction``; returns the updated param.

        ``lr`` is kept apart so that weight decay can use the effective learning rate and Kahan
        summation can see the whole Δp. ``decay_lr``: the learning rate the injected weight decay
        uses instead (torch's Adafactor steps by a relative ``alpha`` but decays by the group's lr).
        """
        origin = _origin(self.file)
        if self._direct:
            raise SpecError("spec.update after spec.set_param: a spec that writes its param directly takes no "
                            "spec.update (write every param value with spec.set_param)", self.file, origin.line)
        if self._updated:
            raise SpecError("spec.update called twice; use spec.set_param for later param writes",
                            self.file, origin.line)
        if lr is None:
            raise SpecError("spec.update needs the learning rate: spec.update(direction, lr=lr)",
                            self.file, origin.line, direction)
        direction = self._expr(direction, origin, "update")
        lr = self._expr(lr, origin, "lr")
        decay_lr = self._expr(decay_lr, origin, "decay_lr") if decay_lr is not None else None
        if decay_lr is not None and self.weight_decay is None:
            raise SpecError("spec.update(decay_lr=...) is the lr of the injected weight decay, but this spec has "
                            "weight_decay=None", self.file, origin.line, decay_lr)
        self._updated = True
        self.stmts.append(Stmt(self.param, self.param - lr * direction, origin, "update", lr=lr, decay_lr=decay_lr))
        new = sympy.Symbol(self._fresh(f"param__v{next(self._versions)}"), real=True)
        self.alias[new] = (self.param, len(self.stmts) - 1)
        return new

    def set_param(self, expr: Any, *, when: Any = True):
        """A parameter write ``param ← expr``: a later one after ``update`` (Ranger's lookahead
        ``p ← slow``), or, in a spec with ``weight_decay=None``, the param update itself, written
        directly instead of as ``p − lr·d`` (Schedule-Free's interpolation ``y``; nothing divides by
        the learning rate, so ``lr = 0`` is a step like any other). Returns the new param."""
        origin = _origin(self.file)
        if not self._updated:
            if self.weight_decay is not None:
                raise SpecError("spec.set_param before spec.update: the injected weight decay "
                                f"(weight_decay={self.weight_decay!r}) decays by the lr of spec.update; call "
                                "spec.update first, or declare weight_decay=None and write the param with "
                                "spec.set_param alone", self.file, origin.line)
            self._updated = self._direct = True
        expr = self._expr(expr, origin, "param")
        self.stmts.append(Stmt(self.param, expr, origin, "param", when=_cond(when)))
        new = sympy.Symbol(self._fresh(f"param__v{next(self._versions)}"), real=True)
        self.alias[new] = (self.param, len(self.stmts) - 1)
        return new

    def eval_view(self, *, eval: Any, train: Any):
        """Two views of the params: the step sees the *training* view; ``eval`` is the value the
        params hold in eval mode, from the training-view ``param`` and the states, and ``train``
        the training-view param back from the eval-view ``param`` and the states (Schedule-Free:
        ``x = lerp(y, z, 1 − 1/β)`` and ``y = lerp(x, z, 1 − β)``). Elementwise, read-only on the
        states, hyperparameters as host values. The class gets ``train()`` and ``eval()``, which
        swap what the params hold on every backend; ``train_mode`` in each param group says which
        view is live (saved in state_dicts), and ``step()`` in eval mode raises."""
        origin = _origin(self.file)
        if self.views:
            raise SpecError("spec.eval_view called twice", self.file, origin.line)
        views = {}
        for name, value in (("eval", eval), ("train", train)):
            expr = self._expr(value, origin, f"eval_view({name}=...)")
            for sym in expr.free_symbols:  # a state's later SSA value: views read what the buffer holds
                if sym in self.alias or sym in self.scalar_versions:
                    raise SpecError(f"eval_view({name}=...) reads `{sym}`, a value the step computes; a view reads "
                                    "the param, the states as stored and hyperparameters: pass the symbol "
                                    "spec.state returned", self.file, origin.line, expr)
                st = next((st for st in self.states if st.symbol == sym), None)
                if st is not None and (st.scalar or st.axes):
                    raise SpecError(f"eval_view({name}=...) reads `{sym}`, a scalar or reduced-shape state; a view is "
                                    "elementwise over the param and its full-shape states", self.file, origin.line,
                                    expr)
                if sym in (self.grad, self.step, self.numel, self.ndim, self.dtype_eps) or sym.name in self.lets:
                    raise SpecError(f"eval_view({name}=...) reads `{sym}`; a view may read the param, its states and "
                                    "hyperparameters only", self.file, origin.line, expr)
            views[name] = (expr, origin)
        self.views = views

    def mean(self, expr: Any, *, axis: int | None = None):
        """Mean over all elements of this parameter (a per-tensor reduction), or with ``axis=k`` along
        dim ``k`` only, keeping it as size 1 (``torch.mean(x, dim=k, keepdim=True)``)."""
        return self._reduce("mean", expr, axis)

    def sum(self, expr: Any, *, axis: int | None = None):
        """Sum over all elements of this parameter (a per-tensor reduction), or along dim ``axis``."""
        return self._reduce("sum", expr, axis)

    def max(self, expr: Any, *, axis: int | None = None):
        """Maximum over all elements of this parameter (a per-tensor reduction), or along dim ``axis``."""
        return self._reduce("max", expr, axis)

    def size(self, k: int):
        """The size of dim ``k`` (0 … 3) of the param: a *structural* host value, as ``spec.ndim``;
        the runtime calls each step function on params of one shape. Muon's learning-rate
        adjustment: ``lr * sqrt(Max(1, spec.size(0) / spec.size(1)))``."""
        origin = _origin(self.file)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(SIZES):
            raise SpecError(f"spec.size({k!r}): expected a dim 0 … {len(SIZES) - 1} (counted from the first)",
                            self.file, origin.line)
        return sympy.Symbol(SIZES[k], integer=True, positive=True)

    def param_ndim(self, *ndims: int, error: str = ""):
        """The param ranks the optimizer accepts (Muon: 2-D only): the class raises ``ValueError``
        for any other, at construction and in ``add_param_group``, with ``error`` (formatted with
        ``size``, the param's ``torch.Size``) or a message naming the ranks and the size."""
        origin = _origin(self.file)
        if not ndims or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in ndims):
            raise SpecError(f"spec.param_ndim{ndims!r}: expected one or more non-negative ints", self.file,
                            origin.line)
        if self.param_ndims:
            raise SpecError("spec.param_ndim is called twice", self.file, origin.line)
        self.param_ndims, self.param_ndim_error = tuple(sorted(set(ndims))), error

    def matrix_fn(self, fn, x: Any, *args: Any, batched: bool = False):
        """A host tensor function of the whole tensor between elementwise stages:
        ``fn(X, *args) -> Tensor`` of ``X``'s shape, where ``X`` is the element value ``x`` as a
        tensor of the param's shape (fp32 for low-precision params) and ``args`` are host values
        (hyperparameters, host lets, numbers). ``batched=True``: ``X`` is a stack of same-shaped
        tensors (a leading batch dim; write ``fn`` with ``.mT`` and ``@``), and the runtime calls
        it once per shape. ``fn`` is a module-level ``def`` of the spec file that uses only its
        arguments, ``torch`` and ``math``: its source is copied into the generated module. The
        result is an element value of the later stage. Declare the param ranks it takes with
        ``spec.param_ndim(...)``."""
        origin = _origin(self.file)
        name = getattr(fn, "__name__", None)
        where = (self.file, origin.line)
        if not inspect.isfunction(fn) or name == "<lambda>":
            raise SpecError(f"spec.matrix_fn: {fn!r} is not a function defined with `def` (a lambda or another "
                            "callable has no source to copy into the generated code)", *where)
        if fn.__code__.co_freevars:
            raise SpecError(f"spec.matrix_fn: {name} reads variables of an enclosing function "
                            f"({', '.join(fn.__code__.co_freevars)}); define it at module level and pass values "
                            "as arguments", *where)
        if fn.__qualname__ != name:
            raise SpecError(f"spec.matrix_fn: {fn.__qualname__} is not defined at module level", *where)
        bad = sorted(_global_names(fn.__code__) - {"torch", "math"} - set(dir(builtins)))
        if bad:
            raise SpecError(f"spec.matrix_fn: {name} reads module-level names other than torch and math "
                            f"({', '.join(bad)}); pass them as arguments", *where)
        if name.startswith("_") or name.lower().startswith("oc_") or name in GENERATED_CODE_NAMES | RESERVED_NAMES:
            raise SpecError(f"spec.matrix_fn: the function name {name!r} clashes with the generated code; "
                            "rename it", *where)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError) as exc:
            raise SpecError(f"spec.matrix_fn: no source for {name} ({exc})", *where) from None
        known = next((m for m in self.matrix_fns if m.fn == name), None)
        if known is not None and (known.source != source or known.batched != batched):
            raise SpecError(f"spec.matrix_fn: two different functions named {name!r}", *where)
        x = self._expr(x, origin, f"matrix_fn({name}, x)")
        host_args = tuple(self._expr(a, origin, f"matrix_fn({name}, ...) argument") for a in args)
        sym = sympy.Symbol(self._fresh(f"{name}_out"), real=True)
        self.matrix_fns.append(MatrixFnDecl(sym, name, textwrap.dedent(source), bool(batched), origin))
        self.stmts.append(Stmt(sym, sympy.Tuple(x, *host_args), origin, "matrix_fn"))
        return sym

    def is_none(self, hyper: sympy.Symbol):
        """The host condition "the optional hyperparameter ``hyper`` is None in this param group",
        for ``Piecewise`` and ``when=``: ``Piecewise((1, spec.is_none(t0)), (Min(step / t0, 1), True))``."""
        origin = _origin(self.file)
        arg = next((a for a in self.args if hyper in a.symbols and (a.kind.startswith("optional_") or
                                                                    getattr(hyper, "name", None) in a.optional_keys)), None)
        if arg is None:
            raise SpecError(f"spec.is_none({hyper}): `{hyper}` is not an optional hyperparameter (declare it "
                            "with spec.hyper(name, default=None, ...))", self.file, origin.line)
        if hyper not in self._is_none:
            sym = sympy.Symbol(self._fresh(f"{hyper.name}_is_none"))
            self.stmts.append(Stmt(sym, IsNone(hyper), origin, "let"))
            self._is_none[hyper] = sym
        return self._is_none[hyper]

    def every(self, k: Any):
        """True on steps that are a multiple of ``k`` (host condition: ``step % k == 0``)."""
        return Eq(Mod(self.step, k), 0)

    # ── helpers ────────────────────────────────────────────────────────────────────────────────
    def _reduce(self, op: str, expr: Any, axis: int | None = None):
        origin = _origin(self.file)
        expr = self._expr(expr, origin, f"{op}(...)")
        if axis is not None:  # along one dim: a value of a reduced shape, not a per-tensor one
            (axis,) = self._axes(axis, origin, f"spec.{op}(..., axis=)", single=True)
            return AxisReduction.of(op, expr, axis)
        sym = sympy.Symbol(self._fresh(f"{op}{len(self.reductions)}"), real=True)
        self.reductions.append(ReductionDecl(sym, op, expr, origin))
        self.stmts.append(Stmt(sym, expr, origin, "reduce"))
        return sym

    def _axes(self, axis: Any, origin: Origin, what: str, single: bool = False) -> tuple[int, ...]:
        """Dims as given (``-1``, or a tuple for a state): ints, distinct; negative ones count from the last."""
        axes = (axis,) if isinstance(axis, int) else tuple(axis) if isinstance(axis, (tuple, list)) and not single \
            else None
        if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes) or len(set(axes)) != len(axes):
            want = "an int" if single else "an int or a tuple of distinct ints"
            raise SpecError(f"{what}: axis={axis!r}; expected {want} (a dim of the param, e.g. -1 for the last)",
                            self.file, origin.line)
        return axes

    def _add_arg(self, arg: Arg) -> None:
        if any(a.name == arg.name for a in self.args):
            raise SpecError(f"argument {arg.name!r} declared twice", self.file, arg.origin.line)
        self.args.append(arg)

    def _new_symbol(self, name: str, origin: Origin, real: bool = True, let: bool = False) -> sympy.Symbol:
        """A declared name as a symbol. ``let`` names are internal to the step, so they may equal a
        name of the generated code (lowering renames them there); API names may not."""
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(f"{name!r} is not a valid identifier", self.file, origin.line)
        if name in RESERVED_NAMES:
            raise SpecError(f"{name!r} is a reserved name (reserved: {', '.join(sorted(RESERVED_NAMES))})",
                            self.file, origin.line)
        if (keyword.iskeyword(name) if let else name in GENERATED_CODE_NAMES) or name.startswith("_") or \
                name.lower().startswith("oc_"):
            raise SpecError(f"{name!r} clashes with the generated code (Python/C keywords, module names, and "
                            "names starting with '_' or 'oc_' are reserved)", self.file, origin.line)
        if name in self._names:
            raise SpecError(f"{name!r} is already declared at line {self._names[name].line}", self.file, origin.line)
        if name in self._made and not let:
            raise SpecError(f"{name!r} is already the name of a value made by an earlier call (spec.sum/mean/max "
                            "results are sum0, mean1, …; spec.assign results m__v1, …): declare it before that "
                            "call or choose another name", self.file, origin.line)
        self._names[name] = origin
        symbol_name = self._fresh(name) if name in self._made else name  # a let `sum0` after spec.sum(): `sum0_`
        return sympy.Symbol(symbol_name, real=True) if real else sympy.Symbol(symbol_name)

    def _fresh(self, name: str) -> str:
        """``name``, or ``name_``, ``name__`` … : a symbol name the DSL makes (a reduction, an SSA
        version) never equals a name the user declared or will declare (see ``_new_symbol``)."""
        while name in self._made or name in self._names:
            name += "_"
        self._made.add(name)
        return name

    def _state_of(self, sym: Any, origin: Origin) -> State:
        sym = self.scalar_versions.get(sym) or self.alias.get(sym, (sym,))[0]
        for st in self.states:
            if st.symbol == sym:
                return st
        raise SpecError(f"`{sym}` is not a state: declare it with spec.state(...)", self.file, origin.line, sym)

    def _expr(self, value: Any, origin: Origin, what: str):
        try:
            expr = sympy.sympify(value)
        except (sympy.SympifyError, TypeError) as exc:
            raise SpecError(f"{what}: {value!r} is not a sympy expression ({exc})", self.file, origin.line) from None
        for node in sympy.preorder_traversal(expr):
            if not isinstance(node, _ALLOWED_NODES) and not isinstance(node, sympy.Tuple):
                fn = getattr(getattr(node, "func", None), "__name__", type(node).__name__)
                raise SpecError(f"unsupported sympy function {fn!r}; supported: "
                                f"{', '.join(SUPPORTED_FUNCTIONS)} and + - * / **", self.file, origin.line, expr)
        known = set(self._names) | self._made
        for s in sorted(expr.free_symbols, key=lambda s: s.name):
            if s.name not in known:
                raise SpecError(f"undefined symbol `{s.name}`: declare it with spec.hyper/flag/state/let",
                                self.file, origin.line, expr)
        return expr


def _cond(when: Any):
    return sympy.true if when is True else when


def _spec_module_name(file: str) -> str:
    return "optcompile_spec_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(file))


def _caller_file() -> str:
    here = os.path.abspath(__file__)
    for frame in inspect.stack()[1:]:
        if os.path.abspath(frame.filename) != here and not frame.filename.startswith("<"):
            return frame.filename
    return "<spec>"


def _origin(file: str) -> Origin:
    """The line in ``file`` that is calling into the DSL right now."""
    frame = sys._getframe(1)
    target = os.path.abspath(file)
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename) == target:
            return Origin(_display(file), frame.f_lineno)
        frame = frame.f_back
    return Origin(_display(file), 0)


def _display(file: str) -> str:
    """Spec paths as users type them: relative to the cwd when under it, else absolute."""
    path = os.path.abspath(file)
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def _global_names(code) -> set[str]:
    """The global names a function's code reads (its nested functions' too)."""
    reads = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if inspect.iscode(const):
            reads |= _global_names(const)
    return reads


def load_spec(path: str | os.PathLike) -> OptimizerSpec:
    """Execute a spec file and return its ``spec``; any failure becomes a SpecError with file:line."""
    path = Path(path)
    if path.is_dir():
        raise SpecError("is a directory, not a spec file", str(path))
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    if path.suffix != ".py":
        raise SpecError("not a spec file: a spec is a Python file ending in .py", str(path))
    name = _spec_module_name(str(path))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SpecError:
        raise
    except SystemExit as exc:  # a spec declares an optimizer; ending the process is a bug in it
        raise SpecError(f"spec called sys.exit({exc.code!r}) while loading", _display(str(path))) from None
    except SyntaxError as exc:
        raise SpecError(f"syntax error: {exc.msg}", _display(str(path)), exc.lineno) from None
    except Exception as exc:  # the author's code raised: point at their line
        tb = exc.__traceback__
        line = None
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        raise SpecError(f"spec raised {type(exc).__name__}: {exc}", _display(str(path)), line) from exc
    finally:
        sys.modules.pop(name, None)
    spec = getattr(module, "spec", None)
    if not isinstance(spec, OptimizerSpec):
        found = [k for k, v in vars(module).items() if isinstance(v, OptimizerSpec)]
        if len(found) == 1:
            spec = getattr(module, found[0])
        else:
            raise SpecError("the file defines no `spec = OptimizerSpec(...)`", _display(str(path)), 1)
    spec.source = path.read_bytes()
    spec.path = str(path)
    return spec
