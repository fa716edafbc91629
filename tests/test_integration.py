"""Generated optimizers in real training setups: LR schedulers, GradScaler with overflowing steps,
a torch.compile'd model, checkpoint resume (torch.save and torch.distributed.checkpoint), and the
runtime's edge cases (mixed dtypes in one group, grad=None, complex, sparse, non-finite grads).

Every comparison is differential: against the same optimizer run another way that must give the
same bits (equal), or against torch.optim / optimi where the algorithms coincide (tolerance given).
"""
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from optcompile import loader
from optimizers import BACKENDS, BY_STEM, STEMS

NAMES = [s for s in STEMS if not BY_STEM[s].param_ndims]  # models with biases: not Muon (tests/test_muon.py)
STEPS = 12


def opt_class(functional: str):
    module = loader.builtin_module(functional)
    return getattr(module, module._INFO.name)


def make(functional, params, *, foreach=False, lr=1e-2, **kw):
    """The optimizer with eager (foreach=False) or foreach code, never the fused C default."""
    return opt_class(functional)(params, lr=lr, **BACKENDS["foreach" if foreach else "eager"].flags, **kw)


def model_and_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    xs = torch.randn(STEPS, 32, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    ys = torch.tanh(xs @ w)
    return model, list(zip(xs, ys))


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, msg=""):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{msg} tensor {i}: max diff {(x - y).abs().max()}"


# ── LR schedulers ──────────────────────────────────────────────────────────────────────────────
def _train_with_schedule(functional, sched, foreach, manual_lrs=None):
    model, data = model_and_data()
    opt = make(functional, model.parameters(), foreach=foreach)
    if sched == "cosine":
        s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    else:  # the optimizers store beta1/beta2, not torch's `betas`, so momentum cycling is off
        s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=STEPS, cycle_momentum=False)
    lrs, losses = [], []
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
        losses.append(loss.item())
    return model, lrs, losses


@pytest.mark.parametrize("sched", ["cosine", "onecycle"])
@pytest.mark.parametrize("functional", NAMES)
def test_scheduler_drives_the_learning_rate(functional, sched):
    """The step reads group["lr"] each step: a scheduled run equals one where we set the same lr
    values by hand (bitwise), and a run with a different schedule differs. Rprop's lr only seeds
    its step sizes (as torch.optim.Rprop's): there the schedule must change nothing, bit for bit."""
    model, lrs, losses = _train_with_schedule(functional, sched, foreach=True)
    assert len(set(lrs)) > 3, "the scheduler did not change lr"
    assert all(math.isfinite(v) for v in losses)
    ref, data = model_and_data()
    opt = make(functional, ref.parameters(), foreach=False)
    for lr, (x, y) in zip(lrs, data):
        opt.zero_grad()
        loss_fn(ref, x, y).backward()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    # foreach vs eager under the same lr values: same math; ≤ a few ulps of op-order rounding
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    flat, data = model_and_data()
    scales = BY_STEM[functional].lr_scales_step  # else: a constant lr equal to the schedule's first
    opt = make(functional, flat.parameters(), foreach=True, **({} if scales else {"lr": lrs[0]}))
    for x, y in data:
        opt.zero_grad()
        loss_fn(flat, x, y).backward()
        opt.step()
    if scales:
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), flat.parameters()))
    else:
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), flat.parameters())), \
            "lr after the first step must not change the steps"


