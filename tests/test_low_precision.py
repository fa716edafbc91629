"""Low precision, for every spec: bf16 storage computed in fp32, and the Kahan pass measured.

* Kahan works: 200 small steps in bf16 with Kahan stay >= 10x closer to the fp32 run than without.
* Decay is compensated: optimi (and torch.optim) multiply bf16 params by ``1 - lr*wd`` as a separate
  bf16 op, which rounds back to the same value when ``lr*wd`` is small, so 2000 steps at lr 1e-3,
  wd 1e-2 with zero gradients decay by exactly 1.0 instead of 0.980. Our weight-decay pass puts
  the decay inside the update the Kahan pass compensates: bf16+Kahan decays like fp32.
* Against optimi in bf16, with and without Kahan, eager and foreach: optimi computes in bf16 (one
  rounding per op) and we compute in fp32 (one rounding per store), so the oracle check is loose;
  the tight check is against optimi run in fp32 with its params and states rounded to bf16 after
  every step, i.e. the storage our bf16 path has.
"""
import inspect

import pytest
import torch

import optimi
from optcompile import loader
from optimizers import BACKENDS, BY_STEM, STEMS, TORCH_BACKENDS, class_ndims, param_shapes, training_cases
RESULTS = {}  # printed at the end of the module (pytest -s) for the report


ours = loader.builtin_class


def ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16 unit in the last place of each element (8 significant bits)."""
    _, exp = torch.frexp(x.float().abs().clamp_min(2.0**-120))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)


@pytest.fixture(scope="module", autouse=True)
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of steps on tiny tensors: a second thread only adds sync cost
    yield
    torch.set_num_threads(threads)
    for key, value in sorted(RESULTS.items()):
        print(f"{key}: {value}")


def _label(stem, kw):
    """The report's name of a training configuration (SGD runs both decay styles)."""
    return stem + ("-decoupled" if kw.get("decouple_wd") and stem == "sgd" else "")


