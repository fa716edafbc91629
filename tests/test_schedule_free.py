"""Schedule-Free SGD and AdamW against the ``schedulefree`` package (1.4.1), and the DSL's parameter
views (``spec.eval_view``) they are built on: ``train()``/``eval()`` on every backend, ``train_mode``
in param groups and state_dicts, ``step()`` in eval mode, fp64 scalar states, lr = 0.

fp32: SGDScheduleFree on eager, foreach and fused follows schedulefree's op order and equals it
bit for bit (the running ``lr_max`` and ``weight_sum`` are fp64 scalar states, as schedulefree's
Python floats). AdamWScheduleFree is within a few fp32 ulps there: schedulefree divides ``v`` by
the bias correction, the printers multiply by its reciprocal (as for NAdam). Triton's kernel
rounds its fused multiply-adds differently: a few fp32 ulps.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import optcompile
from optcompile import compile_spec
from optcompile.spec import OptimizerSpec, SpecError

from optimizers import BACKENDS, backend_params, batches, make_model, mse_backward, schedulefree_cls

NAMES = ("SGDScheduleFree", "AdamWScheduleFree")
OPTIONS = {"SGDScheduleFree": dict(lr=0.5, momentum=0.8, weight_decay=0.01, warmup_steps=4),
           "AdamWScheduleFree": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01, warmup_steps=4)}
EXACT = {"SGDScheduleFree": ("eager", "foreach", "fused"), "AdamWScheduleFree": ()}  # bit for bit in fp32
TOL = dict(rtol=1e-5, atol=1e-6)  # elsewhere: a few fp32 ulps, grown over the steps


def _pair(name, backend, dtype=torch.float32, **kw):
    ours_model, ref_model = make_model(dtype), make_model(dtype)
    options = {**OPTIONS[name], **kw}
    ours = getattr(optcompile, name)(ours_model.parameters(), **options, **BACKENDS[backend].flags)
    ref = schedulefree_cls(name)(ref_model.parameters(), **options, foreach=backend == "foreach")
    return ours_model, ours, ref_model, ref


def _step(model, opt, x, y):
    opt.zero_grad()
    mse_backward(model, x, y)
    opt.step()


def _same(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), f"{what} differs by {(a - b).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _check(ours_model, ref_model, exact, what):
    for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        _same(a, b, exact, f"{what}: {n}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", NAMES)
def test_matches_schedulefree_with_warmup_a_scheduler_and_a_train_eval_cycle(name, backend):
    """Warmup, then an LR scheduler that changes lr every step (the running weight sum and lr_max
    follow it), with an eval()/train() cycle in the middle and eval() at the end."""
    ours_model, ours, ref_model, ref = _pair(name, backend)
    exact = backend in EXACT[name]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + 0.3 * s)) for o in (ours, ref)]
    data = batches(10)
    for i, (x, y) in enumerate(data):
        _step(ours_model, ours, x, y)
        _step(ref_model, ref, x, y)
        for s in scheds:
            s.step()
        _check(ours_model, ref_model, exact, f"step {i + 1}")
        if i == 5:
            ours.eval(), ref.eval()
            _check(ours_model, ref_model, exact, "eval view")
            ours.train(), ref.train()
            _check(ours_model, ref_model, exact, "back to the training view")
    ours.eval(), ref.eval()
    _check(ours_model, ref_model, exact, "eval view at the end")
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        _same(ours.state[p]["z"], ref.state[q]["z"], exact, "z")
    assert [g["train_mode"] for g in ours.param_groups] == [False]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_steps(name, backend):
    """lr = 0 throughout: the weight sum stays 0, the average's weight is 0, the params stay put
    (nothing divides by the lr); then lr > 0 steps as schedulefree does."""
    ours_model, ours, ref_model, ref = _pair(name, backend, lr=0.0, warmup_steps=0)
    before = [p.detach().clone() for p in ours_model.parameters()]
    for x, y in batches(3):
        _step(ours_model, ours, x, y)
        _step(ref_model, ref, x, y)
    assert all(torch.equal(a, b) for a, b in zip(ours_model.parameters(), before))
    for o in (ours, ref):
        o.param_groups[0]["lr"] = OPTIONS[name]["lr"]
    for x, y in batches(3, seed=2):
        _step(ours_model, ours, x, y)
        _step(ref_model, ref, x, y)
    _check(ours_model, ref_model, backend in EXACT[name], "after lr = 0")
    assert float(ours.state[next(ours_model.parameters())]["weight_sum"]) > 0


@pytest.mark.parametrize("name", NAMES)
def test_views_are_idempotent_and_a_new_optimizer_is_in_train_mode(name):
    model = make_model()
    opt = getattr(optcompile, name)(model.parameters(), **OPTIONS[name])
    assert [g["train_mode"] for g in opt.param_groups] == [True]
    start = [p.detach().clone() for p in model.parameters()]
    opt.eval()  # no state yet: both views are the params themselves
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start))
    opt.train()
    for x, y in batches(3):
        _step(model, opt, x, y)
    y_view = [p.detach().clone() for p in model.parameters()]
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), y_view)), "train() in train mode changed params"
    opt.eval()
    x_view = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(x_view, y_view))
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), x_view)), "eval() in eval mode changed params"
    opt.train()
    for a, b in zip(model.parameters(), y_view):  # x → y is the inverse map, up to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_step_in_eval_mode_raises(name):
    model = make_model()
    opt = getattr(optcompile, name)(model.parameters(), **OPTIONS[name])
    x, y = batches(1)[0]
    _step(model, opt, x, y)
    opt.eval()
    mse_backward(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=rf"{name}\.step\(\) was called in eval mode.*optimizer\.train\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    opt.train()
    opt.step()


@pytest.mark.parametrize("backend", backend_params("eager", "fused"))
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_in_eval_mode(name, backend):
    """Saved in eval mode (as schedulefree recommends) with the model: a new model and optimizer
    loaded from it are in eval mode, and after train() continue exactly as the original does."""
    model = make_model()
    opt = getattr(optcompile, name)(model.parameters(), **OPTIONS[name], **BACKENDS[backend].flags)
    data = batches(8)
    for x, y in data[:4]:
        _step(model, opt, x, y)
    opt.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert [g["train_mode"] for g in saved_opt["param_groups"]] == [False]
    assert saved_opt["state"][0]["weight_sum"].dtype == torch.float64

    model2 = make_model()
    model2.load_state_dict(saved_model)
    opt2 = getattr(optcompile, name)(model2.parameters(), **OPTIONS[name], **BACKENDS[backend].flags)
    opt2.load_state_dict(saved_opt)
    assert [g["train_mode"] for g in opt2.param_groups] == [False]
    assert opt2.state[next(model2.parameters())]["lr_max"].dtype == torch.float64
    with pytest.raises(RuntimeError, match="eval mode"):
        opt2.step()
    for o in (opt, opt2):
        o.train()
    for x, y in data[4:]:
        _step(model, opt, x, y)
        _step(model2, opt2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", NAMES)
def test_bf16_kahan_matches_fp32_and_views_swap_from_the_exact_param(name, backend):
    """bf16 params with Kahan summation track the fp32 run on every backend, in both views: the
    view writes are compensated like any param write (they start from ``param + kahan_comp``)."""
    ref_model = make_model()
    ref = getattr(optcompile, name)(ref_model.parameters(), **OPTIONS[name], **BACKENDS["eager"].flags)
    model = make_model(torch.bfloat16)
    opt = getattr(optcompile, name)(model.parameters(), **OPTIONS[name], kahan_sum=True, **BACKENDS[backend].flags)
    for i, (x, y) in enumerate(batches(8)):
        _step(ref_model, ref, x, y)
        _step(model, opt, x, y)
        if i == 3:
            for o in (ref, opt):
                o.eval()
            for o in (ref, opt):
                o.train()
    for o in (ref, opt):
        o.eval()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        exact = p.float() + opt.state[p]["kahan_comp"].float()
        torch.testing.assert_close(exact, q, rtol=2e-2, atol=1e-2)
        assert opt.state[p]["z"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_signature_and_validation_are_schedulefree(name):
    import inspect
    ours = inspect.signature(getattr(optcompile, name)).parameters
    ref = inspect.signature(getattr(__import__("schedulefree"), name)).parameters
    theirs = [n for n in ref if n != "foreach"]
    assert list(ours)[:len(theirs)] == theirs
    assert all(ours[n].default == ref[n].default for n in theirs if n != "params")
    cls = getattr(optcompile, name)
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1"):
        cls(p, lr=-1)
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -0.5"):
        cls(p, weight_decay=-0.5)
    if name == "SGDScheduleFree":
        with pytest.raises(ValueError, match=r"Momentum must be between 0 and 1 exclusive: 1"):
            cls(p, momentum=1)


# ── the DSL: views, direct param writes, fp64 scalar states ─────────────────────────────────────
def test_eval_view_and_set_param_errors_name_the_problem():
    spec = OptimizerSpec("Views", weight_decay=None)
    z = spec.state("z", init=spec.param)
    with pytest.raises(SpecError, match=r"eval_view\(eval=...\) reads `grad`; a view may read the param, its "
                                        "states and hyperparameters only"):
        spec.eval_view(eval=spec.param + spec.grad, train=spec.param)
    z_new = spec.assign(z, z + spec.grad)
    with pytest.raises(SpecError, match=r"eval_view\(train=...\) reads `z__v\d+`, a value the step computes"):
        spec.eval_view(eval=spec.param, train=z_new)
    with pytest.raises(SpecError, match="precision='fp64'; a scalar state"):
        spec.state("s", precision="fp64")
    with pytest.raises(SpecError, match=r"spec.set_param before spec.update: the injected weight decay"):
        OptimizerSpec("Decayed").set_param(1)
    spec.set_param(spec.param - spec.grad)
    with pytest.raises(SpecError, match="spec.update after spec.set_param"):
        spec.update(spec.grad, lr=1)


def test_a_user_spec_with_views_on_every_backend_agrees_with_eager():
    """A user spec whose views are states (Polyak averaging): eval() puts the running average
    into the params and train() the SGD iterate back, on every backend, as eager does."""
    spec = OptimizerSpec("AveragedSGD", weight_decay=None)
    lr = spec.hyper("lr", 0.1)
    z = spec.state("z", init=spec.param)  # the SGD iterate: what the params hold in train mode
    avg = spec.state("avg", init=spec.param)
    spec.eval_view(eval=avg, train=z)
    new = spec.set_param(spec.param - lr * spec.grad)
    spec.assign(z, new)
    spec.assign(avg, avg + (new - avg) / 2)
    cls = compile_spec(spec)
    runs = {}
    for backend in [b for b in BACKENDS if BACKENDS[b].unavailable() is None and (
            b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]:  # CPU tensors: interpreted Triton
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(9)), torch.nn.Parameter(torch.randn(3, 4))]
        opt = cls(params, **BACKENDS[backend].flags)
        for i in range(3):
            for q in params:
                q.grad = torch.full_like(q, float(i + 1))
            opt.step()
        trained = [q.detach().clone() for q in params]
        opt.eval()
        averaged = [q.detach().clone() for q in params]
        assert all(torch.equal(a, opt.state[q]["avg"]) for a, q in zip(averaged, params)), backend
        assert not all(torch.equal(a, b) for a, b in zip(averaged, trained))
        opt.train()
        assert all(torch.equal(a, q) for a, q in zip(trained, params)), backend
        runs[backend] = averaged
    for backend, values in runs.items():
        assert all(torch.allclose(a, b) for a, b in zip(values, runs["eager"])), backend


@pytest.mark.parametrize("name", NAMES)
def test_gradient_release_steps_and_swaps_views(name):
    """Under gradient release each param steps in its backward hook with its own step count and
    running values (fp64 scalar states), and eval() swaps what the hooks stepped."""
    from optcompile import prepare_for_gradient_release
    model = make_model()
    opt = getattr(optcompile, name)(model.parameters(), **OPTIONS[name], gradient_release=True,
                                    **BACKENDS["eager"].flags)
    prepare_for_gradient_release(model, opt)
    ref_model = make_model()
    ref = schedulefree_cls(name)(ref_model.parameters(), **OPTIONS[name], foreach=False)
    for x, y in batches(6):
        mse_backward(model, x, y)
        opt.step()
        opt.zero_grad()
        _step(ref_model, ref, x, y)
    opt.eval(), ref.eval()
    _check(model, ref_model, name == "SGDScheduleFree", "eval view after release steps")
    with pytest.raises(RuntimeError, match="eval mode"):
        mse_backward(model, *batches(1)[0])  # the hooks step: in eval mode they refuse
