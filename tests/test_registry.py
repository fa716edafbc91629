"""The test registry (tests/optimizers.py) against what it describes: an entry per built-in spec,
configurations every library accepts, and backend flags that select their backend."""
import inspect
import warnings
from pathlib import Path

import pytest
import torch

import optcompile
import optimizers
from optcompile.runtime import choose_backend
from optimizers import BACKENDS, OPTIMIZERS, backend_params

pytestmark = pytest.mark.filterwarnings("ignore:You are using weight_decay")  # the decouple_lr advice


def test_every_builtin_has_one_entry():
    assert optimizers.STEMS == [p.stem for p in optimizers.builtin_specs()]
    assert tuple(optimizers.NAMES) == optcompile.OPTIMIZERS


def test_a_new_spec_without_an_entry_is_named(monkeypatch):
    specs = optimizers.builtin_specs()
    monkeypatch.setattr(optimizers, "builtin_specs", lambda: [*specs, Path("specs/shiny.py")])
    with pytest.raises(LookupError, match=r"specs/shiny\.py have no entry in tests/optimizers\.py"):
        optimizers._registry()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.stem)
def test_entry_matches_its_class_and_every_config_constructs(info):
    """Each configuration is accepted by our class and, where it has one, optimi's: a typo or an
    option a class lacks fails here instead of quietly testing something else."""
    cls = info.cls
    assert cls.__name__ == info.name and getattr(optcompile, info.name) is cls
    ndim = 1 if not info.param_ndims or 1 in info.param_ndims else info.param_ndims[0]
    p = [torch.nn.Parameter(torch.zeros((3,) * ndim))]
    configs = [c.kwargs for c in info.training] + list(info.differential) + [info.stateful, info.state_dict]
    for kw in configs + list(info.kernel):
        cls(p, **{"lr": info.lr, **kw}, **optimizers.EAGER)
    if info.optimi_cls is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for kw in configs:
                info.optimi_cls(p, **{"lr": info.lr, **kw}, **optimizers.ORACLE_EAGER)
    assert len({c.id for c in info.training}) == len(info.training)
    # the facts other tests branch on describe the class
    params = inspect.signature(cls.__init__).parameters
    assert info.weight_decay == ("weight_decay" in params), "OptimizerInfo.weight_decay"
    group = cls(p, **{"lr": info.lr, **info.kahan}, **optimizers.EAGER).param_groups[0]
    assert set(info.freeze) <= set(group), f"freeze {dict(info.freeze)}: not group keys"
    assert set(info.summed_states) <= set(cls._info.states), "summed_states"
    assert info.param_ndims == cls._info.extra.get("param_ndims", ()), "param_ndims"
    assert info.oracle[0].__name__ == info.name
    for case in info.torch_optim:
        cls(p, **case.ours, **optimizers.EAGER)
        case.torch_cls(p, **case.theirs)


@pytest.mark.parametrize("backend", backend_params())
def test_backend_flags_select_their_backend(backend):
    flags = BACKENDS[backend].flags
    assert choose_backend([torch.zeros(1)], **flags) == backend
    # gradient release steps one param at a time: foreach has nothing to batch and runs eager
    per_param = "eager" if backend == "foreach" else backend
    assert choose_backend([torch.zeros(1)], **flags, gradient_release=True) == per_param
