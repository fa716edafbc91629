"""The Optimizer every generated class derives from: optimi's runtime contract, written once.

Generated modules supply the math (host scalars, state allocation, one function per backend);
this module supplies what is the same for every algorithm: param groups and lazy state, the int32
``step`` in param groups, backend choice, grouping by (device, dtype), gradient release and
optimizer accumulation. Importing it does not import sympy or the compiler.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings
from ctypes import c_float as _c_float
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .backends import custom_ops, registry
from .layouts import DICT_VERSION, MISSING, LayoutCache
from .step_flags import step_flags, view_flags

LOW_PRECISION = (torch.bfloat16, torch.float16)


def fp32(x):
    """The compute view of a buffer: itself in fp32/fp64, an fp32 copy in bf16/fp16 (lists too)."""
    if x is None:
        return None
    if isinstance(x, list):
        if not x or x[0] is None or x[0].dtype not in LOW_PRECISION:
            return x
        return [t.float() for t in x]
    return x.float() if x.dtype in LOW_PRECISION else x


def round_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32, as a float32 tensor stores it (ties to even, ±inf past
    its range, NaN kept): the value a scalar state holds (``ir.Fp32``)."""
    return _c_float(x).value


def fmax(*values):
    """The DSL's ``Max`` on host and per-tensor scalars: NaN operands are ignored, as by C's
    ``fmax`` and the kernels (Python's ``max(1, nan)`` is 1 but ``max(nan, 1)`` is nan)."""
    kept = [v for v in values if v == v]
    return max(kept) if kept else math.nan


def fmin(*values):
    """The DSL's ``Min`` on scalars, ignoring NaN operands like :func:`fmax`."""
    kept = [v for v in values if v == v]
    return min(kept) if kept else math.nan


def clamp(x, lo=None, hi=None):
    """The DSL's ``clamp`` on host and per-tensor scalars, as ``torch.clamp``: NaN if ``x`` or a bound
    is NaN (unlike :func:`fmax`), and ``hi`` where ``lo > hi``; a None bound is open."""
    if x != x or (lo is not None and lo != lo) or (hi is not None and hi != hi):
        return math.nan
    if lo is not None and x < lo:
        x = lo
    if hi is not None and x > hi:
        x = hi
    return x


def div(a: float, b: float) -> float:
    """IEEE ``a / b`` for per-tensor values, as in the kernels: ``x/0 = ±inf``, ``0/0 = nan`` (a zero
    sum, or ``numel`` of an empty tensor), where Python raises ``ZeroDivisionError``."""
    if b == 0:
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def sqrt(x: float) -> float:
    """IEEE ``sqrt`` for host and per-tensor values: NaN below 0 (``math.sqrt`` raises), as in the kernels."""
    return math.sqrt(x) if x >= 0 else math.nan


def rsqrt(x: float) -> float:
    """``1 / sqrt(x)``: +inf at 0 (Python raises ``ZeroDivisionError``), NaN below 0."""
    if x > 0:
        return 1.0 / math.sqrt(x)
    return math.inf if x == 0 else math.nan


def reciprocal(x: float) -> float:
    """``1 / x``: ±inf at ±0, as IEEE division (Python raises ``ZeroDivisionError``)."""
    if x == 0:
        return math.copysign(math.inf, x)
    return 1.0 / x


