"""Optimizer accumulation (gradient release + ``optimizer_accumulation``): every spec, against
optimi (the oracle), and the ``update_parameters`` guard: micro-steps move states, never params."""
import pytest
import torch

import optimi
from optcompile import loader, prepare_for_gradient_release
from optimizers import BY_STEM, EAGER, ORACLE_EAGER, batches, make_model, mse_backward, training_cases

MICRO = 4


pytestmark = pytest.mark.usefixtures("one_thread")


ours = loader.builtin_class


def train_accumulating(model, opt, data, on_micro_step=None):
    """``len(data) / MICRO`` optimizer steps, each accumulating MICRO micro-batches into the states."""
    for i, (x, y) in enumerate(data):
        opt.optimizer_accumulation = (i + 1) % MICRO != 0  # the last micro-batch updates the params
        before = [p.detach().clone() for p in model.parameters()]
        mse_backward(model, x, y)
        if on_micro_step:
            on_micro_step(i, before)
    return model


@pytest.mark.parametrize("stem, kw", training_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulation_matches_optimi(stem, kw, dtype):
    """3 optimizer steps of 4 micro-batches = 12 micro-steps (Ranger's lookahead, k=6, fires at
    t=12 on the updating micro-step; RAdam rectifies from t=6). fp32: rtol 1e-5 / atol 1e-6
    (same math; only host-scalar op order differs). bf16 with Kahan: we compute in fp32, optimi in
    bf16 with one rounding per op; within 2 bf16 ulps (2**-7 relative) plus 2e-3 absolute."""
    cls, ocls = ours(stem), BY_STEM[stem].optimi_cls
    if ocls is None:
        pytest.skip(f"optimi has no {cls.__name__}")
    if stem == "sgd" and not kw.get("momentum"):
        pytest.skip("SGD without momentum has nothing to accumulate")
    lr, kahan = (1e-2, {}) if dtype == torch.float32 else (1e-3, {"kahan_sum": True})
    data = batches(3 * MICRO)
    a, b = make_model(dtype), make_model(dtype)
    opt_a = cls(a.parameters(), lr=lr, gradient_release=True, **kahan, **kw, **EAGER)
    opt_b = ocls(b.parameters(), lr=lr, gradient_release=True, **kahan, **kw, **ORACLE_EAGER)
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


@pytest.mark.parametrize("stem, kw", training_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_steps_update_states_not_params(stem, kw, dtype):
    """The accumulation pass guards every param write (and the decay in it, and StableAdamW's RMS)
    with ``update_parameters``: exact equality of params across micro-steps, even in bf16+Kahan."""
    cls = ours(stem)
    model = make_model(dtype, ndims=BY_STEM[stem].param_ndims)
    decay = {"weight_decay": 0.1} if BY_STEM[stem].weight_decay else {}  # (Rprop has none)
    opt = cls(model.parameters(), lr=1e-2, gradient_release=True, **decay,
              **{k: v for k, v in kw.items() if k != "weight_decay"}, **EAGER)
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
    moved = any(not torch.equal(moved_states[0][n], moved_states[1][n]) for n in moved_states[0])
    assert moved == BY_STEM[stem].grad_states, \
        "a micro-step must still update the states" if BY_STEM[stem].grad_states else "micro-step moved a param state"
    if cls._info.uses_step:
        assert int(opt.state[params[0]]["step"]) == 2 * MICRO
