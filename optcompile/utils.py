"""Training helpers that go with every optimizer: weight-decay param groups and low-precision models.

Same signatures and results as optimi 0.3.3's ``param_groups_weight_decay`` and
``to_low_precision``, with these fixes to ``to_low_precision`` (optimi's behaviour in brackets):

* a bare string ``fp32_buffers="rope"`` is one keyword [split into the characters r, o, p, e,
  which keeps almost every buffer in fp32];
* keywords match module names case-insensitively, so ``"rope"`` and ``"RoPE"`` both match a
  module called ``RoPE`` [keywords were lowercased, names were not, so ``"RoPE"`` never matched];
* integer buffers keep their dtype but do move to ``device`` [left on the old device];
* ``fp32_modules`` may be any iterable of types [a list crashed ``isinstance``, and a generator
  was consumed by the validity check].
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups_weight_decay", "to_low_precision"]


def param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-2,
                              additional_layers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Parameter groups that exclude biases, norm weights (any ``ndim <= 1`` param) and the layers
    named in ``additional_layers`` (substrings of the parameter name) from weight decay.

    Args:
        model: PyTorch model to create parameter groups for
        weight_decay: Weight decay coefficient applied to eligible parameters (default: 1e-2)
        additional_layers: Iterable of layer name substrings to exclude from weight decay.

    Returns:
        Two param groups, always in this order and even if one is empty:
        ``[{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]``.
        Parameters with ``requires_grad=False`` are left out.
    """
    skip = set(additional_layers) if additional_layers is not None else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _buffer_rules(fp32_buffers) -> tuple[set[str], tuple[type, ...]]:
    """(lowercase name keywords, module types) whose buffers stay fp32; a str is one keyword."""
    if fp32_buffers is None:
        return set(), ()
    if isinstance(fp32_buffers, str) or not isinstance(fp32_buffers, Iterable):
        fp32_buffers = (fp32_buffers,)
    keywords, types = set(), []
    for item in fp32_buffers:
        if isinstance(item, str):
            keywords.add(item.lower())
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError("fp32_buffers items must be str or a nn.Module subclass type")
    return keywords, tuple(types)


def _module_types(fp32_modules) -> tuple[type, ...]:
    if fp32_modules is None:
        return ()
    if not isinstance(fp32_modules, Iterable):
        fp32_modules = (fp32_modules,)
    fp32_modules = tuple(fp32_modules)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in fp32_modules):
        raise TypeError("fp32_modules must be nn.Module subclass type(s)")
    return fp32_modules


def to_low_precision(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    fp32_modules: type[nn.Module] | Iterable[type[nn.Module]] | None = nn.Embedding,
    fp32_buffers: str | type[nn.Module] | Iterable[str] | Iterable[type[nn.Module]] | None = ("rope", "rotary"),
) -> nn.Module:
    """Cast ``model`` in place to ``dtype`` (for bf16 training with Kahan summation), keeping
    select modules and buffers in float32, and optionally move it to ``device``.

    Args:
        model: Module to cast in-place.
        dtype: Target dtype (default: ``torch.bfloat16``).
        device: Optional target device (default: None).
        fp32_modules: Module types whose params and buffers stay float32 (default: ``nn.Embedding``).
        fp32_buffers: Keywords (a str is one keyword) matched case-insensitively against a module's
            qualified name, and/or module types: their buffers stay float32, their params do not
            (default: ("rope", "rotary"), for RoPE tables).

    Returns:
        The input ``model`` (cast in-place). Integer tensors keep their dtype.
    """
    keywords, buffer_types = _buffer_rules(fp32_buffers)
    module_types = _module_types(fp32_modules)

    def cast(ids: set[int], keep_fp32: bool):
        def fn(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in ids:
                return t  # the other kind (params vs buffers): left to the other _apply
            if t.is_floating_point():
                return t.to(dtype=torch.float32 if keep_fp32 else dtype, device=device)
            return t.to(device=device) if device is not None else t
        return fn

    def visit(m: nn.Module, qual: str) -> None:
        params_fp32 = isinstance(m, module_types)
        buffers_fp32 = params_fp32 or isinstance(m, buffer_types) or any(k in qual.lower() for k in keywords)
        # Module._apply (recurse=False) handles .data swaps and existing grads as .to() would
        params = list(m.parameters(recurse=False))
        grads = [p.grad for p in params if p.grad is not None]  # _apply casts existing grads too
        m._apply(cast({id(t) for t in params + grads}, params_fp32), recurse=False)
        m._apply(cast({id(b) for b in m.buffers(recurse=False)}, buffers_fp32), recurse=False)
        for name, child in m.named_children():
            visit(child, f"{qual}.{name}" if qual else name)

    visit(model, "")
    return model
