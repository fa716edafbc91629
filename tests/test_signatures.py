"""Drop-in signatures: every class and functional form takes optimi 0.3.3's parameters first,
unchanged (name, kind, default, annotation), followed only by keyword-only additions."""
import inspect

import optimi
import pytest

import optcompile

NAMES = optcompile.OPTIMIZERS
# optimi's classes; those that are torch.optim's take torch.optim's signature (tests/test_torch_family.py)
OPTIMI_NAMES = [n for n in NAMES if hasattr(optimi, n)]
ADDED = {"fused", "maximize", "state_precision", "stochastic_rounding", "sr_seed", "sr_step", "code_scales"}  # optcompile's keyword-only extras


def _annotation(p):
    a = p.annotation
    return a if isinstance(a, str) else inspect.formatannotation(a)


# Where optimi's own annotations are inconsistent across its functional forms we use the common
# one (``list[Tensor]``); and StableAdamW's Triton-only scratch ``mean_squares`` has no counterpart
# (our Triton backend keeps its reduction scratch private).
LOOSER = {("lion", "exp_avgs"), ("sgd", "params"), ("sgd", "grads"), ("sgd", "exp_avgs"), ("sgd", "kahan_comps")}
SKIPPED = {("stableadamw", "mean_squares")}


def _check(ours, theirs, where):
    ours, theirs = list(inspect.signature(ours).parameters.values()), list(inspect.signature(theirs).parameters.values())
    theirs = [p for p in theirs if (where, p.name) not in SKIPPED]
    assert [p.name for p in ours[:len(theirs)]] == [p.name for p in theirs], where
    for a, b in zip(ours, theirs):
        assert a.kind == b.kind, f"{where}: {a.name} kind {a.kind} != {b.kind}"
        assert a.default == b.default and type(a.default) is type(b.default), \
            f"{where}: {a.name} default {a.default!r} != {b.default!r}"
        if (where, a.name) not in LOOSER:
            assert _annotation(a) == _annotation(b), f"{where}: {a.name}: {_annotation(a)} != {_annotation(b)}"
    extra = ours[len(theirs):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.name in ADDED for p in extra), \
        f"{where}: unexpected extra parameters {[p.name for p in extra]}"


@pytest.mark.parametrize("name", OPTIMI_NAMES)
def test_class_signature_matches_optimi(name):
    _check(getattr(optcompile, name).__init__, getattr(optimi, name).__init__, name)


@pytest.mark.parametrize("name", OPTIMI_NAMES)
def test_functional_signature_matches_optimi(name):
    fn = name.lower()
    _check(getattr(optcompile, fn), getattr(optimi, fn), fn)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_is_the_spec_docstring(name):
    cls = getattr(optcompile, name)
    assert cls.__doc__.split("\n")[0].startswith(name) and "Args:" in cls.__doc__


BAD = [  # one bad argument each; optimi's exact message
    (dict(betas=(1.0, 0.99)), "Invalid beta1 parameter: betas[0]=1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta2 parameter: betas[1]=-0.1"),
    (dict(lr=-1.0), "Invalid learning rate: lr=-1.0"),
    (dict(weight_decay=-1.0), "Invalid weight decay: weight_decay=-1.0"),
    (dict(eps=-1.0), "Invalid epsilon: eps=-1.0"),
    (dict(max_lr=-1.0), "Invalid maximum learning rate: max_lr=-1.0"),
    (dict(momentum=1.0), "Invalid momentum: momentum=1.0"),
    (dict(lr=-1.0, betas=(2.0, 0.99)), "Invalid beta1 parameter: betas[0]=2.0"),  # optimi's order: own checks first
]


def _error(lib, name, kw):
    import torch
    extra = {"fused": False} if lib is optcompile else {}
    with pytest.raises(ValueError) as exc:
        getattr(lib, name)([torch.zeros(2, requires_grad=True)], **{"lr": 1e-3, **kw}, **extra)
    return str(exc.value)


@pytest.mark.parametrize("name", OPTIMI_NAMES)
def test_validation_messages_match_optimi(name):
    params = inspect.signature(getattr(optimi, name).__init__).parameters
    checked = 0
    for kw, msg in BAD:
        if not set(kw) <= set(params):
            continue
        if "betas" in kw and len(params["betas"].default) == 3:
            kw = {**kw, "betas": kw["betas"] + (0.99,)}
        assert _error(optimi, name, kw) == msg and _error(optcompile, name, kw) == msg, (name, kw)
        checked += 1
    assert checked >= 3
