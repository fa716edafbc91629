"""The optimizer step as a ``torch.library`` custom op, so ``torch.compile`` captures it whole.

A compiled function that calls ``opt.step()`` (or a functional step) traces the step's Python
bookkeeping (which params have grads, lazy state, the group's hyperparameters) and records one
call of ``optcompile::step`` per param group: an opaque op that mutates params, states and the
step counter in place (``mutates_args``) and returns nothing, so its fake-tensor implementation
does nothing. When the graph runs, the op runs the eager step (``runtime.run_functional``) on
the real tensors: backend choice, the buffer checks and their errors, the host scalars (bias
corrections from the step count), the fused C kernel, the Triton launcher, and the fallbacks, all
exactly as without compile, so results are bit for bit those of the eager step.

What the graph carries: the tensors; the step counter as the int32 tensor it is (read inside the
op, never in traced code, so the step count neither breaks the graph nor recompiles it); tensor
hyperparameters (``lr=torch.tensor(...)``) as tensors (an LR schedule that writes them in place
does not recompile); number hyperparameters and the group's other numbers (which decide which
states exist) as the constants Dynamo reads them as, guarded like torch.optim's float ``lr``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

OP = "optcompile::step"
SCHEMA = ("(str module, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, int[] absent, Tensor(d!)[] scalars, "
          "Tensor(c!)? step, "
          "str names, Scalar[] values, str none_names, str tensor_names, Tensor[] tensor_values, bool kahan_sum, "
          "bool? foreach, bool? triton, bool? fused, bool gradient_release, bool optimizer_accumulation) -> ()")

# Defined with the low-level API rather than ``torch.library.custom_op``: the decorator's Python
# autograd and version-counter wrappers cost ~1.3 µs per tensor per call (3.2 ms over 2,000
# tensors against 0.7 ms), more than the fused kernel's own per-tensor work. The step runs under
# no_grad and, like the fused kernel it calls, writes through data pointers.
torch.library.define(OP, SCHEMA)


@torch.library.impl(OP, "CompositeExplicitAutograd")
def step(module: str, params: list[Tensor], grads: list[Tensor], states: list[Tensor], absent: list[int],
         scalars: list[Tensor], step: Optional[Tensor], names: str, values: Sequence[int | float | bool], none_names: str,
         tensor_names: str, tensor_values: list[Tensor], kahan_sum: bool, foreach: Optional[bool],
         triton: Optional[bool], fused: Optional[bool], gradient_release: bool, optimizer_accumulation: bool) -> None:
    """One eager step of the optimizer of generated module ``module`` over ``params``.

    ``states`` is ``[*state_lists, kahan_comps]`` flattened, one list of ``len(params)`` after
    another, without the absent (None) ones, whose positions ``absent`` lists (a mutable
    ``Tensor?[]`` with None in it fails in torch's auto_functionalize); the group's values arrive
    by name: numbers (``names``, comma-separated, and ``values``), None (``none_names``) and
    tensors (``tensor_names``, ``tensor_values``). ``scalars``: the scalar states' 0-dim tensors
    (``OptimizerInfo.scalar_states``), flattened likewise. ``step`` is incremented once the step has run."""
    from ..runtime import run_functional
    info = sys.modules[module]._INFO
    group: dict = dict(zip(_split(names), values))
    group.update(dict.fromkeys(_split(none_names)))
    group.update(zip(_split(tensor_names), tensor_values))
    n, flat = len(params), list(states)
    for i in absent:
        flat.insert(i, None)
    if len(flat) != n * (len(info.states) + 1):
        raise ValueError(f"{info.functional}: {n} params but {len(flat)} states for {len(info.states) + 1} "
                         f"lists ({', '.join((*info.states, 'kahan_comp'))}); pass one per param")
    k = len(info.states) + 1
    lists = [flat[i * n:(i + 1) * n] for i in range(k)]
    scalar_lists = [list(scalars[i * n:(i + 1) * n]) for i in range(len(info.scalar_states))]
    hypers = {k: group[k] for k in info.keys}
    run_functional(info, list(params), list(grads), lists[:-1], lists[-1], hypers, step=step, kahan_sum=kahan_sum,
                   foreach=foreach, triton=triton, fused=fused, gradient_release=gradient_release,
                   optimizer_accumulation=optimizer_accumulation, group=group,
                   scalar_states=scalar_lists if info.scalar_states else None)


@torch.library.register_fake(OP)
def _(module, params, grads, states, absent, scalars, step, names, values, none_names, tensor_names, tensor_values, kahan_sum,
      foreach, triton, fused, gradient_release, optimizer_accumulation) -> None:
    """Every output is an in-place write to an input: nothing to allocate."""
    return None


def _split(names: str) -> list[str]:
    return names.split(",") if names else []


_NUMBERS = (bool, int, float)


def call(info, params, grads, state_lists, kahan_comps, hypers: dict, *, step, kahan_sum, foreach, triton, fused,
         gradient_release, optimizer_accumulation, group: dict | None, scalar_states=None) -> None:
    """``run_functional``'s arguments as one call of the op: what a compiled step records.

    Runs in traced code, so it only sorts values into the op's arguments: every check runs in
    the op, on the real tensors, as in an eager step."""
    torch.ops.optcompile.step(*arguments(
        info, params, grads, state_lists, kahan_comps, hypers, step=step, kahan_sum=kahan_sum, foreach=foreach,
        triton=triton, fused=fused, gradient_release=gradient_release,
        optimizer_accumulation=optimizer_accumulation, group=group, scalar_states=scalar_states))


def arguments(info, params, grads, state_lists, kahan_comps, hypers: dict, *, step, kahan_sum, foreach, triton,
              fused, gradient_release, optimizer_accumulation, group: dict | None, scalar_states=None) -> tuple:
    """The op's arguments, in its schema's order, for ``run_functional``'s."""
    if isinstance(params, Tensor):  # a single tensor (gradient release)
        params, grads = [params], [grads]
        state_lists = [[s] for s in state_lists]
        kahan_comps = [kahan_comps]
        scalar_states = None if scalar_states is None else [[s] for s in scalar_states]
    params, grads = list(params), list(grads)
    if kahan_comps is None:
        kahan_comps = [None] * len(params)
    flat = [t for lst in [*state_lists, kahan_comps] for t in lst]
    states = [t for t in flat if t is not None]
    absent = [i for i, t in enumerate(flat) if t is None]
    merged = dict(hypers) if group is None else {**{k: v for k, v in group.items() if k != "step"}, **hypers}
    names, values, none_names, tensor_names, tensor_values = [], [], [], [], []
    for k, v in merged.items():
        if v is None:
            none_names.append(k)
        elif isinstance(v, Tensor):
            if k in hypers:  # a tensor hyperparameter (lr=torch.tensor(1e-3)); a group's params are not
                tensor_names.append(k)
                tensor_values.append(v)
        elif isinstance(v, _NUMBERS):
            names.append(k)
            values.append(v)
        elif k in hypers:
            raise TypeError(f"{info.functional}: {k}={v!r} must be a number, None or a 1-element tensor")
    scalars = [t for lst in scalar_states or () for t in lst]
    return (info.module, params, grads, states, absent, scalars, step, ",".join(names), values, ",".join(none_names),
            ",".join(tensor_names), tensor_values, bool(kahan_sum), foreach, triton, fused, bool(gradient_release),
            bool(optimizer_accumulation))
