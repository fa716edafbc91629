"""Muon (specs/muon.py) against torch.optim.Muon 2.13, option by option: 24 steps, two param
groups (the second at half the lr) under a StepLR schedule, square, tall and wide matrices.

eager and foreach are **bit-exact** with torch's (only, for-loop) path in fp32, params and
momentum buffers. triton and fused run their kernels around the matrix function (stage 0: the
momentum and the Nesterov blend; a segment: Newton–Schulz as torch ops on the kernel's fp32 spill;
stage 1: the decayed param update): momentum buffers are bit-exact there too, params within
``rtol=1e-5, atol=1e-6`` after 24 steps (the kernels' ``p·(1−γλ) − γ'·O`` rounds without torch's
fused multiply-add; seen: ≤ 2e-6 absolute, ≤ 7e-6 relative). bf16 with Kahan summation tracks
torch in fp32 on every backend. The rank error, ``adjust_lr_fn``'s error and the state_dict round
trip (torch → optcompile → torch) are torch's.
"""
import inspect

import pytest
import torch

import optcompile
from optimizers import BACKENDS, backend_params

STEPS = 24
SHAPES = ([(6, 6), (9, 4)], [(4, 9), (6, 6), (2, 7)])  # two groups: square, tall, wide (a square in each)
OPTIONS = [dict(), dict(nesterov=False), dict(weight_decay=0.0), dict(weight_decay=0.02), dict(momentum=0.8),
           dict(momentum=0.0), dict(ns_steps=2), dict(ns_steps=8), dict(ns_coefficients=(2.0, -1.5, 0.5)),
           dict(eps=1e-2), dict(adjust_lr_fn="original"), dict(adjust_lr_fn="match_rms_adamw"),
           dict(adjust_lr_fn="match_rms_adamw", nesterov=False, weight_decay=0.01, momentum=0.9, ns_steps=3)]


def make_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes] for shapes in SHAPES]


def make(cls, params, kw, **flags):
    lr = kw.get("lr", 0.02)
    return cls([{"params": params[0]}, {"params": params[1], "lr": lr * 0.5}], **{**kw, "lr": lr}, **flags)


def gradients(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) * 2 for p in sum(params, [])] for _ in range(steps)]


def train(opt, params, steps=STEPS):
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    for grads in gradients(params, steps):
        for p, gr in zip(sum(params, []), grads):
            p.grad = torch.empty_like(p).copy_(gr)  # laid out like its param (a transposed one too)
        opt.step()
        sched.step()
    return opt


KERNEL_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
pytestmark = [pytest.mark.filterwarnings("error:.*kernels")]  # every backend runs its own code (no fallback)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_matches_torch_muon(kw, backend):
    ours, theirs = make_params(), make_params()
    o = train(make(optcompile.Muon, ours, kw, **BACKENDS[backend].flags), ours)
    t = train(make(torch.optim.Muon, theirs, kw), theirs)
    for a, b in zip(sum(ours, []), sum(theirs, [])):
        if backend in ("eager", "foreach"):
            assert torch.equal(a, b), f"{tuple(a.shape)}: max |Δ| = {(a - b).abs().max():.3g}"
        else:
            torch.testing.assert_close(a, b, **KERNEL_TOLERANCE)
        assert torch.equal(o.state[a]["momentum_buffer"], t.state[b]["momentum_buffer"])


@pytest.mark.parametrize("backend", backend_params())
def test_bf16_kahan_tracks_fp32_torch(backend):
    """bf16 params with Kahan summation stay closer to torch's fp32 trajectory than without, on
    every backend (the matrix function reads the momentum widened to fp32: the kernels' fp32 spill)."""
    kw = dict(lr=0.02, weight_decay=0.01)
    ref = make_params()
    train(make(torch.optim.Muon, ref, kw), ref)
    errors = {}
    for kahan in (True, False):
        ps = make_params(torch.bfloat16)
        opt = train(make(optcompile.Muon, ps, kw, kahan_sum=kahan, **BACKENDS[backend].flags), ps)
        exact = [p.detach().float() + (opt.state[p]["kahan_comp"].float() if kahan else 0) for p in sum(ps, [])]
        errors[kahan] = max(float((a - b.detach()).abs().max()) for a, b in zip(exact, sum(ref, [])))
    assert errors[True] < errors[False], errors
    assert errors[True] < 0.02, errors


