"""The Optimizer every generated class derives from: optimi's runtime contract, written once.

Generated modules supply the math (host scalars, state allocation, one function per backend);
this module supplies what is the same for every algorithm: param groups and lazy state, the int32
``step`` in param groups, backend choice, grouping by (device, dtype), gradient release and
optimizer accumulation. Importing it does not import sympy or the compiler.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.optim import Optimizer

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
    extra: dict[str, Any] = field(default_factory=dict)

    def backend(self, name: str) -> Callable:
        if name not in self.backends:
            from .loader import load_backend  # triton / fused live in their own generated files
            self.backends[name] = load_backend(self, name)
        return self.backends[name]


def _group_by_device_and_dtype(params, lists, single: bool | None = None):
    """Indices of params per (device, dtype); one group (no copy) in the common case."""
    first = params[0]
    if single if single is not None else all(p.device == first.device and p.dtype == first.dtype for p in params):
        return [(first.device, first.dtype, params, lists)]
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return [(dev, dt, [params[i] for i in idx], [[lst[i] for i in idx] for lst in lists])
            for (dev, dt), idx in groups.items()]


def choose_backend(params, *, foreach=None, triton=None, fused=None, gradient_release=False) -> str:
    """Explicit choices win (fused, then triton, then foreach); otherwise the fastest that works:
    Triton on GPUs, the fused C kernel on CPU, foreach on other devices, the for-loop last."""
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
        if fused is None and avail.fused_cpu():
            return "fused"
        return "eager"
    if triton is None and avail.triton_on(device):
        return "triton"
    return "eager" if gradient_release or foreach is False else "foreach"


def run_functional(info: OptimizerInfo, params, grads, state_lists, kahan_comps, hypers: dict, *, step,
                   kahan_sum=False, foreach=False, triton=False, fused=False, gradient_release=False,
                   optimizer_accumulation=False) -> None:
    """One optimizer step over lists of tensors; the body of every generated functional API."""
    if gradient_release and foreach:
        raise ValueError(f"Gradient release {gradient_release=} and foreach {foreach=} cannot be used together")
    if isinstance(params, torch.Tensor):
        params, grads = [params], [grads]
        state_lists = [[s] for s in state_lists]
        kahan_comps = [kahan_comps]
    if not params:
        return
    if kahan_comps is None:
        kahan_comps = [None] * len(params)
    hypers = dict(hypers)
    if hypers.get("decouple_lr") and hypers.get("max_lr") is None:
        hypers["max_lr"] = hypers["lr"]
    if info.uses_step:
        step.add_(1)
        hypers["step"] = int(step.item())
    lists = [params, grads, *state_lists, kahan_comps]
    kinds = set(zip(map(type, params), [p.device for p in params], [p.dtype for p in params]))  # all checks
    if any(dtype.is_complex for _, _, dtype in kinds):
        lists = [[_real(x) for x in lst] for lst in lists]
    if any(cls.__name__ == "DTensor" for cls, _, _ in kinds):
        if _needs_whole_tensor(info) and any(_is_sharded(p) for p in params):
            return _step_on_full_tensors(info, lists, hypers, kahan_sum=kahan_sum, foreach=foreach, triton=triton,
                                         fused=fused, gradient_release=gradient_release,
                                         optimizer_accumulation=optimizer_accumulation)
        lists = [[x.to_local() if _is_dtensor(x) else x for x in lst] for lst in lists]
    _dispatch(info, lists, hypers, kahan_sum=kahan_sum, foreach=foreach, triton=triton, fused=fused,
              gradient_release=gradient_release, optimizer_accumulation=optimizer_accumulation,
              single=len({(device, dtype) for _, device, dtype in kinds}) == 1)


def _dispatch(info, tensors, hypers, *, kahan_sum, foreach, triton, fused, gradient_release, optimizer_accumulation,
              single=None):
    """Group ``[params, grads, *states, kahan_comps]`` by (device, dtype) and call the backend."""
    for device, dtype, ps, lists in _group_by_device_and_dtype(tensors[0], tensors[1:], single):
        # per group: a CPU group may get the fused C kernel while a CUDA group gets Triton
        name = choose_backend(ps, foreach=foreach, triton=triton, fused=fused, gradient_release=gradient_release)
        impl = info.backend(name)
        host = info.host(**hypers, update_parameters=not optimizer_accumulation,
                         kahan=bool(kahan_sum) and dtype in LOW_PRECISION)
        if device.type == "cpu" and name in ("eager", "foreach"):
            _run_in_cpu_pieces(impl, ps, lists, host, split=not _needs_whole_tensor(info),
                               batch=CPU_FOREACH_BATCH if name == "foreach" else None)
        else:
            impl(ps, *lists, **host)


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
    keep whole tensors.
    """
    if split and any(p.numel() > CPU_CHUNK for p in params):
        params, lists = _cpu_slices(params, lists)
    if batch is None:  # the for-loop backend: one call, its temporaries are per tensor already
        return impl(params, *lists, **host)
    lo, total = 0, 0
    for i, p in enumerate(params):
        n = p.numel()
        if i > lo and total + n > batch:
            impl(params[lo:i], *[lst[lo:i] for lst in lists], **host)
            lo, total = i, 0
        total += n
    impl(params[lo:], *[lst[lo:] for lst in lists], **host)