# ── Kahan summation, measured ────────────────────────────────────────────────────────────────
def _regress(cls, dtype, kahan, backend, steps=200, lr=1e-3, storage=torch.bfloat16, **kw):
    """Linear regression; the loss is computed in fp32 from each run's own params, so the runs
    differ only in how the optimizer stores params (the same bf16-representable start)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = x @ torch.randn(16, 8, generator=g)
    w = torch.randn(16, 8, generator=g).to(storage).to(dtype).requires_grad_()
    b = torch.randn(8, generator=g).to(storage).to(dtype)
    ndims = class_ndims(cls)
    stepped = [w, b.requires_grad_()] if not ndims or 1 in ndims else [w]  # Muon: the matrix only
    opt = cls(stepped, lr=lr, kahan_sum=kahan, **BACKENDS[backend].flags, **kw)
    for _ in range(steps):
        ((x @ w.float() + b.float() - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([w.detach().float().flatten(), b.detach().float()])


# Ranger's lookahead copies its slow weights (la_param, stored in bf16 like every optimi state)
# into p every k steps, so their rounding error replaces p's compensated value: measured 1.4x.
# Compensating the slow weights too needs a second buffer (or fp32 slow weights); optimi has the
# same limitation. Without the lookahead (k huge) Ranger's compensated RAdam step is checked.
LOOKAHEAD_XFAIL = pytest.mark.xfail(reason="Ranger's bf16 slow weights are not Kahan-compensated", strict=True)
KAHAN_CASES = [pytest.param(*c.values, marks=LOOKAHEAD_XFAIL if c.values[0] == "ranger" else (), id=c.id)
               for c in training_cases()]
KAHAN_CASES += [pytest.param(*c.values[:1], {**c.values[1], "k": 10**9}, id=f"{c.id}-no-lookahead")
                for c in training_cases("ranger")]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("stem, kw", KAHAN_CASES)
def test_kahan_tracks_fp32(stem, kw, backend):
    cls, kw = ours(stem), {**kw, **BY_STEM[stem].kahan}  # where lr 1e-3 makes steps above an ulp: the entry
    fp32 = _regress(cls, torch.float32, False, backend, **kw)
    kahan = _regress(cls, torch.bfloat16, True, backend, **kw)
    plain = _regress(cls, torch.bfloat16, False, backend, **kw)
    moved = (fp32 - _regress(cls, torch.float32, False, backend, steps=0)).norm().item()
    err_kahan, err_plain = (kahan - fp32).norm().item(), (plain - fp32).norm().item()
    ratio = err_plain / err_kahan
    name = _label(stem, kw) + ("" if "k" not in kw else "-no-lookahead")
    RESULTS[f"kahan ratio {name:20s} {backend:8s}"] = (f"{ratio:6.1f}x  (|bf16+kahan - fp32| {err_kahan:.4f}, "
                                                     f"|bf16 - fp32| {err_plain:.4f}, fp32 moved {moved:.3f})")
    assert moved > 0.1, "the fp32 run must move for the comparison to mean something"
    assert ratio >= 10, f"{stem}: bf16+Kahan only {ratio:.1f}x closer to fp32 than plain bf16"


@pytest.mark.parametrize("stem, kw", training_cases("adamw", "sgd"))
def test_kahan_tracks_fp32_in_fp16(stem, kw):
    """fp16 has 3 more mantissa bits than bf16: lr 1e-4 puts the updates below half an fp16 ulp."""
    cls, kw = ours(stem), {**kw, "lr": 1e-4, "storage": torch.float16}
    fp32 = _regress(cls, torch.float32, False, "eager", **kw)
    kahan = _regress(cls, torch.float16, True, "eager", **kw)
    plain = _regress(cls, torch.float16, False, "eager", **kw)
    ratio = (plain - fp32).norm().item() / (kahan - fp32).norm().item()
    RESULTS[f"kahan ratio {_label(stem, kw) + '-fp16':20s} eager   "] = f"{ratio:6.1f}x"
    assert ratio >= 10


# ── decay inside the compensated update ──────────────────────────────────────────────────────
def _decay_modes():
    """(stem, mode, kwargs) for every spec with decoupled or fully decoupled weight decay."""
    out = []
    for stem in STEMS:
        params = inspect.signature(ours(stem)).parameters
        if "weight_decay" not in params or BY_STEM[stem].schedule_free:
            continue  # Schedule-Free: an L2 penalty at y, reaching the params through z and the average
        # L2 specs: their decoupled mode (NAdam names it torch's way)
        switch = next(({k: True} for k in ("decouple_wd", "decoupled_weight_decay") if k in params), {})
        out.append((stem, "decoupled", {"weight_decay": 1e-2, **switch}))
        if "decouple_lr" in params:  # lr/max_lr * wd = 1e-5 per step, as in the decoupled case
            out.append((stem, "fully decoupled", {"weight_decay": 1e-5, "decouple_lr": True, "max_lr": 1e-3}))
    # Ranger: no lookahead, which would halve the fp32 decay and round it away in bf16 slow weights
    return [(stem, mode, {**kw, "k": 10**9} if stem == "ranger" else kw) for stem, mode, kw in out]


@pytest.mark.parametrize("stem, mode, kw", _decay_modes(), ids=lambda v: v if isinstance(v, str) else "")
def test_decay_is_compensated(stem, mode, kw):
    """2000 steps, lr 1e-3, decay 1e-5 per step, zero gradients: fp32 decays by 0.980; bf16 without
    Kahan not at all (each step's 1e-5 relative change is below half a bf16 ulp, 2**-9); bf16 with
    Kahan within 1% of fp32. One optimizer, three param groups, so one step() runs all three."""
    g = torch.Generator().manual_seed(0)
    shape = (12, 8) if BY_STEM[stem].param_ndims == (2,) else (96,)  # Muon: a matrix of as many elements
    start = (torch.rand(shape, generator=g) * 1.5 + 0.5).bfloat16()  # in [0.5, 2): no subnormals
    kahan, plain, fp32 = start.clone(), start.clone(), start.float()
    for p in (kahan, plain, fp32):
        p.grad = torch.zeros_like(p)
    opt = ours(stem)([{"params": [kahan], "kahan_sum": True}, {"params": [plain], "kahan_sum": False},
                      {"params": [fp32]}], lr=1e-3, **kw, **BACKENDS["eager"].flags)
    for _ in range(2000):
        opt.step()
    factor = {name: (p.float() / start.float()) for name, p in (("kahan", kahan), ("plain", plain), ("fp32", fp32))}
    RESULTS[f"decay factor {stem:12s} {mode:16s}"] = "  ".join(
        f"{k} {v.mean().item():.5f}" for k, v in factor.items())
    assert abs(factor["fp32"].mean().item() - 0.9802) < 1e-3  # (1 - 1e-5)**2000 = 0.98020
    assert torch.equal(factor["plain"], torch.ones_like(factor["plain"]))
    torch.testing.assert_close(factor["kahan"], factor["fp32"], rtol=0.01, atol=0)
    # stricter: the mean decay itself (1 - factor, ~0.02) within 5% (each bf16 param is off by up
    # to half an ulp, 2**-9 relative, ~10% of the decay; the mean over 96 params averages that out)
    decayed = {k: 1 - v.mean().item() for k, v in factor.items()}
    assert abs(decayed["kahan"] - decayed["fp32"]) <= 0.05 * decayed["fp32"]


def test_optimi_loses_bf16_decay():
    """The oracle's behaviour that the test above improves on (optimi 0.3.3, bf16 + Kahan)."""
    start = (torch.rand(64, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5).bfloat16()
    p = start.clone()
    p.grad = torch.zeros_like(p)
    opt = optimi.AdamW([p], lr=1e-3, weight_decay=1e-2, kahan_sum=True, foreach=False, triton=False)
    for _ in range(2000):
        opt.step()
    assert torch.equal(p, start)


# ── against optimi, and against fp32 compute with bf16 storage ──────────────────────────────
STEPS = 20
SHAPES = [(33, 7), (5,), (128,)]


def _run(cls, dtype, kahan, steps, *, round_to_bf16=None, **kw):
    """``steps`` steps on fixed bf16-representable params and grads. ``round_to_bf16`` rounds the
    states (and, if "params", the params) to bf16 after every step: fp32 compute, bf16 storage.
    Returns (params, optimizer, per-element sum of |Δp| over the steps)."""
    g = torch.Generator().manual_seed(0)
    shapes = param_shapes(class_ndims(cls), SHAPES)
    params = [torch.randn(s, generator=g).bfloat16().to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).bfloat16().to(dtype) for s in shapes] for _ in range(steps)]
    opt = cls(params, lr=1e-3, kahan_sum=kahan, **kw)
    travel = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for step_grads in grads:
        before = [p.detach().float().clone() for p in params]
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()  # optimi's Kahan path clobbers p.grad
        opt.step()
        for p, b, t in zip(params, before, travel):
            t += (p.float() - b).abs()
            if round_to_bf16:
                for v in opt.state[p].values():
                    if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                        v.copy_(v.bfloat16())
                if round_to_bf16 == "params":
                    p.copy_(p.bfloat16())
    return params, opt, travel