def test_rank_error_is_torchs():
    for shape in [(5,), (2, 3, 4), ()]:
        bad = torch.zeros(shape, requires_grad=True)
        with pytest.raises(ValueError) as theirs:
            torch.optim.Muon([torch.zeros(2, 2, requires_grad=True), bad])
        with pytest.raises(ValueError) as ours:
            optcompile.Muon([torch.zeros(2, 2, requires_grad=True), bad])
        assert str(ours.value) == str(theirs.value)
    opt = optcompile.Muon([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"^Muon only supports 2D parameters whereas we found a parameter with "
                                         r"size: torch.Size\(\[3\]\)$"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})


def test_adjust_lr_fn_error_and_signature_are_torchs():
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([torch.zeros(2, 2, requires_grad=True)], adjust_lr_fn="rms")
    with pytest.raises(ValueError) as ours:
        optcompile.Muon([torch.zeros(2, 2, requires_grad=True)], adjust_lr_fn="rms")
    assert str(ours.value) == str(theirs.value) == "Adjust learning rate function rms is not supported"
    ours = inspect.signature(optcompile.Muon.__init__).parameters
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all((ours[k].default, ours[k].kind) == (v.default, v.kind) for k, v in theirs.items())


@pytest.mark.parametrize("kw", [dict(), dict(adjust_lr_fn="match_rms_adamw", nesterov=False)],
                         ids=["defaults", "match_rms_adamw"])
def test_state_dict_round_trip_with_torch(kw):
    """torch.optim.Muon for 8 steps → its state_dict into optcompile.Muon for 8 → that state_dict
    (torch's layout: no step, no None states) into torch.optim.Muon for 8: bit-exact with torch
    alone for all 24 steps."""
    ref, ps = make_params(), make_params()
    t_ref = make(torch.optim.Muon, ref, kw)
    legs = [make(torch.optim.Muon, ps, kw)]
    for i, grads in enumerate(gradients(ps, STEPS)):
        if i == 8:
            legs.append(make(optcompile.Muon, ps, kw, **BACKENDS["eager"].flags))
            legs[-1].load_state_dict(legs[-2].state_dict())
        if i == 16:
            saved = legs[-1].state_dict()
            assert [set(s) for s in saved["state"].values()] == [{"momentum_buffer"}] * 5
            assert saved["param_groups"][0]["adjust_lr_fn"] == kw.get("adjust_lr_fn")
            legs.append(make(torch.optim.Muon, ps, kw))
            legs[-1].load_state_dict(saved)
        for p, q, gr in zip(sum(ref, []), sum(ps, []), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        t_ref.step()
        legs[-1].step()
    for a, b in zip(sum(ps, []), sum(ref, [])):
        assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max():.3g}"
    for a, b in zip(ps[0] + ps[1], ref[0] + ref[1]):
        assert torch.equal(legs[-1].state[a]["momentum_buffer"], t_ref.state[b]["momentum_buffer"])


@pytest.mark.parametrize("backend", backend_params())
def test_transposed_matrices_match_torch_muon(backend):
    """Dense but not contiguous params (a transposed tall matrix, next to a contiguous one of its
    shape): the kernels' spill holds a param's elements in memory order, so the matrix function
    must see the spill as the param's view and its result must be laid out like the param."""
    def make_t():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(9, 4, generator=g).t().requires_grad_(), torch.randn(4, 9, generator=g).requires_grad_()]
    ours, theirs = make_t(), make_t()
    assert not ours[0].is_contiguous()
    o = train(make(optcompile.Muon, [ours, []], {}, **BACKENDS[backend].flags), [ours, []], steps=6)
    t = train(make(torch.optim.Muon, [theirs, []], {}), [theirs, []], steps=6)
    for a, b in zip(ours, theirs):
        if backend in ("eager", "foreach"):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **KERNEL_TOLERANCE)
        assert torch.equal(o.state[a]["momentum_buffer"], t.state[b]["momentum_buffer"])