def exp(x: float) -> float:
    """IEEE ``exp``: +inf past the largest double (``math.exp`` raises ``OverflowError``)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def power(x: float, y: float) -> float:
    """IEEE ``pow`` (C's): ±inf on overflow and for 0 to a negative power, NaN for a negative base
    to a non-integer power (Python raises ``OverflowError``/``ZeroDivisionError`` or returns a
    complex number); ``math.pow``, the same C function as ``x ** y`` on floats, elsewhere."""
    try:
        return math.pow(x, y)
    except OverflowError:
        return -math.inf if x < 0 and _odd_integer(y) else math.inf
    except ValueError:  # 0 to a negative power, or a negative base to a non-integer one
        if x == 0:
            return math.copysign(math.inf, x) if _odd_integer(y) else math.inf
        return math.nan


def _odd_integer(y: float) -> bool:
    return math.isfinite(y) and y == int(y) and int(y) % 2 == 1


def log(x: float) -> float:
    """IEEE ``log``: -inf at 0, NaN below 0 (``math.log`` raises)."""
    if x > 0:
        return math.log(x)
    return -math.inf if x == 0 else math.nan


@dataclass
class OptimizerInfo:
    """What a generated module tells the runtime about its algorithm."""

    name: str
    functional: str
    keys: tuple[str, ...]
    states: tuple[str, ...]
    uses_step: bool
    host: Callable[..., dict]
    init_state: Callable
    backends: dict[str, Callable]
    module: str
    key: str  # the cache key every file of its compile is stamped with: a backend file must match it
    extra: dict[str, Any] = field(default_factory=dict)
    scalar_states: tuple[str, ...] = ()  # 0-dim fp32 states the step reads as host values and writes
    scalar_update: Callable[..., tuple] | None = None  # host inputs → the scalar states' new values

    def backend(self, name: str) -> Callable:
        if name not in self.backends:
            from .loader import load_backend  # triton / fused live in their own generated files
            self.backends[name] = load_backend(self, name)
        return self.backends[name]


def _group_by_device_and_dtype(params, lists, single: bool | None = None, by_ndim: bool = False,
                               by_shape: bool = False):
    """Indices of params per (device, dtype), and per ``ndim`` or per shape where the algorithm
    reads it (structural host values, one per call; a tensor function batched over same-shaped
    params); one group (no copy) in the common case."""
    first = params[0]

    def part(p):
        return tuple(p.shape) if by_shape else p.dim() if by_ndim else 0

    if by_ndim or by_shape:
        single = single and all(part(p) == part(first) for p in params)
    if single if single is not None else all(p.device == first.device and p.dtype == first.dtype and
                                             part(p) == part(first) for p in params):
        return [(first.device, first.dtype, params, lists)]
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, part(p)), []).append(i)
    return [(dev, dt, [params[i] for i in idx], [[lst[i] for i in idx] for lst in lists])
            for (dev, dt, _), idx in groups.items()]


def structure_values(info: "OptimizerInfo", param: torch.Tensor) -> dict:
    """The structural host inputs a spec reads (``spec.ndim``, ``spec.dtype_eps``, ``spec.size(k)``),
    from the first param of a call: every param of one call shares them (``_group_by_device_and_dtype``)."""
    names = info.extra.get("structure", ())
    if not names:
        return {}
    values = {"ndim": param.dim(), "dtype_eps": torch.finfo(param.dtype).eps}
    for k in range(4):
        values[f"size{k}"] = param.shape[k] if k < param.dim() else None
    out = {n: values[n] for n in names}
    missing = [n for n, v in out.items() if v is None]
    if missing:
        raise ValueError(f"{info.name} reads {', '.join(missing)} (spec.size), but a param has shape "
                         f"{tuple(param.shape)}; declare the ranks it takes with spec.param_ndim(...)")
    return out


def apply_tensor_fn(fn, x: torch.Tensor, *args, batched: bool = False) -> torch.Tensor:
    """``fn(x, *args)`` of a spec's ``spec.matrix_fn``, checked: a tensor of ``x``'s shape, returned
    in ``x``'s dtype (a bf16 Newton–Schulz result is exact in fp32). ``batched``: ``fn`` takes a
    stack, so it gets a batch of one."""
    y = fn(x.unsqueeze(0), *args) if batched else fn(x, *args)
    want = (1, *x.shape) if batched else tuple(x.shape)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise RuntimeError(f"spec.matrix_fn: {fn.__name__} returned {got} for an input of shape {want}; it must "
                           "return a tensor of its input's shape")
    return (y[0] if batched else y).to(x.dtype)


def apply_tensor_fn_stacked(fn, xs: list, *args) -> list:
    """A batched ``spec.matrix_fn`` over same-shaped tensors: once over their stack."""
    stack = torch.stack(xs)
    y = fn(stack, *args)
    if not isinstance(y, torch.Tensor) or y.shape != stack.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise RuntimeError(f"spec.matrix_fn: {fn.__name__} returned {got} for a batch of shape "
                           f"{tuple(stack.shape)}; it must return a tensor of its input's shape")
    return list(y.to(stack.dtype).unbind(0))


def check_param_ndim(info: "OptimizerInfo", params) -> None:
    """``spec.param_ndim(...)``: a param of another rank is a ``ValueError`` (Muon: 2-D only)."""
    ndims = info.extra.get("param_ndims")
    if not ndims:
        return
    for p in params:
        if p.dim() not in ndims:
            error = info.extra.get("param_ndim_error") or (
                f"{info.name} only supports parameters with {' or '.join(map(str, ndims))} dims; found a parameter "
                "of size {size}")
            raise ValueError(error.format(size=p.size()))


def reduced_shape(shape, axes, name: str = "state") -> tuple[int, ...]:
    """``shape`` with the dims ``axes`` set to 1 (the keepdim shape of a reduction along them)."""
    out = list(shape)
    for a in axes:
        if not -len(out) <= a < len(out):
            raise ValueError(f"{name} is reduced along dim {a}, but its param has shape {tuple(shape)} "
                             f"({len(out)} dims); guard the state with when= on spec.ndim")
        out[a] = 1
    return tuple(out)


def _reduced_or_none(shape, axes):
    try:
        return torch.Size(reduced_shape(shape, axes))
    except ValueError:
        return None


def reduced_full(param: torch.Tensor, axes, value: float, name: str) -> torch.Tensor:
    """A state of a reduced shape (``spec.state(name, axis=...)``), filled with ``value``."""
    return param.new_full(reduced_shape(param.shape, axes, f"state {name!r}"), value)


def choose_backend(params, *, foreach=None, triton=None, fused=None, gradient_release=False,
                   segments=False) -> str:
    """Explicit choices win (fused, then triton, then foreach); otherwise the fastest that works:
    Triton on GPUs, the fused C kernel on CPU, foreach on other devices, the for-loop last.
    ``segments``: the spec's kernels have torch segments between their stages: values of a reduced
    shape (Adafactor), which its fused kernel reads by a broadcast index (an int64 division per
    element, no SIMD loop), slower on CPU than the for-loop (benchmarks/RESULTS.md), or a tensor
    function (Muon), matmul-bound on any backend (benchmarks/bench_muon.py); the automatic choice
    then takes the for-loop."""
    if fused:
        return "fused"
    if triton:
        return "triton"
    if foreach and not gradient_release:
        return "foreach"
    if foreach is False and triton is False and fused is False:
        return "eager"
    device = params[0].device
    from . import backends_available as avail
    if device.type == "cpu":
        if fused is None and avail.fused_cpu() and not segments:
            return "fused"
        return "eager"
    if triton is None and avail.triton_on(device):
        return "triton"
    return "eager" if gradient_release or foreach is False else "foreach"


def functional_step(info: OptimizerInfo, params, grads, state_lists, kahan_comps, hypers: dict, *, step,
                    kahan_sum=False, foreach=False, triton=False, fused=False, gradient_release=False,
                    optimizer_accumulation=False, scalar_states=None, code_scales=None, sr_seed=None,
                    sr_step=None) -> None:
    """The body of every generated functional form (``optcompile.adamw(...)``): :func:`run_functional`
    with the functional form's two memory-lean arguments.

    ``code_scales``: states passed as 8-bit codes (int8/uint8 tensors of the param's shape, as
    ``optcompile.quantize.quantize(x, nonnegative)`` makes them) with their fp32 block scales,
    ``{state name: [scales per param, None where that param's state is full precision]}`` (a
    tensor instead of a list under gradient release). The step decodes, steps and encodes them
    in place (codes and scales), exactly as the class does under ``state_precision="8bit"``: the
    fused C and Triton kernels take the codes themselves. A code tensor without its scales, or
    scales beside a full-precision state, is a ValueError naming the argument.

    ``sr_seed``: round the low-precision (bf16/fp16) params and float states stochastically,
    the random bits a hash of (seed, step, the param's position in the list, element): the same
    bits as the class with ``stochastic_rounding=True, sr_seed=seed`` over one param group in the
    same order. A spec that keeps no step count takes ``sr_step``, the number of the step being
    taken (1 for the first), for the bits. Not with ``kahan_sum=True``."""
    fn = info.functional
    single = isinstance(params, torch.Tensor)
    n = 1 if single else len(params)
    sr = None
    if sr_seed is not None:
        if isinstance(sr_seed, bool) or not isinstance(sr_seed, int):
            raise TypeError(f"{fn}: sr_seed must be an int (the stochastic-rounding seed), not {type(sr_seed).__name__}")
        if kahan_sum:
            raise ValueError(f"{fn}: sr_seed (stochastic rounding) and kahan_sum=True cannot be used together")
        if not info.uses_step and sr_step is None:
            raise ValueError(f"{fn}: sr_seed needs sr_step, the number of the step being taken (1 for the first): "
                             f"{info.name} keeps no step count, and the random bits depend on it")
        sr = (sr_seed, None if info.uses_step else int(sr_step), list(range(n)))
    elif sr_step is not None:
        raise ValueError(f"{fn}: sr_step is given without sr_seed (it numbers the steps of stochastic rounding)")
    kw = dict(kahan_sum=kahan_sum, foreach=foreach, triton=triton, fused=fused)
    codes = _functional_codes(info, params, state_lists, code_scales)
    if codes is None:
        return run_functional(info, params, grads, state_lists, kahan_comps, hypers, step=step, **kw,
                              gradient_release=gradient_release, optimizer_accumulation=optimizer_accumulation,
                              stochastic_rounding=sr, scalar_states=scalar_states)
    position = {id(p): i for i, p in enumerate([params] if single else params)}

    def call(ps, gs, lists, kcs, **more):
        index = [position[id(p)] for p in ps]
        run_functional(info, ps, gs, lists, kcs, hypers, **kw, **more,
                       stochastic_rounding=None if sr is None else (sr[0], sr[1], index))
    if kahan_comps is None:
        kahan_comps = None if single else [None] * n
    _step_eightbit(info, {"foreach": foreach, "triton": triton, "fused": fused}, params, grads, state_lists,
                   kahan_comps, step=step, scale_of=lambda p, name: codes[position[id(p)], name], call=call,
                   gradient_release=gradient_release, optimizer_accumulation=optimizer_accumulation,
                   scalar_states=scalar_states)


def _functional_codes(info: OptimizerInfo, params, state_lists, scales) -> dict | None:
    """The functional form's 8-bit states, checked: ``{(param position, state): scales}``, or None
    where no state is codes."""
    from . import quantize
    fn = info.functional
    single = isinstance(params, torch.Tensor)
    ps = [params] if single else list(params)
    if scales is not None:
        if not isinstance(scales, dict):
            raise TypeError(f"{fn}: code_scales must be a dict from state name to a list of block scales, not "
                            f"{type(scales).__name__}")
        unknown = [k for k in scales if k not in info.states]
        if unknown:
            raise ValueError(f"{fn}: code_scales names {', '.join(map(repr, unknown))}, not a state of {info.name} (its "
                             f"states: {', '.join(info.states)})")
    found = {}
    for name, lst in zip(info.states, state_lists):
        lst = [lst] if single else lst
        given = None if scales is None else scales.get(name)
        if given is not None:
            given = [given] if single and isinstance(given, torch.Tensor) else list(given)
            if len(given) != len(ps):
                raise ValueError(f"{fn}: code_scales[{name!r}] has {len(given)} entries for {len(ps)} params")
        for i, (p, t) in enumerate(zip(ps, lst)):
            s = None if given is None else given[i]
            if quantize.is_codes(t):
                if s is None:
                    raise ValueError(f"{fn}: {name}s[{i}] holds 8-bit codes ({t.dtype}): pass its block scales as "
                                     f"code_scales[{name!r}][{i}] (optcompile.quantize.quantize makes both)")
                problem = quantize.check(name, t, s, p.shape)
                if problem:
                    raise ValueError(f"{fn}: {problem}")
                found[i, name] = s
            elif s is not None:
                raise ValueError(f"{fn}: code_scales[{name!r}][{i}] is given, but {name}s[{i}] is not 8-bit codes "
                                 f"({'None' if t is None else t.dtype})")
    return found or None


def run_functional(info: OptimizerInfo, params, grads, state_lists, kahan_comps, hypers: dict, *, step,
                   kahan_sum=False, foreach=False, triton=False, fused=False, gradient_release=False,
                   optimizer_accumulation=False, group: dict | None = None,
                   stochastic_rounding: tuple[int, int | None, list[int]] | None = None,
                   scalar_states=None, scales=None, view: str | None = None) -> None:
    """One optimizer step over lists of tensors (the engine under :func:`functional_step`, the
    generated functional forms' body, and of every class step).
    ``group`` is the param group of a class step (its constants decide which states exist).
    ``scalar_states``: one list of 0-dim tensors per scalar state of the algorithm (NAdam's
    ``mu_products``), read as host values and written with the step's new values.
    ``view``: "eval" or "train" (a spec with ``spec.eval_view``) writes that view into the params
    instead of stepping: grads are not read (pass the params), states, scalar states and the step
    count are left as they are (``optimizer.eval()``/``train()``, :func:`swap_views`).
    ``stochastic_rounding``: ``(seed, counter, param indices)`` (optcompile/rounding.py); the
    counter is the step being taken, None to take it from ``step``. Under ``torch.compile`` this
    records one ``optcompile::step`` op, which runs it when the graph runs
    (optcompile/backends/custom_ops.py). ``scales``: one list per state (aligned with the params)
    of the block scales of its 8-bit codes, None where a tensor is not codes, for a backend whose
    kernel takes the codes (``kernel_codes``); they travel as lists after ``kahan_comps``."""
    if view is not None:
        return _write_view(info, view, params, state_lists, kahan_comps, hypers, step=step, kahan_sum=kahan_sum,
                           foreach=foreach, triton=triton, fused=fused, group=group, scalar_states=scalar_states)
    if torch.compiler.is_compiling():
        if stochastic_rounding is not None:
            raise NotImplementedError(f"{info.name}: stochastic_rounding=True is not supported under torch.compile "
                                      "yet (the op does not carry the random stream); call opt.step() outside it")
        return custom_ops.call(info, params, grads, state_lists, kahan_comps, hypers, step=step, kahan_sum=kahan_sum,
                               foreach=foreach, triton=triton, fused=fused, gradient_release=gradient_release,
                               optimizer_accumulation=optimizer_accumulation, group=group,
                               scalar_states=scalar_states)
    if gradient_release and foreach:
        raise ValueError(f"Gradient release {gradient_release=} and foreach {foreach=} cannot be used together")
    if isinstance(params, torch.Tensor):
        params, grads = [params], [grads]
        state_lists = [[s] for s in state_lists]
        kahan_comps = [kahan_comps]
        scalar_states = None if scalar_states is None else [[s] for s in scalar_states]
    if not params:
        return
    if kahan_comps is None:
        kahan_comps = [None] * len(params)
    lists = [params, grads, *state_lists, kahan_comps, *(scales or ())]
    for what, lst in zip(("grad", *info.states, "kahan_comp"), lists[1:]):
        if len(lst) != len(params):
            raise ValueError(f"{info.functional}: {len(params)} params but {len(lst)} {what}s; pass one per param")
    if info.scalar_states:
        if scalar_states is None or len(scalar_states) != len(info.scalar_states):
            raise ValueError(f"{info.functional}: needs its scalar states ({', '.join(info.scalar_states)}), one list "
                             "of 0-dim tensors each")
        for what, lst in zip(info.scalar_states, scalar_states):
            if len(lst) != len(params):
                raise ValueError(f"{info.functional}: {len(params)} params but {len(lst)} {what}s; pass one per param")
    hypers = host_values(info, hypers)
    if info.uses_step:  # the tensor advances once the step has run: a step that raises leaves it as it was
        hypers["step"] = int(step.item()) + 1
    alloc = hypers if group is None else {**group, **hypers}
    sr = None
    if stochastic_rounding is not None:
        from .rounding import StochasticRounding, step_key
        seed, counter, index = stochastic_rounding
        if counter is None:
            counter = hypers["step"]
        sr = StochasticRounding(step_key(seed, counter), tuple(index), (0,) * len(index))
    kw = dict(kahan_sum=kahan_sum, foreach=foreach, triton=triton, fused=fused, gradient_release=gradient_release,
              optimizer_accumulation=optimizer_accumulation, alloc=alloc)
    if not info.scalar_states:
        _step_lists(info, lists, hypers, sr, **kw)
    else:  # params holding equal scalar-state values step together, with those values' host scalars
        sets = scalar_state_sets(info, scalar_states)
        if len(sets) > 1:
            check_buffers(info, lists)  # every param's buffers before the first set is stepped
        flags = step_flags(optimizer_accumulation=optimizer_accumulation, kahan=bool(kahan_sum))
        new = []
        for idx, values in sets:
            sub = {**hypers, **dict(zip(info.scalar_states, values))}
            new.append(info.scalar_update(**sub, **flags))
            if idx is None:
                _step_lists(info, lists, sub, sr, **kw)
            else:
                _step_lists(info, [[lst[i] for i in idx] for lst in lists], sub,
                            None if sr is None else sr.take(idx), **kw)
        store_scalar_states(scalar_states, sets, new)
    if info.uses_step:
        step.add_(1)


def _write_view(info, view, params, state_lists, kahan_comps, hypers, *, step, kahan_sum, foreach, triton, fused,
                group, scalar_states) -> None:
    """``run_functional(..., view=...)``: the step function with a view switch on, which writes the
    view into the params (on the backend the step would take) and nothing else."""
    if not info.extra.get("views"):
        raise ValueError(f"{info.name} has no parameter views (its spec declares no spec.eval_view)")
    if view not in ("eval", "train"):
        raise ValueError(f"{info.name}: view={view!r}; expected 'eval' or 'train'")
    if not params:
        return
    if kahan_comps is None:
        kahan_comps = [None] * len(params)
    lists = [params, list(params), *state_lists, kahan_comps]  # the grads' slot: never read by a view write
    hypers = host_values(info, hypers)
    if "maximize" in hypers:
        hypers["maximize"] = False  # nothing negates the placeholder grads
    if info.uses_step:
        hypers["step"] = max(int(step.item()), 1)  # the host values the view does not read stay defined
    alloc = hypers if group is None else {**group, **hypers}
    kw = dict(kahan_sum=kahan_sum, foreach=foreach, triton=triton, fused=fused, gradient_release=False,
              optimizer_accumulation=False, alloc=alloc, view=view)
    if not info.scalar_states:
        return _step_lists(info, lists, hypers, None, **kw)
    for idx, values in scalar_state_sets(info, scalar_states):  # host inputs of the step; not written here
        sub = {**hypers, **dict(zip(info.scalar_states, values))}
        part = lists if idx is None else [[lst[i] for i in idx] for lst in lists]
        _step_lists(info, part, sub, None, **kw)


def _step_lists(info, lists, hypers, sr, **kw) -> None:
    """``run_functional`` on ``[params, grads, *states, kahan_comps]`` with these host values."""
    params = lists[0]
    types, dtypes = set(map(type, params)), {p.dtype for p in params}
    single = len(dtypes) == 1 and (all([p.is_cpu for p in params]) or len({p.device for p in params}) == 1)
    if any(dtype.is_complex for dtype in dtypes):
        lists = [[_real(x) for x in lst] for lst in lists]
    if any(cls.__name__ == "DTensor" for cls in types):
        if _needs_whole_tensor(info) and any([_is_sharded(p) for p in lists[0]]):
            if not _step_shards(info, lists, hypers, sr=sr, **kw):
                _step_on_full_tensors(info, lists, hypers, sr=sr, **kw)
            return
        lists = [[x.to_local() if _is_dtensor(x) else x for x in lst] for lst in lists]
    _dispatch(info, lists, hypers, single=single, sr=sr, **kw)


def scalar_state_sets(info: OptimizerInfo, scalar_states) -> list[tuple[list[int] | None, tuple[float, ...]]]:
    """The params' scalar-state values as ``[(indices, values)]``: params with bit-identical values
    in every scalar state share one set, in order of first appearance. The common case (every
    param holds the same values: a group stepped together from the start) is one set, ``None``
    for all of them. Read with one ``torch.stack`` per state (the tensors live on the CPU)."""
    columns = []
    fp64 = info.extra.get("scalar_fp64", ())  # precision="fp64" states: 0-dim fp64 tensors
    for name, lst in zip(info.scalar_states, scalar_states):
        dtype = torch.float64 if name in fp64 else torch.float32
        try:
            col = torch.stack(lst) if len(lst) > 1 else lst[0].reshape(1)
            ok = col.shape == (len(lst),) and col.dtype == dtype and col.is_cpu
        except (TypeError, RuntimeError, AttributeError):
            ok = False
        if not ok:  # not all 0-dim CPU tensors of the state's dtype: one at a time, the error naming the state
            for t in lst:
                if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
                    raise RuntimeError(f"{info.name}: scalar state {name} is {t!r:.60}, not a 0-dim floating-point "
                                       "tensor")
            col = torch.tensor([t.item() for t in lst], dtype=dtype)
        columns.append(col)
    keys = list(zip(*[c.view(torch.int64 if c.dtype == torch.float64 else torch.int32).tolist() for c in columns]))
    values = list(zip(*[c.tolist() for c in columns]))
    if keys.count(keys[0]) == len(keys):
        return [(None, values[0])]
    sets: dict = {}
    for i, key in enumerate(keys):
        sets.setdefault(key, []).append(i)
    return [(idx, values[idx[0]]) for idx in sets.values()]


def store_scalar_states(scalar_states, sets, new) -> None:
    """Write each set's new values (exact fp32 numbers, ``round_fp32``) into its params' 0-dim tensors."""
    for s, lst in enumerate(scalar_states):
        for (idx, _), values in zip(sets, new):
            targets = lst if idx is None else [lst[i] for i in idx]
            value = torch.tensor(values[s], dtype=targets[0].dtype if targets[0].dtype == torch.float64 else torch.float32)
            torch._foreach_copy_(targets, [value] * len(targets))


def check_buffers(info: OptimizerInfo, lists, needed: tuple[int, ...] = ()) -> None:
    """Every grad, state and kahan_comp is a tensor with its param's shape, on its param's device,
    and every state the step reads exists, on every backend.

    Eager's in-place ops raise on a mismatch (after stepping the tensors before it); the fused C
    and Triton kernels index every buffer by its param's numel, so a smaller one (a param resized
    after a step, a state loaded or assigned from another tensor, a short grad in the functional
    API) would be read or written out of bounds, and a Triton kernel dereferences a None state.
    ``lists`` is ``[params, grads, *states, kahan_comps]``; ``needed`` the indices of the lists the
    step reads (``allocated_states``). Per buffer this is one list of ``torch.Size`` and one of
    devices compared in C with the params', once per layout (``layouts.LayoutCache``); absent
    states (all None) cost nothing. The fused backend checks shapes in its own pass over the tensors.
    """
    if _CHECKED.get(lists) is not MISSING and all([lists[i][0] is not None for i in needed]):
        return  # the layout of a step that passed (optcompile/layouts.py): no None, no other tensor
    params = lists[0]
    n, shapes, devices = len(params), [p.shape for p in params], [p.device for p in params]
    reduced = info.extra.get("axes", {})  # states of a reduced shape (spec.state(..., axis=))
    for i, (what, lst) in enumerate(zip(("grad", *info.states, "kahan_comp"), lists[1:]), 1):
        if lst[0] is None and lst[-1] is None and lst.count(None) == n and i not in needed:
            continue  # a state this algorithm does not allocate under these hyperparameters
        want = shapes if what not in reduced else [_reduced_or_none(s, reduced[what]) for s in shapes]
        try:
            if [t.shape for t in lst] == want and [t.device for t in lst] == devices:
                continue
        except AttributeError:  # None (or not a tensor) among tensors: look at each
            pass
        for t, p in zip(lst, params):
            if t is None:
                if i in needed:
                    raise RuntimeError(
                        f"{info.name}: {what} is None for a param of shape {tuple(p.shape)}, but the step reads it "
                        "under these hyperparameters (was kahan_sum or a hyperparameter that allocates state, such "
                        "as momentum, changed after the first step, or the state replaced by None?)")
                continue
            if not isinstance(t, torch.Tensor):
                raise RuntimeError(f"{info.name}: {what} of a param of shape {tuple(p.shape)} is a "
                                   f"{type(t).__name__} ({t!r:.40}), not a tensor")
            expected = p.shape if what not in reduced else torch.Size(reduced_shape(p.shape, reduced[what], what))
            if t.shape != expected:
                raise RuntimeError(
                    f"{info.name}: {what} has shape {tuple(t.shape)} but its param has shape {tuple(p.shape)}; "
                    + (f"it must have shape {tuple(expected)} (the param's with dims {reduced[what]} set to 1)"
                       if what in reduced else "every grad and state must have its param's shape")
                    + " (was the param resized or reshaped after a step, or a state replaced by another tensor?)")
            if t.device != p.device:
                raise RuntimeError(f"{info.name}: {what} of a param of shape {tuple(p.shape)} is on {t.device} but "
                                   f"its param is on {p.device}; every grad and state must be on its param's device")
    _CHECKED.put(lists, True)


_ALLOCATED: dict = {}  # (init_state, kahan, hyperparameters) -> allocated_states
_SCALAR_TYPES = (bool, int, float, str, type(None), tuple)  # the group values that key it


def allocated_states(info: OptimizerInfo, group: dict, kahan: bool, ndim: int = 1) -> tuple[int, ...]:
    """Indices (in ``[params, grads, *states, kahan_comps]``) of the states ``init_state`` allocates
    under these hyperparameters: the step reads no state it does not allocate, so these must exist.
    Found by running it on a meta tensor (as ``load_state_dict`` does), once per hyperparameter
    values; () where it cannot run there (a group constant the functional API does not pass)."""
    ndim = ndim if "ndim" in info.extra.get("structure", ()) else 1  # states may exist per param rank
    key = (info.init_state, bool(kahan), ndim, tuple(
        [(k, v) for k, v in group.items() if v.__class__ in _SCALAR_TYPES and k != "step"]))
    try:
        found = _ALLOCATED.get(key)
    except TypeError:  # an unhashable hyperparameter value: computed every step
        key, found = None, None
    if found is None:
        meta = torch.empty((1,) * ndim, device="meta")
        meta.grad = torch.empty_like(meta)
        out: dict = {}
        try:
            info.init_state(out, meta, dict(group), bool(kahan))
            found = tuple(i for i, name in enumerate((*info.states, "kahan_comp"), 2) if out.get(name) is not None)
        except Exception:
            found = ()
        if key is not None:
            if len(_ALLOCATED) > 1024:
                _ALLOCATED.clear()
            _ALLOCATED[key] = found
    return found


_CHECKED = LayoutCache()  # layouts whose shapes check_buffers passed


def host_values(info: OptimizerInfo, hypers: dict) -> dict:
    """The step's hyperparameters as Python numbers: a 1-element tensor (``lr=torch.tensor(1e-3)``,
    as torch.optim allows) is read once per step, the same way for every backend; ``max_lr``
    defaults to ``lr`` under ``decouple_lr``, and must then be positive (it divides the decay)."""
    hypers = dict(hypers)
    if any([isinstance(v, torch.Tensor) for v in hypers.values()]):
        for k, v in hypers.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"{info.functional}: {k} must be a number or a 1-element tensor, "
                                     f"not a tensor of shape {tuple(v.shape)}")
                hypers[k] = v.item()
    if hypers.get("decouple_lr"):
        if hypers.get("max_lr") is None:
            hypers["max_lr"] = hypers["lr"]
        if not hypers["max_lr"] > 0:
            raise ValueError(_max_lr_message(hypers["max_lr"]))
    return hypers


def scalar_hyperparameters(optimizer: str, **values) -> None:
    """A constructor's or param group's hyperparameters given as tensors hold one value (torch.optim
    allows ``lr=torch.tensor(1e-3)``); one of several values has no meaning, and its range check
    would fail with torch's "Boolean value of Tensor with more than one value is ambiguous"."""
    for key, value in values.items():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                raise ValueError(f"{optimizer}: {key} must be a number or a 1-element tensor, not a tensor of "
                                 f"shape {tuple(v.shape)}")


def _max_lr_message(max_lr) -> str:
    return (f"Invalid maximum learning rate: max_lr={max_lr}. decouple_lr=True divides the weight decay by "
            "max_lr (it defaults to lr), so it must be positive")


def _dispatch(info, tensors, hypers, *, kahan_sum, foreach, triton, fused, gradient_release, optimizer_accumulation,
              single=None, alloc=None, sr=None, shards=None, view=None):
    """Group ``[params, grads, *states, kahan_comps]`` by (device, dtype) and call the backend;
    every group's buffers are checked before the first is stepped. ``sr``: this step's stochastic
    rounding (``rounding.StochasticRounding`` over ``tensors``), passed to the backend as ``_sr``;
    ``shards``: the all-reduce of per-tensor reductions over local shards
    (``sharding.ShardedReductions`` over ``tensors``), passed as ``_shards``."""
    indexed = sr is not None or shards is not None
    positions = [list(range(len(tensors[0])))] if indexed else []  # which of the tensors each group has
    groups = _group_by_device_and_dtype(tensors[0], tensors[1:] + positions, single,
                                        by_ndim="ndim" in info.extra.get("structure", ()),
                                        by_shape=info.extra.get("by_shape", False))
    if len(groups) > 1:
        check_buffers(info, tensors)
    plans = []
    for device, dtype, ps, lists in groups:
        group_sr = group_shards = None
        if indexed:
            *lists, taken = lists
            if sr is not None:
                group_sr = sr if len(groups) == 1 else sr.take(taken)
            if shards is not None:
                group_shards = shards if len(groups) == 1 else shards.take(taken)
        # per group: a CPU group may get the fused C kernel while a CUDA group gets Triton
        name = choose_backend(ps, foreach=foreach, triton=triton, fused=fused, gradient_release=gradient_release,
                              segments="kernel_segments" in info.extra)
        if name in ("triton", "fused") and not info.extra.get("kernels", True):
            name = _without_kernels(info, name, gradient_release)
        impl = info.backend(name)
        kahan = bool(kahan_sum) and dtype in LOW_PRECISION
        if not getattr(impl, "checks_buffers", False):  # the fused kernel checks in its pointer pass
            check_buffers(info, [ps, *lists], allocated_states(info, hypers if alloc is None else alloc, kahan,
                                                               ps[0].dim()))
        plans.append((device, dtype, ps, lists, name, impl, kahan, group_sr, group_shards))
    for device, dtype, ps, lists, name, impl, kahan, group_sr, group_shards in plans:
        host = info.host(**hypers, **step_flags(optimizer_accumulation=optimizer_accumulation, kahan=kahan),
                         **structure_values(info, ps[0]), **(view_flags(view) if view is not None else {}))
        if group_sr is not None:
            host["_sr"] = group_sr
        if group_shards is not None:
            host["_shards"] = group_shards
        if device.type == "cpu" and registry.get(name).in_module:
            _run_in_cpu_pieces(impl, ps, lists, host, split=not _needs_whole_tensor(info),
                               batch=CPU_FOREACH_BATCH if name == "foreach" else None)
        else:
            impl(ps, *lists, **host)


def _without_kernels(info: OptimizerInfo, name: str, gradient_release: bool) -> str:
    """A spec the kernel plan does not take (``extra["no_kernel"]``: kernel_plan.unsupported) steps
    with its torch code where the Triton or fused backend was chosen, with one warning."""
    if (info.name, name) not in _NO_KERNEL_WARNED:
        _NO_KERNEL_WARNED.add((info.name, name))
        warnings.warn(f"{info.name}: no {name} kernels for this spec ({info.extra.get('no_kernel')}); using the "
                      "foreach backend", UserWarning, stacklevel=5)
    return "eager" if gradient_release else "foreach"


_NO_KERNEL_WARNED: set = set()
CPU_CHUNK = 1 << 18  # elements of one tensor per slice (1 MiB of an fp32 temporary)
CPU_FOREACH_BATCH = 1 << 20  # elements per foreach call


def _run_in_cpu_pieces(impl, params, lists, host, *, split: bool, batch: int | None) -> None:
    """Run a Python backend over CPU tensors in cache-sized pieces.

    The eager and foreach backends allocate param-sized temporaries (the fp32 copies of bf16
    buffers, ``sqrt(v)``); at the size of a large tensor glibc maps them fresh and returns them to
    the OS every step, and the page faults cost more than the math (a fresh ``_foreach_sqrt`` over
    35M elements measured 5× the time of one into existing memory). So elementwise algorithms
    step contiguous tensors as 1-D slices of ``CPU_CHUNK`` elements, and foreach calls take lists
    of about ``CPU_FOREACH_BATCH`` elements (``batch``; None: one call, the for-loop backend):
    the temporaries stay small, recycled and in cache.
    Every element sees the same operations, so results are unchanged (bit for bit for the built-in
    specs; where torch's vector body and scalar tail differ by an ulp, as for a fractional ``pow``,
    a slice boundary moves that as a thread count does). Algorithms with per-tensor reductions
    keep whole tensors. Local shards of sharded DTensors (``_shards``) are batched by their global
    sizes, the same on every rank, so that every rank makes the same reduction collectives.
    """
    sr, shards = host.get("_sr"), host.get("_shards")
    if split and any(p.numel() > CPU_CHUNK for p in params):
        params, lists, origin = _cpu_slices(params, lists)
        if sr is not None:  # a slice draws the bits of its elements' places in the whole param
            host = {**host, "_sr": type(sr)(sr.key, tuple(sr.index[i] for i, _ in origin),
                                            tuple(sr.offset[i] + a for i, a in origin))}
            sr = host["_sr"]
    if batch is None:  # the for-loop backend: one call, its temporaries are per tensor already
        return impl(params, *lists, **host)

    def part(lo, hi):
        if sr is None and shards is None:
            return host
        out = dict(host)
        if sr is not None:
            out["_sr"] = sr.take(range(lo, hi))
        if shards is not None:
            out["_shards"] = shards.take(range(lo, hi))
        return out
    sizes = [p.numel() for p in params] if shards is None else shards.numel
    lo, total = 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > batch:
            impl(params[lo:i], *[lst[lo:i] for lst in lists], **part(lo, i))
            lo, total = i, 0
        total += n
    impl(params[lo:], *[lst[lo:] for lst in lists], **part(lo, len(params)))


def _cpu_slices(params, lists):
    """The pieces, and for each its (param position, first element)."""
    out_params, out_lists, origin = [], [[] for _ in lists], []
    for i, p in enumerate(params):
        row = [lst[i] for lst in lists]
        if p.numel() <= CPU_CHUNK or not all(t is None or t.is_contiguous() for t in [p, *row]):
            out_params.append(p)
            origin.append((i, 0))
            for out, t in zip(out_lists, row):
                out.append(t)
            continue
        flat = [p.view(-1)] + [None if t is None else t.view(-1) for t in row]
        for a in range(0, p.numel(), CPU_CHUNK):
            out_params.append(flat[0][a:a + CPU_CHUNK])
            origin.append((i, a))
            for out, t in zip(out_lists, flat[1:]):
                out.append(None if t is None else t[a:a + CPU_CHUNK])
    return out_params, out_lists, origin


def _real(x):
    """Complex tensors are optimized as their (…, 2) real view, as torch.optim does."""
    return torch.view_as_real(x) if x is not None and torch.is_complex(x) else x


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "to_local")


def _is_sharded(x) -> bool:
    return _is_dtensor(x) and any(not pl.is_replicate() for pl in x.placements)


def _needs_whole_tensor(info: OptimizerInfo) -> bool:
    """Whether the algorithm reads whole-tensor values (reductions, numel), which a local shard of
    a DTensor or a chunk of a tensor does not have (the generated module says; unknown: yes)."""
    return info.extra.get("whole_tensor", True)


def _step_shards(info, lists, hypers, **kw) -> bool:
    """Sharded DTensors under an algorithm with per-tensor reductions: each rank steps its local
    shards, and each reduction is the all-reduce of every shard's partial (optcompile/sharding.py),
    so nothing is gathered. Params are split by the process groups their reductions span (one call
    of the backend each, in param order: the same calls on every rank); replicated ones and plain
    tensors step as they are. False, nothing done, where this cannot work: a ``Partial`` placement,
    or a module whose reductions do not combine from partials (``shard_reductions``)."""
    from .sharding import ShardedReductions, reduction_groups
    if not info.extra.get("shard_reductions"):
        return False
    params = lists[0]
    groups = [reduction_groups(p) if _is_dtensor(p) else () for p in params]
    if None in groups:
        return False
    local = [[x.to_local() if _is_dtensor(x) else x for x in lst] for lst in lists]
    calls: dict = {}
    for i, g in enumerate(groups):
        calls.setdefault(g, []).append(i)
    if len(calls) > 1:
        check_buffers(info, local)  # every call's buffers before the first steps
    sr = kw.pop("sr")
    for g, idx in calls.items():
        part = local if len(calls) == 1 else [[lst[i] for i in idx] for lst in local]
        shards = ShardedReductions(tuple(params[i].numel() for i in idx), g) if g else None
        _dispatch(info, part, hypers, **kw, sr=None if sr is None else sr if len(calls) == 1 else sr.take(idx),
                  shards=shards)
    return True


def _step_on_full_tensors(info, lists, hypers, **kw) -> None:
    """Sharded DTensors whose reductions cannot be combined from the shards' partials (a
    ``Partial`` placement, axis reductions; see :func:`_step_shards`) or that take whole tensors
    (a ``spec.matrix_fn``: Muon's Newton–Schulz of the full momentum): every rank gathers the whole
    tensors, steps them, and keeps its own shard. Costs an all-gather of param, grad and states per
    step (bit-exact with an unsharded step)."""
    from torch.distributed.tensor import distribute_tensor
    full = [[x.full_tensor() if _is_dtensor(x) else x for x in lst] for lst in lists]
    _dispatch(info, full, hypers, **kw)
    for i, lst in enumerate(lists):
        if i == 1:
            continue  # grads are read-only
        for x, f in zip(lst, full[i]):
            if _is_dtensor(x):
                x.to_local().copy_(distribute_tensor(f, x.device_mesh, x.placements, src_data_rank=None).to_local())


class CompiledOptimizer(Optimizer):
    """optimi-compatible base: same param-group keys, state layout, errors and warnings."""

    _info: OptimizerInfo

    def __init__(self, params, defaults: dict):
        if not 0.0 <= defaults["lr"]:
            raise ValueError(f"Invalid learning rate: lr={defaults['lr']}")
        if "weight_decay" in defaults and not 0.0 <= defaults["weight_decay"]:
            raise ValueError(f"Invalid weight decay: weight_decay={defaults['weight_decay']}")
        if defaults.get("max_lr") is not None and not 0.0 <= defaults["max_lr"]:
            raise ValueError(f"Invalid maximum learning rate: max_lr={defaults['max_lr']}")
        if defaults.get("triton"):
            from . import backends_available as avail
            if not avail.triton_importable():
                raise ImportError("Triton could not be imported on this system. Set triton=False or install Triton.")
        super().__init__(params, defaults)
        if self.defaults.get("decouple_lr"):
            high = [g["weight_decay"] for g in self.param_groups
                    if g.get("decouple_lr", self.defaults["decouple_lr"]) and g.get("weight_decay", 0) >= 1e-3]
            if high:
                warnings.warn(f"You are using weight_decay up to {max(high)} which is potentially high for "
                              "decouple_lr=True. Unlike decoupled weight decay, fully decoupled weight decay does "
                              "not reduce weight decay by the learning rate.", category=UserWarning, stacklevel=3)
        self._optimizer_accumulation = False
        if self.defaults["gradient_release"]:
            if self.defaults.get("foreach"):
                warnings.warn("Gradient release (gradient_release=True) and foreach (foreach=True) cannot be used "
                              "together. Disabling foreach.", category=UserWarning, stacklevel=3)
            self.defaults["foreach"] = False
            for group in self.param_groups:
                group["foreach"] = False
                for p in group["params"]:
                    self.state[p]["group"] = group
        self._register_hooks()

    def _param_indices(self, params) -> list[int]:
        """Each param's position in the optimizer's parameter list (``state_dict`` numbering):
        the tensor index of stochastic rounding's random bits."""
        index = getattr(self, "_sr_index", None)
        if index is None:
            all_params = [p for g in self.param_groups for p in g["params"]]
            index = self._sr_index = {id(p): i for i, p in enumerate(all_params)}
        return [index[id(p)] for p in params]

    def _register_hooks(self) -> None:
        self._released: dict[int, dict] = {}  # groups stepped from hooks since the last step(), by id
        self._fused_groups: dict[int, _FusedGroup] = {}  # groups stepped from prebuilt tables, by id
        self.register_load_state_dict_pre_hook(_drop_fused_groups)
        self.register_state_dict_post_hook(_pack_gradient_release_groups)
        self.register_state_dict_post_hook(_torch_layout)
        self.register_load_state_dict_pre_hook(_check_and_convert_state_dict)
        self.register_load_state_dict_post_hook(_link_gradient_release_groups)
        self.register_load_state_dict_post_hook(_keep_constructor_only_keys)
        self.register_load_state_dict_pre_hook(_keep_storage_choices)
        self.register_load_state_dict_post_hook(_restore_state_precision)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle rebuild an optimizer from defaults, state and param_groups only:
        # restore what __init__ set up, or the copy could not step (nor load a checkpoint safely)
        fresh = "_optimizer_load_state_dict_pre_hooks" not in self.__dict__
        super().__setstate__(state)
        if fresh:
            self._optimizer_accumulation = False
            self._register_hooks()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_ndim(self._info, group["params"])
        if self.defaults.get("gradient_release") and hasattr(self, "_optimizer_accumulation"):
            # a group added after construction steps under gradient release too (optimi: KeyError)
            group["foreach"] = False
            for p in group["params"]:
                self.state[p]["group"] = group
        # Fully decoupled decay divides by max_lr: default it to *this group's* lr (optimi uses the
        # constructor's lr for every group, so a group with its own lr decays at the wrong strength).
        # torch's OneCycleLR overwrites group["max_lr"] with its peak lr: the same meaning, so fully
        # decoupled decay then applies weight_decay·lr_t/peak (tests/test_integration.py).
        # A tensor lr is copied as a number: an aliased tensor would follow the schedule in place.
        scalar_hyperparameters(type(self).__name__, **{k: group[k] for k in self._info.keys if k in group})
        _check_precision_and_rounding(type(self).__name__, group, self._info.states)
        self._sr_index = None
        for key in ("lr", "weight_decay", "max_lr"):
            value = group.get(key)
            if value is not None and not 0.0 <= value:
                raise ValueError(f"Invalid {_NAMES[key]}: {key}={value}")
        if group.get("decouple_lr"):
            if group.get("max_lr") is None:
                lr = group["lr"]
                group["max_lr"] = lr.item() if isinstance(lr, torch.Tensor) else lr
            if not group["max_lr"] > 0:
                raise ValueError(_max_lr_message(group["max_lr"]))

    @property
    def optimizer_accumulation(self) -> bool:
        """Accumulate into the optimizer states without updating params (under gradient release)."""
        return self._optimizer_accumulation

    @optimizer_accumulation.setter
    def optimizer_accumulation(self, value: bool) -> None:
        self._optimizer_accumulation = value

    # ── state ──────────────────────────────────────────────────────────────────────────────────
    def _init_param_state(self, group: dict, state: dict, param: torch.Tensor) -> None:
        """Allocate a param's state on its first step. A state that already has its moments but no
        ``kahan_comp`` (a checkpoint from fp32 training, converted) keeps them: only the
        compensation starts, at zero (optimi re-initializes every state and loses the moments)."""
        if param.grad is not None and param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               f"(param of shape {tuple(param.shape)}); use a dense gradient")
        if "kahan_comp" in state:
            return
        kahan = uses_kahan(group, param)
        if kahan:
            group["kahan_sum"] = True
        if not any(name in state for name in self._info.states):
            self._info.init_state(state, param, group, kahan)
            _store_states_in_precision(self._info, group, state, param)
        else:
            fresh: dict = {}
            self._info.init_state(fresh, param, group, kahan)
            missing = [k for k in fresh if k not in state and k != "kahan_comp"]
            if missing:
                raise RuntimeError(f"{type(self).__name__}: the state of a param of shape {tuple(param.shape)} has "
                                   f"{[k for k in fresh if k in state]} but not {missing}")
            state["kahan_comp"] = fresh["kahan_comp"]
        if group.get("gradient_release") and self._info.uses_step and "step" not in state:
            state["step"] = torch.tensor(0, dtype=torch.int32)

    def _setup_group(self, group: dict) -> None:
        if not group.get("setup"):
            group["setup"] = True
            if self._info.uses_step:
                group["step"] = torch.tensor(0, dtype=torch.int32)

    def _call(self, group: dict, params, grads, state_lists, kahan_comps, *, step, gradient_release=False,
              optimizer_accumulation=False, scalar_states=None) -> None:
        if _eightbit(group):
            from .quantize import scale_key
            _step_eightbit(self._info, group, params, grads, state_lists, kahan_comps, step=step,
                           scale_of=lambda p, name: self.state[p][scale_key(name)],
                           call=functools.partial(self._call_decoded, group),
                           gradient_release=gradient_release, optimizer_accumulation=optimizer_accumulation,
                           scalar_states=scalar_states)
            return
        self._call_decoded(group, params, grads, state_lists, kahan_comps, step=step,
                           gradient_release=gradient_release, optimizer_accumulation=optimizer_accumulation,
                           scalar_states=scalar_states)

    def _call_decoded(self, group: dict, params, grads, state_lists, kahan_comps, *, step, gradient_release=False,
                      optimizer_accumulation=False, scalar_states=None, scales=None) -> None:
        """One step of ``params`` whose states are all tensors the backends step: no 8-bit codes, or
        codes with their ``scales`` for a kernel that takes them (``kernel_codes``)."""
        hypers = {k: group[k] for k in self._info.keys}
        sr = None
        if group.get("stochastic_rounding"):
            index = self._param_indices([params] if isinstance(params, torch.Tensor) else params)
            # a spec without a step counts in sr_step, advanced by step() before it steps the group:
            # hooks under gradient release run before that step() and take the count it will have
            counter = group.get("sr_step", 0) + (1 if gradient_release else 0)
            sr = (int(group.get("sr_seed") or 0), None if self._info.uses_step else counter, index)
        run_functional(self._info, params, grads, state_lists, kahan_comps, hypers, step=step,
                       kahan_sum=group.get("kahan_sum") or False, foreach=group.get("foreach"),
                       triton=group.get("triton"), fused=group.get("fused"), gradient_release=gradient_release,
                       optimizer_accumulation=optimizer_accumulation, group=group, stochastic_rounding=sr,
                       scalar_states=scalar_states, scales=scales)

    # ── step ───────────────────────────────────────────────────────────────────────────────────
    @torch.no_grad()
    def step(self, closure: Callable | None = None, param: torch.Tensor | None = None):
        """One step over every param with a gradient, or of one ``param`` (gradient release)."""
        if self._info.extra.get("views"):
            self._check_train_mode()
        loss = None
        if closure is not None and param is None:
            with torch.enable_grad():
                loss = closure()
        if param is not None:
            self._step_param(param)
            return loss
        released = self._released
        compiling = torch.compiler.is_compiling()  # traced: no prebuilt tables, one op per group
        fused_groups = {} if compiling else self._fused_groups
        for group in self.param_groups:
            self._setup_group(group)
            if group.get("stochastic_rounding") and not self._info.uses_step:
                group["sr_step"] = group.get("sr_step", 0) + 1  # the random bits' step count (no step here)
            fast = None if compiling else fused_groups.get(id(group))
            if fast is not None and fast.group is group and fast.table is not None and \
                    not group.get("stochastic_rounding") and not _eightbit(group):
                if fast.step(self, group):
                    if released:
                        released.pop(id(group), None)
                    continue
                fast.drop()  # something changed: the general path checks (and names) it, then maybe rebuilds
            # the per-param hot path of every step: comprehensions and C-level map/itemgetter
            grads = [p.grad for p in group["params"]]
            if any([g is None for g in grads]):
                params = [p for p, g in zip(group["params"], grads) if g is not None]
                grads = [g for g in grads if g is not None]
            else:
                params = group["params"]
            if not params:
                # Under gradient release the hooks stepped each param; the group's step then counts
                # this step() as optimi's does. optimi also advances a group without any grads; we
                # leave that one alone (docs/differences.md, 9).
                if released and released.pop(id(group), None) is not None and self._info.uses_step:
                    group["step"].add_(1)
                continue
            if released:
                released.pop(id(group), None)
            states = list(map(self.state.__getitem__, params))
            if not all(["kahan_comp" in s for s in states]) or any([g.is_sparse for g in grads]):
                for p, grad, state in zip(params, grads, states):
                    if grad.is_sparse or "kahan_comp" not in state:
                        self._init_param_state(group, state, p)
            state_lists = [list(map(operator.itemgetter(name), states)) for name in self._info.states]
            kahan_comps = list(map(operator.itemgetter("kahan_comp"), states))
            scalar_states = [list(map(operator.itemgetter(name), states)) for name in self._info.scalar_states]
            self._call(group, params, grads, state_lists, kahan_comps, step=group.get("step"),
                       scalar_states=scalar_states)
            if params is group["params"] and not self.defaults.get("gradient_release") and not compiling:
                _FusedGroup.after_general_step(self, group, grads, state_lists, kahan_comps)
        return loss

    def _step_param(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        state = self.state[param]
        group = state.get("group")
        if group is not None and self._info.extra.get("views") and not group.get("train_mode", True):
            self._check_train_mode()
        if group is None:  # optimi: KeyError('group')
            raise ValueError("step(param=...) needs an optimizer built with gradient_release=True that holds "
                             f"this param (shape {tuple(param.shape)})")
        self._init_param_state(group, state, param)
        self._call(group, param, param.grad, [state[n] for n in self._info.states], state["kahan_comp"],
                   step=state.get("step"), gradient_release=True,
                   optimizer_accumulation=self._optimizer_accumulation,
                   scalar_states=[state[n] for n in self._info.scalar_states])
        self._released[id(group)] = group  # the next step() advances this group's step (as optimi's)

    def dequantized_state(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """State ``name`` of ``param`` as fp32 values (a new tensor): decoded from its codes and block
        scales where it is stored in 8 bits (``state_precision="8bit"``, optcompile/quantize.py),
        else the stored tensor in fp32."""
        if name not in self._info.states:
            raise ValueError(f"{type(self).__name__} has no state {name!r}; its states are {list(self._info.states)}")
        state = self.state.get(param) if isinstance(param, torch.Tensor) else None
        value = None if state is None else state.get(name)
        if value is None:
            raise ValueError(f"{type(self).__name__}: no {name!r} for this param (shape "
                             f"{tuple(getattr(param, 'shape', ()))}): states are allocated at its first step, and "
                             "only under the hyperparameters that use them")
        from .quantize import dequantize_state, is_codes, scale_key
        if is_codes(value) and scale_key(name) in state:
            return dequantize_state(value, state[scale_key(name)])
        return value.to(torch.float32, copy=True)

    # ── parameter views (spec.eval_view) ───────────────────────────────────────────────────────
    def _check_train_mode(self) -> None:
        eval_groups = [i for i, g in enumerate(self.param_groups) if not g.get("train_mode", True)]
        if eval_groups:
            raise RuntimeError(f"{type(self).__name__}.step() was called in eval mode (param group"
                               f"{'s' if len(eval_groups) > 1 else ''} {', '.join(map(str, eval_groups))}): the params "
                               "hold the eval view, which a step must not update; call optimizer.train() before "
                               "training steps and optimizer.eval() before evaluating or saving a checkpoint")

    @torch.no_grad()
    def _swap_views(self, view: str) -> None:
        """``eval()``/``train()``: write view ``view`` into the params of every group not already in
        it, then record it in the group's ``train_mode``. Params without state (never stepped) hold
        the same value in both views and are left alone."""
        train = view == "train"
        for group in self.param_groups:
            if bool(group.get("train_mode", True)) == train:
                continue
            params = [p for p in group["params"] if "kahan_comp" in self.state.get(p, ())]
            if params:
                states = [self.state[p] for p in params]
                self._setup_group(group)
                run_functional(self._info, params, None, [[_view_value(s, n) for s in states] for n in self._info.states],
                               [s["kahan_comp"] for s in states], {k: group[k] for k in self._info.keys},
                               step=group.get("step") if not self.defaults.get("gradient_release")
                               else states[0].get("step", group.get("step")),
                               kahan_sum=group.get("kahan_sum") or False, foreach=group.get("foreach"),
                               triton=group.get("triton"), fused=group.get("fused"), group=group,
                               scalar_states=[[s[n] for s in states] for n in self._info.scalar_states], view=view)
            group["train_mode"] = train

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True, param: torch.Tensor | None = None) -> None:
        if param is None:
            super().zero_grad(set_to_none=set_to_none)
        elif param.grad is not None:
            if set_to_none:
                param.grad = None
            else:
                if param.grad.grad_fn is not None:
                    param.grad.detach_()
                else:
                    param.grad.requires_grad_(False)
                param.grad.zero_()


class _FusedGroup:
    """A param group stepped by the fused C kernel from tables built once (``FusedTable``),
    while nothing the general path would look at has changed.

    ``step`` checks, before anything is written: the group holds the same params (by identity)
    and picks the same backend; ``optimizer.state`` is the same dict, no param's state dict was
    replaced, added or removed, and none of them was mutated (CPython's dict version tags, one
    read per param; without them every state tensor is looked up and compared by identity);
    then ``FusedTable.step`` reads the grads, compares every param's, grad's and state's layout
    in C++, reads their data pointers afresh and runs the kernel. Any difference and the step returns False
    having done nothing: the general path runs, checks, raises where something does not fit, and
    may build the table again. Hyperparameters and the step count are read from the group every step.

    A table that keeps failing (a loop that changes what it steps every step) costs a build
    (~2.5 µs a tensor) each time, and a layout that does not fit the kernel (``_mixed``) a
    lookup: after a short-lived table, or a third general step in a row without one, the next
    try waits twice as many general steps (up to 256).
    """

    SHORT = 8  # a table that ran fewer steps than this before failing doubles the wait

    def __init__(self, group: dict):
        self.group, self.table, self.wait, self.backoff, self.ran, self.misses = group, None, 0, 1, 0, 0

    @staticmethod
    def after_general_step(opt, group, grads, state_lists, kahan_comps) -> None:
        """After a general step over every param of ``group``: build its table where it took the
        fused kernel over a layout that passed the checks."""
        slots = opt._fused_groups
        slot = slots.get(id(group))
        if slot is None or slot.group is not group:
            if len(slots) >= len(opt.param_groups):  # groups gone (replaced): drop what holds their tensors
                live = {id(g) for g in opt.param_groups}
                for key in [k for k in slots if k not in live]:
                    del slots[key]
            slot = slots[id(group)] = _FusedGroup(group)
        if slot.wait > 0:
            slot.wait -= 1
            return
        if group.get("stochastic_rounding"):
            return  # the tables do not carry the random streams: stochastic rounding takes the general path
        if _eightbit(group):
            return  # 8-bit states are decoded and encoded around the kernel: the general path
        if opt._info.extra.get("structure") or not opt._info.extra.get("kernels", True):
            return  # host values per ndim / dtype: the general path groups the params by them
        params = group["params"]
        info = opt._info
        if choose_backend(params, foreach=group.get("foreach"), triton=group.get("triton"),
                          fused=group.get("fused")) != "fused":
            return
        impl = info.backend("fused")
        build = getattr(impl, "table", None)
        table = None if build is None else build([params, grads, *state_lists, kahan_comps])
        if table is None:  # the first general step records the layout, the second builds: then back off
            slot.misses += 1
            if slot.misses >= 2:
                slot.wait, slot.backoff = slot.backoff, min(slot.backoff * 2, 256)
            return
        slot.table, slot.ran, slot.misses = table, 0, 0
        slot.params = list(params)
        slot.state = opt.state
        slot.dicts = list(map(opt.state.__getitem__, params))
        slot.lists = [*state_lists, kahan_comps]
        slot.choice = (group.get("foreach"), group.get("triton"), group.get("fused"))
        slot.dtype = params[0].dtype
        if DICT_VERSION is not None:
            slot.version, slot.versions = DICT_VERSION(opt.state), list(map(DICT_VERSION, slot.dicts))

    def drop(self) -> None:
        """The table no longer fits: forget it and what it holds; wait longer if it lived briefly."""
        self.backoff = min(self.backoff * 2, 256) if self.ran < self.SHORT else 1
        self.wait = self.backoff - 1
        self.table = self.params = self.dicts = self.lists = self.state = None

    def _states_unchanged(self, opt) -> bool:
        if opt.state is not self.state:
            return False
        if DICT_VERSION is not None:
            return DICT_VERSION(opt.state) == self.version and list(map(DICT_VERSION, self.dicts)) == self.versions
        dicts = list(map(opt.state.get, self.params))
        if not all(map(operator.is_, dicts, self.dicts)):
            return False
        try:
            return all([all(map(operator.is_, map(operator.itemgetter(name), dicts), lst))
                        for name, lst in zip((*opt._info.states, "kahan_comp"), self.lists)])
        except KeyError:
            return False

    def step(self, opt, group) -> bool:
        """Step the group from the table if nothing changed; False, nothing done, otherwise."""
        params, plist = self.params, group["params"]
        if len(plist) != len(params) or not all(map(operator.is_, plist, params)):
            return False
        if (group.get("foreach"), group.get("triton"), group.get("fused")) != self.choice or choose_backend(
                params, foreach=self.choice[0], triton=self.choice[1], fused=self.choice[2]) != "fused":
            return False
        if not self._states_unchanged(opt):
            return False
        info = opt._info
        hypers = host_values(info, {k: group[k] for k in info.keys})
        step = group.get("step")
        if info.uses_step:
            hypers["step"] = int(step.item()) + 1
        kahan = bool(group.get("kahan_sum")) and self.dtype in LOW_PRECISION
        flags = step_flags(optimizer_accumulation=False, kahan=kahan)
        if info.scalar_states:  # the table steps one set of scalar-state values; several: the general path
            scalar_states = [list(map(operator.itemgetter(name), self.dicts)) for name in info.scalar_states]
            sets = scalar_state_sets(info, scalar_states)
            if len(sets) > 1:
                return False
            hypers.update(zip(info.scalar_states, sets[0][1]))
        if not self.table.step(info.host(**hypers, **flags)):
            return False  # a grad or tensor changed: nothing ran
        if info.scalar_states:
            store_scalar_states(scalar_states, sets, [info.scalar_update(**hypers, **flags)])
        if info.uses_step:
            step.add_(1)
        self.ran += 1
        return True


def _drop_fused_groups(optimizer: CompiledOptimizer, state_dict: dict) -> None:
    """load_state_dict(): new groups and states; tables are built again from them."""
    optimizer._fused_groups.clear()


def _pack_gradient_release_groups(optimizer: CompiledOptimizer, state_dict: dict) -> dict:
    """state_dict(): each param's ``state["group"]`` is saved as its packed param_group (param
    indices), not the live dict, which would put a second copy of every param tensor into the
    checkpoint. optimi reads only hyperparameters from it, so optimi can still load the result."""
    owner = {i: g for g in state_dict["param_groups"] for i in g["params"]}
    for i, s in list(state_dict["state"].items()):
        if "group" in s:
            state_dict["state"][i] = {**s, "group": owner[i]}  # a copy: s is the live state
    return state_dict


_NAMES = {"lr": "learning rate", "weight_decay": "weight decay", "max_lr": "maximum learning rate"}


def uses_kahan(group: dict, param: torch.Tensor) -> bool:
    """Kahan-compensated updates: low-precision params, unless the group's kahan_sum is False or
    it rounds stochastically (then ``kahan_sum=None`` means off)."""
    if group.get("stochastic_rounding"):
        return False
    kahan_sum = group.get("kahan_sum")
    return bool(kahan_sum or kahan_sum is None) and param.dtype in LOW_PRECISION


def _torch_layout(optimizer: CompiledOptimizer, state_dict: dict) -> dict:
    """state_dict(): torch.optim's layout for the classes that are torch.optim's (checkpoint.py)."""
    from .checkpoint import to_torch_layout
    return to_torch_layout(optimizer, state_dict)


def _check_and_convert_state_dict(optimizer: CompiledOptimizer, state_dict: dict) -> dict | None:
    """load_state_dict(): reject what this optimizer cannot step, before anything changes."""
    from .checkpoint import check_and_convert
    return check_and_convert(optimizer, state_dict)


def _keep_constructor_only_keys(optimizer: CompiledOptimizer) -> None:
    """load_state_dict(): a group loaded from an optimi checkpoint lacks our own keys (``fused``);
    keep this optimizer's constructor value instead of silently switching backend."""
    for group in optimizer.param_groups:
        if "fused" in optimizer.defaults:
            group.setdefault("fused", optimizer.defaults["fused"])


def _link_gradient_release_groups(optimizer: CompiledOptimizer) -> None:
    """load_state_dict(): point ``state[p]["group"]`` at the live param_group again. torch loads a
    copy of the saved dict, and steps that read the copy would ignore LR schedulers (optimi bug 5)."""
    release = optimizer.defaults.get("gradient_release")
    optimizer._released.clear()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not release:
                if p in optimizer.state:
                    optimizer.state[p].pop("group", None)
                continue
            state = optimizer.state[p]
            state["group"] = group
            step = state.get("step")
            if torch.is_tensor(step) and step.dtype != torch.int32:
                # torch.optim casts a per-param "step" to float32 when the group has fused=True
                state["step"] = step.to(device="cpu", dtype=torch.int32)
            if optimizer._info.uses_step and "step" not in state and (
                    "kahan_comp" in state or any(n in state for n in optimizer._info.states)):
                # resumed from a normal-step checkpoint: every param continues the group's count
                step = group.get("step")
                state["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(0, dtype=torch.int32)


# ── state precision and stochastic rounding (optcompile/rounding.py) ─────────────────────────────
def _check_precision_and_rounding(optimizer: str, group: dict, states: tuple[str, ...]) -> None:
    """A constructor's or param group's ``state_precision``, ``stochastic_rounding`` and ``sr_seed``."""
    from .rounding import state_precision_error
    problem = state_precision_error(optimizer, group.get("state_precision"), states)
    if problem:
        raise ValueError(problem)
    sr = group.get("stochastic_rounding", False)
    if not isinstance(sr, bool):
        raise ValueError(f"{optimizer}: stochastic_rounding must be True or False, not {sr!r}")
    if sr and group.get("kahan_sum"):
        raise ValueError(f"{optimizer}: kahan_sum=True and stochastic_rounding=True cannot be used together; "
                         "both keep low-precision updates from being lost: choose one (with stochastic_rounding, "
                         "leave kahan_sum None or False)")
    seed = group.get("sr_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{optimizer}: sr_seed must be an int, not {seed!r}")


def _eightbit(group: dict) -> bool:
    """Whether the group stores a state in 8 bits (``state_precision="8bit"``, or a dict naming one)."""
    precision = group.get("state_precision")
    return precision == "8bit" or isinstance(precision, dict) and "8bit" in precision.values()


EIGHTBIT_BATCH = 1 << 24  # params' elements per batch of decoded 8-bit states (64 MiB of fp32 per state)


def kernel_codes(info: OptimizerInfo, group: dict, params, gradient_release: bool = False) -> frozenset:
    """The states whose 8-bit codes the kernel that steps ``params`` loads and stores itself (the
    fused C or Triton backend: kernel_plan's ``Buffer.scale``); empty where another backend runs
    (eager and foreach step decoded values), the params span devices, or under torch.compile."""
    if torch.compiler.is_compiling() or len({(p.device, p.dtype) for p in params}) != 1:
        return frozenset()
    name = choose_backend(params, foreach=group.get("foreach"), triton=group.get("triton"), fused=group.get("fused"),
                          gradient_release=gradient_release, segments="kernel_segments" in info.extra)
    if name not in ("fused", "triton") or not info.extra.get("kernels", True):
        return frozenset()
    if _needs_whole_tensor(info) and not info.extra.get("shard_reductions") and any(map(_is_sharded, params)):
        return frozenset()  # stepped on gathered whole tensors (_step_on_full_tensors): decoded states
    return frozenset(getattr(info.backend(name), "codes", ()))


def call_decoded(run, params, lists, scales, **host) -> None:
    """``run(params, *lists, **host)`` with each list of 8-bit codes that has its ``scales``
    (``lists``: ``[grads, *states, kahan_comps]``, ``scales`` one list per state) decoded to fp32
    and encoded again after the step: a kernel's fallback when it cannot take the codes."""
    from .quantize import dequantize, quantize_
    lists, decoded = list(lists), []
    for k, sc in enumerate(scales):
        if all(s is None for s in sc):
            continue
        lst = list(lists[1 + k])
        for i, s in enumerate(sc):
            if s is not None:
                codes, lst[i] = lst[i], dequantize(lst[i], s)
                decoded.append((lst[i], codes, s))
        lists[1 + k] = lst
    run(params, *lists, **host)
    for values, codes, s in decoded:
        quantize_(values, codes, s)


def _step_eightbit(info: OptimizerInfo, group: dict, params, grads, state_lists, kahan_comps, *, step, scale_of,
                   call, **kw) -> None:
    """A step of a group with 8-bit states (optcompile/quantize.py). Params whose codes the
    group's kernel takes (``kernel_codes``: the fused C and Triton kernels decode each block on
    load and encode it on store) step in one call with their scales; for the others, per batch of
    params of about ``EIGHTBIT_BATCH`` elements, each 8-bit state is decoded to fp32, the batch
    steps on its backend with fp32 states and the new values are encoded (each block's scale from
    its new absmax). Params are split by which of their states are codes (those below the size
    threshold keep fp32 states). The group's step count advances once: every call starts from
    the count the step began with. ``scale_of(param, name)``: the scales of a param's codes;
    ``call(params, grads, state_lists, kahan_comps, *, step, scales, scalar_states, **kw)``: one
    step of states the backends take (``CompiledOptimizer._call_decoded``, or the functional
    form's ``run_functional``)."""
    from .quantize import dequantize_state, is_codes, local_scales, quantize_state_
    scalar_states = kw.pop("scalar_states", None)
    if isinstance(params, torch.Tensor):
        params, grads, kahan_comps = [params], [grads], [kahan_comps]
        state_lists = [[s] for s in state_lists]
        scalar_states = None if scalar_states is None else [[s] for s in scalar_states]
    names = info.states
    direct = kernel_codes(info, group, params, kw.get("gradient_release", False))
    kinds: dict[tuple, list[int]] = {}  # which states are codes → the params that have them so
    for i in range(len(params)):
        kinds.setdefault(tuple(is_codes(lst[i]) for lst in state_lists), []).append(i)
    calls = []  # (param indices, whether the kernel takes their codes)
    for kind, idx in kinds.items():
        if any(kind) and all(n in direct for n, c in zip(names, kind) if c):
            calls.append((idx, True))
            continue
        lo = 0
        while lo < len(idx):
            hi, size = lo, 0
            while hi < len(idx) and (hi == lo or size + params[idx[hi]].numel() <= EIGHTBIT_BATCH):
                size += params[idx[hi]].numel()
                hi += 1
            calls.append((idx[lo:hi], False))
            lo = hi
    start = step.clone() if isinstance(step, torch.Tensor) and len(calls) > 1 else None
    for idx, codes_in_kernel in calls:
        ps, decoded, lists = [params[i] for i in idx], [], []
        scales = [] if codes_in_kernel else None
        for name, lst in zip(names, state_lists):
            part = [lst[i] for i in idx]
            if codes_in_kernel:
                scales.append([local_scales(t, scale_of(p, name)) if is_codes(t) else None for p, t in zip(ps, part)])
            else:
                for i, t in enumerate(part):
                    if is_codes(t):
                        s = scale_of(ps[i], name)
                        part[i] = dequantize_state(t, s)
                        decoded.append((part[i], t, s))
            lists.append(part)
        if start is not None:
            step.copy_(start)
        call(ps, [grads[i] for i in idx], lists, [kahan_comps[i] for i in idx], step=step, **kw,
             scalar_states=None if scalar_states is None else [[s[i] for i in idx] for s in scalar_states],
             scales=scales)
        for values, codes, s in decoded:
            quantize_state_(values, codes, s)


def _store_states_in_precision(info: OptimizerInfo, group: dict, state: dict, param: torch.Tensor) -> None:
    """Freshly allocated states in the group's ``state_precision`` (``kahan_comp`` keeps the param's);
    8-bit ones as codes and block scales (optcompile/quantize.py)."""
    precision = group.get("state_precision")
    if precision is None:
        return
    from . import quantize
    from .rounding import state_dtype
    for name in info.states:
        t = state.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if quantize.requested(precision, name) and quantize.applies(param, t.shape):
                # a DTensor's (FSDP2) blocks are per local shard, codes and scales DTensors (quantize.py)
                state[name], state[quantize.scale_key(name)] = quantize.quantize_state(
                    t, name in info.extra.get("nonnegative", ()))
                continue
            want = state_dtype(precision, name, param.dtype)
            if t.dtype != want:
                state[name] = t.to(want)


def _keep_storage_choices(optimizer: CompiledOptimizer, state_dict: dict) -> dict:
    """load_state_dict(): this optimizer's ``state_precision`` and ``stochastic_rounding`` are how it
    stores and rounds, and stay; a checkpoint saved in another precision is cast to them
    (``_restore_state_precision``). ``sr_seed`` and the step counts come from the checkpoint, so a
    resumed run draws the random bits it would have drawn. The states as saved are kept aside:
    torch's loader casts every state to its param's dtype, which would round fp32 states of bf16
    params to bf16."""
    groups = []
    for saved, live in zip(state_dict.get("param_groups", []), optimizer.param_groups):
        saved = dict(saved)
        for key in ("state_precision", "stochastic_rounding"):
            saved[key] = live.get(key, saved.get(key))
        saved.setdefault("sr_seed", live.get("sr_seed", 0))
        groups.append(saved)
    saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
    optimizer._loading_states = (saved_ids, state_dict.get("state", {}))
    return {**state_dict, "param_groups": groups + list(state_dict.get("param_groups", []))[len(groups):]}


def _restore_state_precision(optimizer: CompiledOptimizer) -> None:
    """load_state_dict(): each state in its group's precision, cast from the tensor as saved; 8-bit
    codes kept as saved where this optimizer stores that state in the same code, else decoded, and
    a state this optimizer stores in 8 bits encoded from its saved values (optcompile/quantize.py)."""
    saved = getattr(optimizer, "_loading_states", None)
    optimizer._loading_states = None
    optimizer._sr_index = None
    if not saved:
        return
    from . import quantize
    from .rounding import state_dtype
    ids, states = saved
    nonnegative = optimizer._info.extra.get("nonnegative", ())
    pairs = [(g, p) for g in optimizer.param_groups for p in g["params"]]
    for i, (group, p) in zip(ids, pairs):
        s, state = states.get(i), optimizer.state.get(p)
        if not s or state is None:
            continue
        precision = group.get("state_precision")
        for name in optimizer._info.states:
            t, now, key = s.get(name), state.get(name), quantize.scale_key(name)
            if not isinstance(t, torch.Tensor) or not isinstance(now, torch.Tensor):
                continue
            code = quantize.code_dtype(name in nonnegative)
            want8 = quantize.requested(precision, name) and quantize.applies(p, t.shape)
            if quantize.is_codes(t) and key in s:
                if want8 and t.dtype == code:
                    state[name], state[key] = t.to(p.device, copy=True), s[key].to(p.device, copy=True)
                    continue
                t = quantize.dequantize_state(t, s[key])
            elif not t.is_floating_point():
                continue
            state.pop(key, None)
            if want8:
                state[name], state[key] = quantize.quantize_state(t.to(p.device), name in nonnegative)
            else:
                state[name] = t.to(device=p.device, dtype=state_dtype(precision, name, p.dtype))
        fp64 = optimizer._info.extra.get("scalar_fp64", ())
        for name in optimizer._info.scalar_states:  # torch cast them to the param: back to fp32 (fp64) on the CPU
            t = s.get(name)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == 1:
                dtype = torch.float64 if name in fp64 else torch.float32
                state[name] = t.detach().to(device="cpu", dtype=dtype).reshape(()).clone()


def _view_value(state: dict, name: str):
    """State ``name`` as a view write reads it: 8-bit codes decoded to fp32 (a view writes only the
    param, so the codes stay as they are), any other state as stored."""
    from .quantize import dequantize_state, is_codes, scale_key
    t = state.get(name)
    return dequantize_state(t, state[scale_key(name)]) if is_codes(t) and scale_key(name) in state else t
