"""Optimizer accumulation (gradient release + ``optimizer_accumulation``): every spec, against
optimi (the oracle), and the ``update_parameters`` guard: micro-steps move states, never params."""
import pytest
import torch
from torch import nn

import optimi
from optcompile import loader, prepare_for_gradient_release
from optcompile.paths import builtin_specs

SPECS = [p.stem for p in builtin_specs()]
EAGER = dict(foreach=False, triton=False, fused=False)
KWARGS = {"adam": dict(weight_decay=1e-2), "sgd": dict(momentum=0.9, weight_decay=1e-2, decouple_wd=True),
          "lion": dict(weight_decay=1e-2), "radam": dict(weight_decay=1e-2), "ranger": dict(weight_decay=1e-2)}
MICRO = 4


pytestmark = pytest.mark.usefixtures("one_thread")


ours = loader.builtin_class


def make_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 6)).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)) for _ in range(n)]


def train_accumulating(model, opt, data, on_micro_step=None):
    """``len(data) / MICRO`` optimizer steps, each accumulating MICRO micro-batches into the states."""
    dtype = next(model.parameters()).dtype
    for i, (x, y) in enumerate(data):
        opt.optimizer_accumulation = (i + 1) % MICRO != 0  # the last micro-batch updates the params
        before = [p.detach().clone() for p in model.parameters()]
        ((model(x.to(dtype)).float() - y) ** 2).mean().backward()
        if on_micro_step:
            on_micro_step(i, before)
    return model


@pytest.mark.parametrize("stem", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulation_matches_optimi(stem, dtype):
    """3 optimizer steps of 4 micro-batches = 12 micro-steps (Ranger's lookahead, k=6, fires at
    t=12 on the updating micro-step; RAdam rectifies from t=6). fp32: rtol 1e-5 / atol 1e-6
    (same math; only host-scalar op order differs). bf16 with Kahan: we compute in fp32, optimi in
    bf16 with one rounding per op; within 2 bf16 ulps (2**-7 relative) plus 2e-3 absolute."""
    cls = ours(stem)
    ocls = getattr(optimi, cls.__name__, None)
    if ocls is None:
        pytest.skip(f"optimi has no {cls.__name__}")
    if stem == "sgd" and not KWARGS["sgd"].get("momentum"):
        pytest.skip("SGD without momentum has nothing to accumulate")
    lr, kahan = (1e-2, {}) if dtype == torch.float32 else (1e-3, {"kahan_sum": True})
    data = batches(3 * MICRO)
    a, b = make_model(dtype), make_model(dtype)
    opt_a = cls(a.parameters(), lr=lr, gradient_release=True, **kahan, **KWARGS.get(stem, {}), **EAGER)
    opt_b = ocls(b.parameters(), lr=lr, gradient_release=True, **kahan, **KWARGS.get(stem, {}), foreach=False,
                 triton=False)
    prepare_for_gradient_release(a, opt_a)
    optimi.prepare_for_gradient_release(b, opt_b)
    train_accumulating(a, opt_a, data)
    train_accumulating(b, opt_b, data)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for name in cls._info.states:
            if torch.is_tensor(sb.get(name)) and sb[name].dim() > 0:
                state_tol = tol if dtype == torch.float32 else dict(  # bf16: optimi rounds each op of the
                    rtol=2**-7, atol=max(2e-3, 2**-6 * sb[name].abs().max().item()))  # EMA: 4 ulps of max|state|
                torch.testing.assert_close(sa[name], sb[name], **state_tol,
                                           msg=lambda m, name=name: f"state {name}: {m}")
        if "step" in sb:
            assert int(sa["step"]) == int(sb["step"]) == 3 * MICRO  # micro-steps count for debiasing


@pytest.mark.parametrize("stem", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_steps_update_states_not_params(stem, dtype):
    """The accumulation pass guards every param write (and the decay in it, and StableAdamW's RMS)
    with ``update_parameters``: exact equality of params across micro-steps, even in bf16+Kahan."""
    cls = ours(stem)
    model = make_model(dtype)
    opt = cls(model.parameters(), lr=1e-2, gradient_release=True, weight_decay=0.1,
              **{k: v for k, v in KWARGS.get(stem, {}).items() if k != "weight_decay"}, **EAGER)
    prepare_for_gradient_release(model, opt)
    params = list(model.parameters())
    moved_states = []

    def check(i, before):
        updating = (i + 1) % MICRO == 0
        same = [torch.equal(p, b) for p, b in zip(params, before)]
        # an updating step moves params (in bf16 a tiny update may all go into kahan_comp: any, not all)
        assert not all(same) if updating else all(same), \
            f"micro-step {i}: params {'did not move' if updating else 'moved'}"
        assert all(p.grad is None for p in params)
        if i == 1:
            first = {n: opt.state[params[0]][n].clone() for n in cls._info.states
                     if torch.is_tensor(opt.state[params[0]].get(n))}
            moved_states.append(first)
        if i == 2:
            moved_states.append({n: opt.state[params[0]][n].clone() for n in moved_states[0]})

    train_accumulating(model, opt, batches(2 * MICRO), check)
    assert moved_states[0], f"{stem}: no state to accumulate into"
    assert any(not torch.equal(moved_states[0][n], moved_states[1][n]) for n in moved_states[0]), \
        "a micro-step must still update the states"
    if cls._info.uses_step:
        assert int(opt.state[params[0]]["step"]) == 2 * MICRO