def test_onecycle_max_lr_is_fully_decoupled_decay_peak():
    """OneCycleLR writes group["max_lr"] (its peak), which is also optimi's fully-decoupled-decay
    key: decay per step is then weight_decay·lr_t/max_lr, i.e. weight_decay at the peak. With zero
    grads AdamW's update is 0, so each step multiplies the param by exactly (1 − wd·lr_t/max_lr)."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = make("adamw", [p], weight_decay=1e-2, decouple_lr=True, lr=1e-3)
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=6, cycle_momentum=False)
    assert opt.param_groups[0]["max_lr"] == 4e-3
    expect = torch.ones(5)
    for _ in range(6):
        lr = opt.param_groups[0]["lr"]
        p.grad = torch.zeros(5)
        opt.step()
        s.step()
        expect = expect * (1 - 1e-2 * lr / 4e-3)
        torch.testing.assert_close(p.detach(), expect, rtol=2e-7, atol=0)  # fp32 rounding of one mul


def test_onecycle_momentum_cycling_on_sgd():
    """SGD has a `momentum` key, so OneCycleLR may cycle it (it needs momentum > 0 from the start:
    the momentum buffer exists only when momentum != 0 at the first step)."""
    model, data = model_and_data()
    opt = make("sgd", model.parameters(), momentum=0.9)
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=STEPS)
    moms = []
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        s.step()
    assert len(set(moms)) > 3
    ref_model, _ = model_and_data()
    ref = torch.optim.SGD(ref_model.parameters(), lr=1e-2, momentum=0.9, foreach=False)
    s = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=5e-2, total_steps=STEPS)
    for x, y in data:
        ref.zero_grad()
        loss_fn(ref_model, x, y).backward()
        ref.step()
        s.step()
    # same algorithm as torch.optim.SGD (no dampening): equal up to op-order rounding
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ── GradScaler ─────────────────────────────────────────────────────────────────────────────────
INF_STEPS = {2, 5, 6}


def _scaler_run(make_opt, inject=True):
    model, data = model_and_data()
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    scales, unchanged = [], []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if inject and i in INF_STEPS:
            next(model.parameters()).grad[0, 0] = float("inf") if i != 5 else float("nan")
        before = params_of(model)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    return model, scales, unchanged, opt


@pytest.mark.parametrize("functional", NAMES)
def test_grad_scaler_skips_overflowing_steps(functional):
    """Overflowing steps are skipped exactly: params unchanged, the step count not advanced, the
    scale sequence identical to torch.optim.SGD's under the same overflows; and since power-of-two
    scaling is exact in fp32, the result equals an unscaled run that simply omits those batches."""
    model, scales, unchanged, opt = _scaler_run(lambda ps: make(functional, ps, foreach=True))
    assert [i for i, u in enumerate(unchanged) if u] == sorted(INF_STEPS)
    _, torch_scales, torch_unchanged, _ = _scaler_run(lambda ps: torch.optim.SGD(ps, lr=1e-2))
    assert scales == torch_scales and unchanged == torch_unchanged
    if "step" in opt.param_groups[0]:
        assert int(opt.param_groups[0]["step"]) == STEPS - len(INF_STEPS)
    ref, data = model_and_data()
    ref_opt = make(functional, ref.parameters(), foreach=True)
    for i, (x, y) in enumerate(data):
        if i in INF_STEPS:
            continue
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    assert_same(params_of(model), params_of(ref), "scaled vs unscaled")


def test_grad_scaler_matches_torch_sgd():
    """SGD with momentum is torch.optim.SGD's algorithm: same skipped steps, same params up to
    op-order rounding (rtol 1e-5 over 12 steps)."""
    model, scales, unchanged, _ = _scaler_run(lambda ps: make("sgd", ps, momentum=0.9, foreach=True))
    ref, ref_scales, ref_unchanged, _ = _scaler_run(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9))
    assert scales == ref_scales and unchanged == ref_unchanged
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ── torch.compile'd model ──────────────────────────────────────────────────────────────────────
def _compile_usable() -> str | None:
    try:
        f = torch.compile(lambda x: x * 2 + 1)
        f(torch.ones(3))
        return None
    except Exception as exc:  # no C++ compiler, unsupported platform
        return f"torch.compile is unusable here: {type(exc).__name__}: {exc}"[:200]


@pytest.mark.slow
@pytest.mark.parametrize("functional", ["adamw"])  # one: a cold Inductor compile costs ~40 s on 2 cores
def test_training_a_compiled_model(functional):
    reason = _compile_usable()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    model, data = model_and_data()
    compiled = torch.compile(model)
    opt = make(functional, model.parameters(), foreach=True)
    for x, y in data:
        opt.zero_grad()
        loss_fn(compiled, x, y).backward()
        opt.step()
    ref, _ = model_and_data()
    ref_opt = make(functional, ref.parameters(), foreach=True)
    for x, y in data:
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    # Inductor fuses the model's forward/backward differently: grads differ by float rounding,
    # which Adam-style normalisation amplifies a little over 12 steps
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ── checkpoint resume ──────────────────────────────────────────────────────────────────────────
def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("functional", NAMES)
def test_resume_from_torch_save_is_bit_exact(functional, tmp_path):
    model, data = model_and_data()
    opt = make(functional, model.parameters(), foreach=True)
    _train(model, opt, data)
    straight = params_of(model)

    model, data = model_and_data()
    opt = make(functional, model.parameters(), foreach=True)
    _train(model, opt, data[: STEPS // 2])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    del model, opt
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, _ = model_and_data(seed=1)  # different weights: everything must come from the checkpoint
    model.load_state_dict(ck["model"])
    opt = make(functional, model.parameters(), foreach=True, lr=0.5)  # lr too comes from the checkpoint
    opt.load_state_dict(ck["opt"])
    _train(model, opt, data[STEPS // 2:])
    assert_same(params_of(model), straight, "resumed vs straight")


@pytest.mark.parametrize("functional", ["adamw", "sgd"] + [n for n in ("stableadamw", "ranger") if n in NAMES])
def test_resume_from_distributed_checkpoint_is_bit_exact(functional, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model, data = model_and_data()
    opt = make(functional, model.parameters(), foreach=True, **BY_STEM[functional].stateful)
    _train(model, opt, data)
    straight = params_of(model)

    model, data = model_and_data()
    opt = make(functional, model.parameters(), foreach=True, **BY_STEM[functional].stateful)
    _train(model, opt, data[: STEPS // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving on a single rank"
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))
        model, _ = model_and_data(seed=1)
        opt = make(functional, model.parameters(), foreach=True, **BY_STEM[functional].stateful)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model, opt, data[STEPS // 2:])
    assert_same(params_of(model), straight, "dcp-resumed vs straight")


# ── runtime edge cases ─────────────────────────────────────────────────────────────────────────
def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("functional", ["adamw", "sgd", "adan"] if "adan" in NAMES else ["adamw", "sgd"])
def test_mixed_dtypes_in_one_group_equal_separate_optimizers(functional, foreach):
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.bfloat16]
    ps = [torch.nn.Parameter(_rand((3, 4), dt, i)) for i, dt in enumerate(dtypes)]
    solo = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = {"weight_decay": 1e-2, **BY_STEM[functional].stateful}
    opt = make(functional, ps, foreach=foreach, **kw)
    opts = [make(functional, [q], foreach=foreach, **kw) for q in solo]
    for step in range(3):
        for i, (p, q) in enumerate(zip(ps, solo)):
            p.grad = _rand((3, 4), p.dtype, 100 * step + i)
            q.grad = p.grad.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q, o in zip(ps, solo, opts):
        assert p.dtype == q.dtype
        assert torch.equal(p, q), p.dtype
        for k, v in opt.state[p].items():
            w = o.state[q][k]
            assert (v is None and w is None) or torch.equal(v, w), k
    assert all(opt.state[p]["kahan_comp"] is None for p in ps if p.dtype != torch.bfloat16)
    if functional != "adan":  # Adan defaults to kahan_sum=False, as optimi's does
        assert all(opt.state[p]["kahan_comp"] is not None for p in ps if p.dtype == torch.bfloat16)


@pytest.mark.parametrize("functional", NAMES)
def test_params_without_grad_are_skipped(functional):
    ps = [torch.nn.Parameter(_rand((4,), torch.float32, i)) for i in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = make(functional, ps)
    ref_opt = make(functional, [ref[0], ref[2]])
    for step in range(3):
        ps[0].grad, ps[2].grad = _rand((4,), torch.float32, 10 + step), _rand((4,), torch.float32, 20 + step)
        ps[1].grad = None
        ref[0].grad, ref[2].grad = ps[0].grad.clone(), ps[2].grad.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ps[1], ref[1]) and len(opt.state[ps[1]]) == 0
    assert torch.equal(ps[0], ref[0]) and torch.equal(ps[2], ref[2])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("functional", ["adamw", "sgd"])
def test_complex_params_are_optimized_as_real_views(functional, foreach):
    """Like torch.optim: a complex param steps exactly as its view_as_real would."""
    c = torch.nn.Parameter(torch.complex(_rand((3, 2), torch.float32, 0), _rand((3, 2), torch.float32, 1)))
    r = torch.nn.Parameter(torch.view_as_real(c.detach()).clone())
    kw = dict(BY_STEM[functional].stateful)
    opt, ref = make(functional, [c], foreach=foreach, **kw), make(functional, [r], foreach=foreach, **kw)
    for step in range(3):
        c.grad = torch.complex(_rand((3, 2), torch.float32, 5 + step), _rand((3, 2), torch.float32, 9 + step))
        r.grad = torch.view_as_real(c.grad).clone()
        opt.step()
        ref.step()
    assert torch.is_complex(c) and torch.equal(torch.view_as_real(c.detach()), r.detach())
    state = [v for v in opt.state[c].values() if torch.is_tensor(v) and v.shape == c.shape]
    assert state and all(torch.is_complex(v) for v in state)


def test_complex_params_match_torch_optim_sgd():
    c = torch.nn.Parameter(torch.complex(_rand((5,), torch.float32, 0), _rand((5,), torch.float32, 1)))
    t = torch.nn.Parameter(c.detach().clone())
    opt = make("sgd", [c], momentum=0.9, foreach=False)
    ref = torch.optim.SGD([t], lr=1e-2, momentum=0.9, foreach=False)
    for step in range(3):
        c.grad = torch.complex(_rand((5,), torch.float32, 5 + step), _rand((5,), torch.float32, 9 + step))
        t.grad = c.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(c, t, rtol=1e-6, atol=1e-7)  # same math, op order may differ


@pytest.mark.parametrize("functional", NAMES)
def test_sparse_grads_are_rejected(functional):
    p = torch.nn.Parameter(torch.ones(4, 2))
    opt = make(functional, [p])
    p.grad = torch.ones(4, 2)
    opt.step()  # state exists now: the check must still run on later steps
    p.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("functional", ["adamw", "sgd", "adam"])
def test_non_finite_grads_propagate_like_optimi(functional, foreach):
    """NaN/inf in one param's grad: no crash, the non-finite values land where optimi puts them,
    and every other param is exactly as if the bad one were absent."""
    import optimi
    kw = dict(BY_STEM[functional].stateful)
    ps = [torch.nn.Parameter(_rand((6,), torch.float32, i)) for i in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    clean = [torch.nn.Parameter(p.detach().clone()) for p in ps[1:]]
    opt = make(functional, ps, foreach=foreach, weight_decay=1e-2, **kw)
    oracle = getattr(optimi, opt_class(functional).__name__)(theirs, lr=1e-2, weight_decay=1e-2,
                                                             foreach=foreach, **kw)
    clean_opt = make(functional, clean, foreach=foreach, weight_decay=1e-2, **kw)
    for step in range(3):
        grads = [_rand((6,), torch.float32, 30 + 3 * step + i) for i in range(3)]
        if step == 1:
            grads[0][0], grads[0][3] = float("nan"), float("inf")
            grads[0][4] = float("-inf")
        for group, gs in ((ps, grads), (theirs, grads), (clean, grads[1:])):
            for p, g in zip(group, gs):
                p.grad = g.clone()
        opt.step()
        oracle.step()
        clean_opt.step()
    assert not torch.isfinite(ps[0]).all()
    for a, b in zip(ps, theirs):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        # finite entries: the oracle's algebra, up to op-order rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(ps[1], clean[0]) and torch.equal(ps[2], clean[1])


@pytest.mark.parametrize("foreach", [False, True, None])
def test_mixed_devices_in_one_group(foreach):
    """CPU and meta params in one group: each (device, dtype) group gets its own backend (with
    foreach=None the CPU groups may take the fused C kernel, which must never see meta tensors),
    and the CPU params step exactly as in a CPU-only optimizer with the same settings."""
    cls = opt_class("adamw")
    cpu = [torch.nn.Parameter(_rand((4,), torch.float32, 0)), torch.nn.Parameter(_rand((3,), torch.bfloat16, 1))]
    meta = torch.nn.Parameter(torch.empty(5, device="meta"))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in cpu]
    kw = {"foreach": foreach, "triton": False} if foreach is not None else {}
    opt = cls([cpu[0], meta, cpu[1]], lr=1e-2, **kw)  # the first param's device must not pick for all
    ref_opt = cls(ref, lr=1e-2, **kw)
    for step in range(2):
        for p, q in zip(cpu, ref):
            p.grad = _rand(p.shape, p.dtype, 7 + step)
            q.grad = p.grad.clone()
        meta.grad = torch.empty(5, device="meta")
        opt.step()
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(cpu, ref))
    assert opt.state[meta]["exp_avg"].device.type == "meta"


def test_example_transformer_trains_with_muon_adamw_and_schedule_free(monkeypatch, capsys):
    """examples/muon_adamw.py (the README's held-out losses) at toy length: every setup trains
    (it exits if a loss does not fall) and is scored."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import muon_adamw
    monkeypatch.setattr(sys, "argv", ["muon_adamw.py", "--steps", "8", "--lr", "1e-2"])
    muon_adamw.main()
    out = capsys.readouterr().out
    assert all(f"{name}: held-out loss" in out for name in muon_adamw.SETUPS), out


def test_training_quality_benchmark_tabulates_and_saves_curves(tmp_path):
    """benchmarks/train_quality.py (the README's quality table) at toy length."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_quality.py"
    spec = importlib.util.spec_from_file_location("train_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q.json"
    assert mod.main(["--steps", "4", "--runs", "fp32,bf16 + SR + 8-bit states", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fp32", "bf16 + SR + 8-bit states"}
    assert results["fp32"]["bytes_per_param"] == 12.0 and results["bf16 + SR + 8-bit states"]["bytes_per_param"] < 6
    assert all(len(r["losses"]) == 4 for r in results.values())