@pytest.mark.parametrize("kahan", [False, True], ids=["plain", "kahan"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("stem, kw", training_cases())
def test_bf16_matches_optimi(stem, kw, backend, kahan):
    cls, ocls = ours(stem), BY_STEM[stem].optimi_cls
    if ocls is None:
        pytest.skip(f"optimi has no {cls.__name__}")
    mine, my_opt, _ = _run(cls, torch.bfloat16, kahan, STEPS, **kw, **BACKENDS[backend].flags)
    # optimi's for-loop Ranger lookahead under Kahan scales the saved error by alpha (optimi bug 3);
    # its foreach path saves it with factor 1, as we do
    oracle_foreach = backend == "foreach" or (stem == "ranger" and kahan)
    theirs, _, _ = _run(ocls, torch.bfloat16, kahan, STEPS, **kw, foreach=oracle_foreach, triton=False)
    ref, _, travel = _run(ocls, torch.float32, False, STEPS, **kw, foreach=False, triton=False,
                          round_to_bf16="states" if kahan else "params")
    worst_oracle = worst_ref = 0.0
    for p, o, r, t in zip(mine, theirs, ref, travel):
        # tight: fp32 compute, bf16 storage. The reference rounds states after the step, we round
        # them at the store, before the update reads them (m and v: 2**-9 each, relative): 2**-7 of
        # each step's |Δp|. Plus, without Kahan, 4 ulps: p is rounded every step, and a rounding
        # whose exact value lies within that 2**-7 of a boundary can go the other way (1 ulp each,
        # seen up to 2 in 20 steps). With Kahan p + kahan_comp carries the fp32 value (2**-8 ulp),
        # except Ranger, whose lookahead copies the bf16 slow weights into p (as plain).
        value = p.float() + my_opt.state[p]["kahan_comp"].float() if kahan else p.float()
        unit = ulp(torch.maximum(value.abs(), r.abs()))  # no factor 2 at a binade boundary
        bound = 2.0**-7 * t + (2.0**-8 if kahan and stem != "ranger" else 4.0) * unit
        worst_ref = max(worst_ref, ((value - r).abs() / bound).max().item())
        # loose: optimi rounds every op to bf16 (~3-6 roundings per step of states and update, each
        # 2**-9 relative, compounding through the momenta): 2**-3 relative of the distance
        # travelled, plus 4 ulps of param roundings that went the other way
        bound = 2.0**-3 * t + 4 * ulp(torch.maximum(p.float().abs(), o.float().abs()))
        worst_oracle = max(worst_oracle, ((p.float() - o.float()).abs() / bound).max().item())
    RESULTS[f"bf16 vs optimi {_label(stem, kw):12s} {backend:8s} {'kahan' if kahan else 'plain'}"] = (
        f"worst |Δ|/bound: fp32-compute ref {worst_ref:.3f}, optimi bf16 {worst_oracle:.3f}")
    assert worst_ref <= 1, f"{stem}: {worst_ref:.2f}x the bound against fp32 compute with bf16 storage"
    assert worst_oracle <= 1, f"{stem}: {worst_oracle:.2f}x the bound against optimi's bf16 compute"
