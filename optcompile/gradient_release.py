"""Gradient release: step each parameter from its post-accumulate-grad hook, inside backward.

The gradient of a parameter is consumed (optimizer step) and freed (``zero_grad(param=p)``) as
soon as autograd has finished accumulating it, so at most a few gradients are alive at once
instead of the whole model's. The optimizer must be built with ``gradient_release=True``; it
then steps one tensor at a time with that parameter's own ``step`` counter and reads the live
param_group through ``state[p]["group"]`` (so LR schedulers keep working, also after
``load_state_dict``, see ``CompiledOptimizer``). ``optimizer.step()`` and ``zero_grad()`` stay
harmless in the training loop, since no gradients remain after backward: ``step()`` only advances
the ``step`` of each param group whose params the hooks stepped, as optimi's does, so saved state
dicts match optimi's (the math reads each param's own ``state[p]["step"]``).

Same API, errors and warning as optimi 0.3.3's ``prepare_for_gradient_release``.
"""
from __future__ import annotations

import warnings
from functools import partial

from torch import Tensor
from torch.nn import Module

from .runtime import CompiledOptimizer

__all__ = ["prepare_for_gradient_release", "remove_gradient_release"]


def _gradient_release_hook(param: Tensor, optimizer: CompiledOptimizer) -> None:
    optimizer.step(param=param)
    optimizer.zero_grad(param=param)


def prepare_for_gradient_release(model: Module, optimizer: CompiledOptimizer, ignore_existing_hooks: bool = False):
    """Register post_accumulate_grad_hooks on parameters for the gradient release optimization step.

    Args:
        model: Model to register post_accumulate_grad_hooks. Only registers on parameters with
            `requires_grad=True`.
        optimizer: Optimizer providing the fused optimizer step during the backward pass. Requires
            optimizer to be initialized with `gradient_release=True`
        ignore_existing_hooks: If True, ignores existing post_accumulate_grad_hooks on parameters
            and registers gradient release hooks (default: False)
    """
    if not isinstance(optimizer, CompiledOptimizer):
        raise TypeError("`optimizer` must be an instance of `CompiledOptimizer` (optcompile's counterpart of "
                        "optimi's `OptimiOptimizer`)")
    if not optimizer.defaults["gradient_release"]:
        raise ValueError("`optimizer` must be initialized with `gradient_release=True`")

    hooks = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p._post_accumulate_grad_hooks and not ignore_existing_hooks:
            for hook in hooks:  # leave the model as we found it
                hook.remove()
            raise ValueError("Model already has post_accumulate_grad_hooks. If this is expected, rerun with "
                             "`ignore_existing_hooks=True`.")
        hooks.append(p.register_post_accumulate_grad_hook(partial(_gradient_release_hook, optimizer=optimizer)))
    # A second prepare (with ignore_existing_hooks=True) keeps the first one's handles, so that
    # remove_gradient_release removes every hook we added (optimi forgets the earlier ones).
    model._gradient_release_hooks = getattr(model, "_gradient_release_hooks", []) + hooks


def remove_gradient_release(model: Module) -> None:
    """Removes post_accumulate_grad_hooks created by `prepare_for_gradient_release`.

    Args:
        model: Model to remove gradient release post_accumulate_grad_hooks from.
    """
    if not hasattr(model, "_gradient_release_hooks"):
        warnings.warn("`model` does not have any gradient release post_accumulate_grad_hooks to remove.",
                      category=UserWarning, stacklevel=2)
        return
    for hook in model._gradient_release_hooks:
        hook.remove()
    del model._gradient_release_hooks
