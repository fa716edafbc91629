"""Algorithms a user might write from the README alone (LAMB's per-tensor trust ratio, RMSprop's
optional states, Signum's clipping functions, a periodic `every`/`set_param` anchor, a stateless
step, Adamax's elementwise Max with a max-reduction clip and a param-dependent init, ClipSGD's
tensor Piecewise against a hyperparameter and a flag, AdaGrad's hyperparameter-initialised
state, Nesterov's guarded read of a `when=` state): every
backend must compile them and agree with the eager backend, in fp32 and bf16."""
import os
from pathlib import Path

import pytest
import torch

import optcompile
from optimizers import BACKENDS, EAGER, backend_params

SPECS = sorted((Path(__file__).parent / "user_specs").glob("*.py"))
OTHERS = ("foreach", "fused", "triton")  # compared with eager
OPTIONS = {"lamb": {}, "rmsprop": {"centered": True, "momentum": 0.9, "weight_decay": 0.1}, "signum": {},
           "nadam": {"k": 2}, "plain": {}, "adamax": {"weight_decay": 0.1, "init_scale": 0.5},
           "clipsgd": {"clip": 0.3, "weight_decay": 0.01, "sign_only": True},
           "adagrad": {"initial_accumulator_value": 0.5, "clip_updates": False, "weight_decay": 0.01},
           "nesterov": {"momentum": 0.9, "dampening": 0.1}}


def _run(cls, kw, dtype, backend):
    torch.manual_seed(0)
    params = [torch.randn(s).to(dtype).requires_grad_() for s in [(3,), (1025,), (0,), (7, 9)]]
    opt = cls(params, lr=1e-2, **kw, **backend)
    for _ in range(6):
        for p in params:
            p.grad = (0.5 * torch.randn(p.shape)).to(dtype)
        opt.step()
    return [p.detach().float() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backend_params(*OTHERS))
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_user_spec_backends_agree_with_eager(path, backend, dtype):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    cls = optcompile.compile_spec(path)
    kw = OPTIONS[path.stem]
    want = _run(cls, kw, dtype, EAGER)
    got = _run(cls, kw, dtype, BACKENDS[backend].flags)
    for a, b in zip(got, want):
        if dtype == torch.float32:  # fp32 math in another association order: a few ulp over 6 steps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # both compute in fp32 and round once per store; FMA contraction may flip a rounding
            assert (a != b).sum() <= 0.02 * a.numel()
            torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7)


HOST_TAIL_SPEC = '''
from optcompile.spec import Ge, Gt, Interval, OptimizerSpec, Piecewise, oo
spec = OptimizerSpec("HostTail", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", default=0.9)
g = spec.grad
spec.update(Piecewise((g, Gt(g, 0)), (2 * g, Ge(beta, 0.5)), (3 * g, Ge(beta, lr)), (4 * g, True)), lr=lr)
'''


@pytest.mark.parametrize("beta", [0.9, 0.3, 0.01])
def test_elementwise_piecewise_with_host_conditions_after_a_tensor_one(tmp_path, beta):
    """Branches after an elementwise condition may test hyperparameters (they become host guards)."""
    path = tmp_path / "hosttail.py"
    path.write_text(HOST_TAIL_SPEC)
    cls = optcompile.compile_spec(path)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    factor = 2 if beta >= 0.5 else 3 if beta >= 0.1 else 4
    want = -0.1 * torch.where(g > 0, g, factor * g)
    for backend in [EAGER, *(BACKENDS[n].flags for n in OTHERS)]:
        if backend.get("triton") and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        p = torch.zeros(1000, requires_grad=True)
        opt = cls([p], lr=0.1, beta=beta, **backend)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