def _cpu_slices(params, lists):
    out_params, out_lists = [], [[] for _ in lists]
    for i, p in enumerate(params):
        row = [lst[i] for lst in lists]
        if p.numel() <= CPU_CHUNK or not all(t is None or t.is_contiguous() for t in [p, *row]):
            out_params.append(p)
            for out, t in zip(out_lists, row):
                out.append(t)
            continue
        flat = [p.view(-1)] + [None if t is None else t.view(-1) for t in row]
        for a in range(0, p.numel(), CPU_CHUNK):
            out_params.append(flat[0][a:a + CPU_CHUNK])
            for out, t in zip(out_lists, flat[1:]):
                out.append(None if t is None else t[a:a + CPU_CHUNK])
    return out_params, out_lists


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


def _step_on_full_tensors(info, lists, hypers, **kw) -> None:
    """Sharded DTensors under an algorithm with per-tensor reductions: every rank gathers the whole
    tensors, steps them (so a reduction spans all shards and matches the unsharded run bit for
    bit), and keeps its own shard. Costs an all-gather of param, grad and states per step."""
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
        self.register_state_dict_post_hook(_pack_gradient_release_groups)
        self.register_load_state_dict_post_hook(_link_gradient_release_groups)
        self.register_load_state_dict_post_hook(_keep_constructor_only_keys)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.defaults.get("gradient_release") and hasattr(self, "_optimizer_accumulation"):
            # a group added after construction steps under gradient release too (optimi: KeyError)
            group["foreach"] = False
            for p in group["params"]:
                self.state[p]["group"] = group
        # Fully decoupled decay divides by max_lr: default it to *this group's* lr (optimi uses the
        # constructor's lr for every group, so a group with its own lr decays at the wrong strength).
        # torch's OneCycleLR overwrites group["max_lr"] with its peak lr: the same meaning, so fully
        # decoupled decay then applies weight_decay·lr_t/peak (tests/test_integration.py).
        if group.get("decouple_lr") and group.get("max_lr") is None:
            group["max_lr"] = group["lr"]

    @property
    def optimizer_accumulation(self) -> bool:
        """Accumulate into the optimizer states without updating params (under gradient release)."""
        return self._optimizer_accumulation

    @optimizer_accumulation.setter
    def optimizer_accumulation(self, value: bool) -> None:
        self._optimizer_accumulation = value

    # ── state ──────────────────────────────────────────────────────────────────────────────────
    def _init_param_state(self, group: dict, state: dict, param: torch.Tensor) -> None:
        if param.grad is not None and param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               f"(param of shape {tuple(param.shape)}); use a dense gradient")
        if "kahan_comp" in state:
            return
        kahan_sum = group.get("kahan_sum")
        kahan = (kahan_sum or kahan_sum is None) and param.dtype in LOW_PRECISION
        if kahan:
            group["kahan_sum"] = True
        self._info.init_state(state, param, group, kahan)
        if group.get("gradient_release") and self._info.uses_step:
            state["step"] = torch.tensor(0, dtype=torch.int32)

    def _setup_group(self, group: dict) -> None:
        if not group.get("setup"):
            group["setup"] = True
            if self._info.uses_step:
                group["step"] = torch.tensor(0, dtype=torch.int32)

    def _call(self, group: dict, params, grads, state_lists, kahan_comps, *, step, gradient_release=False,
              optimizer_accumulation=False) -> None:
        hypers = {k: group[k] for k in self._info.keys}
        run_functional(self._info, params, grads, state_lists, kahan_comps, hypers, step=step,
                       kahan_sum=group.get("kahan_sum") or False, foreach=group.get("foreach"),
                       triton=group.get("triton"), fused=group.get("fused"), gradient_release=gradient_release,
                       optimizer_accumulation=optimizer_accumulation)

    # ── step ───────────────────────────────────────────────────────────────────────────────────
    @torch.no_grad()
    def step(self, closure: Callable | None = None, param: torch.Tensor | None = None):
        """One step over every param with a gradient, or of one ``param`` (gradient release)."""
        loss = None
        if closure is not None and param is None:
            with torch.enable_grad():
                loss = closure()
        if param is not None:
            self._step_param(param)
            return loss
        for group in self.param_groups:
            self._setup_group(group)
            # the per-param hot path of every step: comprehensions and C-level map/itemgetter
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # optimi increments the step of a group without grads; we leave it alone
                continue
            grads = [p.grad for p in params]
            states = list(map(self.state.__getitem__, params))
            if not all(["kahan_comp" in s for s in states]) or any([g.is_sparse for g in grads]):
                for p, grad, state in zip(params, grads, states):
                    if grad.is_sparse or "kahan_comp" not in state:
                        self._init_param_state(group, state, p)
            state_lists = [list(map(operator.itemgetter(name), states)) for name in self._info.states]
            kahan_comps = list(map(operator.itemgetter("kahan_comp"), states))
            self._call(group, params, grads, state_lists, kahan_comps, step=group.get("step"))
        return loss

    def _step_param(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        state = self.state[param]
        group = state.get("group")
        if group is None:  # optimi: KeyError('group')
            raise ValueError("step(param=...) needs an optimizer built with gradient_release=True that holds "
                             f"this param (shape {tuple(param.shape)})")
        self._init_param_state(group, state, param)
        self._call(group, param, param.grad, [state[n] for n in self._info.states], state["kahan_comp"],
                   step=state.get("step"), gradient_release=True,
                   optimizer_accumulation=self._optimizer_accumulation)

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


def _pack_gradient_release_groups(optimizer: CompiledOptimizer, state_dict: dict) -> dict:
    """state_dict(): each param's ``state["group"]`` is saved as its packed param_group (param
    indices), not the live dict, which would put a second copy of every param tensor into the
    checkpoint. optimi reads only hyperparameters from it, so optimi can still load the result."""
    owner = {i: g for g in state_dict["param_groups"] for i in g["params"]}
    for i, s in list(state_dict["state"].items()):
        if "group" in s:
            state_dict["state"][i] = {**s, "group": owner[i]}  # a copy: s is the live state
    return state_dict


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
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not release:
                if p in optimizer.state:
                    optimizer.state[p].pop("group", None)
                continue
            state = optimizer.state[p]
            state["group"] = group
            if optimizer._info.uses_step and "kahan_comp" in state and "step" not in state:
                # resumed from a normal-step checkpoint: every param continues the group's count
                step = group.get("step")
                state["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(0, dtype=torch.int32)
