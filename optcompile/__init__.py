"""optcompile: optimizers written once as sympy specs, compiled to eager, foreach, Triton and
fused C code. ``from optcompile import AdamW`` is a drop-in for ``optimi.AdamW``, and
``from optcompile import RMSprop`` (Adadelta, Adafactor, Adagrad, Adamax, ASGD, NAdam, Rprop) for ``torch.optim``'s,
``SGDScheduleFree`` and ``AdamWScheduleFree`` for the ``schedulefree`` package's."""
from __future__ import annotations

from .version import __version__

OPTIMIZERS = ("Adadelta", "Adafactor", "Adagrad", "Adam", "Adamax", "AdamW", "AdamWScheduleFree", "Adan", "ASGD", "Lion",
              "Muon", "NAdam", "RAdam", "Ranger", "RMSprop", "Rprop", "SGD", "SGDScheduleFree", "StableAdamW")
FUNCTIONALS = tuple(n.lower() for n in OPTIMIZERS)

__all__ = list(OPTIMIZERS) + list(FUNCTIONALS) + [
    "compile_spec", "load_spec", "OptimizerSpec", "SpecError", "prepare_for_gradient_release",
    "remove_gradient_release", "param_groups_weight_decay", "to_low_precision", "__version__"]


def __getattr__(name: str):
    # Lazy: `from optcompile import AdamW` loads one generated module and never imports sympy.
    import importlib

    if name.startswith("_") or name in ("loader", "spec", "gradient_release", "utils"):
        raise AttributeError(f"module 'optcompile' has no attribute {name!r}")
    loader = importlib.import_module("optcompile.loader")
    if name in OPTIMIZERS or name in FUNCTIONALS:
        module = loader.builtin_module(name.lower())
        value = getattr(module, name)
    elif name == "compile_spec":
        value = loader.compile_spec
    elif name in ("load_spec", "OptimizerSpec", "SpecError"):
        value = getattr(importlib.import_module("optcompile.spec"), name)
    elif name in ("prepare_for_gradient_release", "remove_gradient_release"):
        value = getattr(importlib.import_module("optcompile.gradient_release"), name)
    elif name in ("param_groups_weight_decay", "to_low_precision"):
        value = getattr(importlib.import_module("optcompile.utils"), name)
    else:
        raise AttributeError(f"module 'optcompile' has no attribute {name!r}")
    globals()[name] = value
    return value
