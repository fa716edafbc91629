"""Differential tests: every optimizer × backend × option set against torch-optimi 0.3.3, the
oracle, with identical arguments; against torch.optim where the algorithm coincides; against
plain-torch references (tests/reference/) where optimi is buggy (docs/differences.md).

Tolerances. fp32 eager and foreach are **bit-exact** with optimi's matching path: the generated
code performs the same torch ops in the same order (``lerp_``, ``addcmul_``, ``addcdiv_``, host
scalars in Python doubles), so params, every state tensor and the step counter are compared with
``torch.equal``. Against torch.optim the algebra differs (bias correction by division instead of
debiased betas; ``lerp`` instead of multiply-add), so ~1 ulp per op accumulates over the steps:
``rtol=2e-5, atol=2e-6`` in fp32 after 25 steps. Low-precision references: one bf16/fp16 ulp.
"""
import warnings

import optimi
import pytest
import torch

import optcompile
from optcompile import runtime
from optimizers import BACKENDS, BY_NAME, OPTIMIZERS, TORCH_BACKENDS
from reference.ranger import ranger_step
from reference.stableadamw import stableadamw_step

pytestmark = pytest.mark.filterwarnings("ignore:You are using weight_decay")  # optimi's decouple_lr advice
STEPS = 20
OURS = {b: BACKENDS[b].flags for b in TORCH_BACKENDS}
THEIRS = {b: BACKENDS[b].oracle_flags for b in TORCH_BACKENDS}
# option sets per optimizer (lr is added by the test): tests/optimizers.py, OptimizerInfo.differential
CASES = {info.name: [dict(c) for c in info.differential] for info in OPTIMIZERS
         if info.optimi_cls is not None}  # torch.optim's classes: tests/test_torch_family.py
LR = {info.name: info.lr for info in OPTIMIZERS}


def make_params(dtype=torch.float32):
    """A small MLP (16×8, 16, 4×16, 4) and odd shapes: 0-d, 1 element, 129 elements (not a
    multiple of any block size) and a non-contiguous (transposed) matrix."""
    g = torch.Generator().manual_seed(0)
    mlp = [torch.randn(16, 8, generator=g) * 0.3, torch.randn(16, generator=g) * 0.1,
           torch.randn(4, 16, generator=g) * 0.3, torch.randn(4, generator=g) * 0.1]
    odd = [torch.randn((), generator=g), torch.randn(1, generator=g), torch.randn(129, generator=g) * 0.5,
           torch.randn(5, 6, generator=g).t()]
    assert not odd[-1].is_contiguous()
    return [p.to(dtype).requires_grad_() for p in mlp], [p.to(dtype).requires_grad_() for p in odd]


def loss_fn(mlp, odd, i):
    """Data-dependent gradients for every param, growing with ``i`` so StableAdamW's RMS clip engages."""
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
    w1, b1, w2, b2 = (p.float() for p in mlp)
    out = torch.tanh(x @ w1.t() + b1) @ w2.t() + b2
    loss = ((out - y) ** 2).mean()
    for j, p in enumerate(odd):
        p = p.float()
        loss = loss + (0.5 + j) * (p * p).sum() + torch.sin(3 * p).sum() * 0.3
    return loss * 1.1**i


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def train(make_opt, mlp, odd, steps=STEPS, on_step=None):
    opt = make_opt(mlp, odd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.95**s)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(mlp, odd, i).backward()
        if on_step:
            on_step(i, mlp, odd)
        opt.step()
        sched.step()
    return opt


def groups(mlp, odd, lr, case, max_lr_per_group=False):
    """Two groups with different hyperparameters: the odd shapes run at half the lr and twice the decay."""
    second = {"params": odd, "lr": lr * 0.5}
    if case.get("weight_decay"):
        second["weight_decay"] = case["weight_decay"] * 2
    first = {"params": mlp}
    if max_lr_per_group:  # optcompile's meaning of decouple_lr without max_lr: each group's own lr
        first["max_lr"], second["max_lr"] = lr, lr * 0.5
    return [first, second]


def assert_same_state(ours, theirs, exact=True):
    for po, pt in zip([p for g in ours.param_groups for p in g["params"]],
                      [p for g in theirs.param_groups for p in g["params"]]):
        so, st = ours.state[po], theirs.state[pt]
        assert set(so) == set(st), (sorted(so), sorted(st))
        for k, v in st.items():
            if torch.is_tensor(v):
                assert so[k].dtype == v.dtype and so[k].shape == v.shape, k
                assert torch.equal(so[k], v) if exact else torch.allclose(so[k], v), f"state {k!r} differs"
            else:
                assert so[k] is None and v is None, k
    for go, gt in zip(ours.param_groups, theirs.param_groups):
        if "step" in gt:
            assert torch.equal(go["step"], gt["step"]) and go["step"].dtype == torch.int32


def compare(name, case, backend):
    lr = LR.get(name, 1e-2)
    mlp, odd = make_params()
    mlp2, odd2 = clone(mlp), clone(odd)
    per_group = case.get("decouple_lr") and case.get("max_lr") is None
    ours = train(lambda m, o: getattr(optcompile, name)(groups(m, o, lr, case), lr=lr, **case, **OURS[backend]),
                 mlp, odd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimi's foreach DeprecationWarning
        theirs = train(lambda m, o: getattr(optimi, name)(groups(m, o, lr, case, per_group), lr=lr, **case,
                                                          **THEIRS[backend]), mlp2, odd2)
    for a, b in zip(mlp + odd, mlp2 + odd2):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max().item():.3g}"
        assert a.stride() == b.stride()
    assert_same_state(ours, theirs)
    return mlp, odd


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("name,case", [(n, c) for n, cs in CASES.items() for c in cs],
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items()) or 'defaults'}"
                              for n, cs in CASES.items() for c in cs])
def test_matches_optimi_bit_exactly(name, case, backend):
    """fp32, 25 steps, two groups, LambdaLR: params, states and step identical to optimi's."""
    compare(name, case, backend)


# ── where optimi 0.3.3 is buggy: correct behaviour, checked against a reference ────────────────
@pytest.mark.parametrize("backend", OURS)
def test_adan_adam_wd_matches_functional_optimi(backend):
    """optimi bug 1: ``Adan(adam_wd=True)`` is ignored by optimi's class; its functional form is
    right, so the reference is ``optimi.adan(..., adam_wd=True)`` on the same tensors."""
    mlp, odd = make_params()
    params = mlp + odd
    ref = clone(params)
    opt = optcompile.Adan(params, lr=1e-2, weight_decay=0.05, adam_wd=True, **OURS[backend])
    assert opt.param_groups[0]["adam_wd"] is True
    state = {k: [] for k in ("m", "n", "v", "prev")}
    step = torch.tensor(0, dtype=torch.int32)
    for i in range(STEPS):
        opt.zero_grad()
        for p in ref:
            p.grad = None
        loss_fn(mlp, odd, i).backward()
        loss_fn(ref[:4], ref[4:], i).backward()
        opt.step()
        grads = [p.grad for p in ref]
        if i == 0:
            state = {"m": [torch.zeros_like(p) for p in ref], "n": [torch.zeros_like(p) for p in ref],
                     "v": [torch.zeros_like(p) for p in ref], "prev": [-g.clone() for g in grads]}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            optimi.adan([p.data for p in ref], grads, state["m"], state["n"], state["v"], state["prev"], lr=1e-2,
                        beta1=0.98, beta2=0.92, beta3=0.99, weight_decay=0.05, eps=1e-6, step=step, adam_wd=True,
                        foreach=backend == "foreach")
    for a, b in zip(params, ref):
        assert torch.equal(a, b)
    # and it is not the proximal decay optimi's class silently applies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp3, odd3 = make_params()
        train(lambda m, o: optimi.Adan(m + o, lr=1e-2, weight_decay=0.05, adam_wd=True, foreach=False, triton=False),
              mlp3, odd3)
    assert not all(torch.equal(a, b) for a, b in zip(params, mlp3 + odd3))


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD", "StableAdamW"])
def test_max_lr_defaults_to_each_groups_lr(name):
    """optimi bug 8: with ``decouple_lr`` and no ``max_lr`` optimi divides every group's decay by
    the *constructor's* lr. We use each group's own lr, i.e. optimi given ``max_lr=group lr``."""
    case = dict(weight_decay=1e-3, decouple_lr=True)
    compare(name, case, "eager")  # compare() passes optimi explicit per-group max_lr
    mlp, odd = make_params()
    lr = LR.get(name, 1e-2)
    with pytest.warns(UserWarning, match="potentially high"):
        opt = getattr(optcompile, name)(groups(mlp, odd, lr, case), lr=lr, **case, **OURS["eager"])
    assert [g["max_lr"] for g in opt.param_groups] == [lr, lr * 0.5]


@pytest.mark.parametrize("name", ["Adam", "Adan", "RAdam", "Ranger", "StableAdamW"])
def test_group_without_grads_keeps_its_step(name):
    """optimi bug 9: optimi advances a group's step (its bias correction) even when none of its
    params has a gradient. Here it does not: a group that first gets grads at step 6 starts at t=1,
    exactly like a fresh optimi optimizer that only ever saw those steps."""
    lr = 1e-2
    mlp, odd = make_params()
    late = clone(odd)

    def detach_late(i, m, o):
        if i < 5:
            for p in o:
                p.grad = None

    ours = train(lambda m, o: getattr(optcompile, name)([{"params": m}, {"params": o}], lr=lr, **OURS["eager"]),
                 mlp, odd, on_step=detach_late)
    assert int(ours.param_groups[1]["step"]) == STEPS - 5
    ref = getattr(optimi, name)(late, lr=lr, foreach=False, triton=False)
    for i in range(5, STEPS):
        ref.param_groups[0]["lr"] = lr * 0.95**i  # the late group's place in the LambdaLR schedule
        ref.zero_grad()
        loss_fn(make_params()[0], late, i).backward()
        ref.step()
    for a, b in zip(odd, late):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", OURS)
def test_stableadamw_fp16_eps_sq_does_not_underflow(backend):
    """optimi bug 7: in fp16 optimi's ``eps_sq`` tensor is 0, so a tiny second moment (which
    underflows to 0 in fp16) divides by zero and the RMS is inf/nan. The math uses eps² in fp32;
    the ``eps_sq`` state keeps optimi's layout. Reference: tests/reference/stableadamw.py."""
    g = torch.Generator().manual_seed(3)
    p = (torch.randn(300, generator=g) * 0.1).half()
    ours, ref = p.clone().requires_grad_(), p.clone()
    theirs = p.clone().requires_grad_()
    opt = optcompile.StableAdamW([ours], lr=1e-2, kahan_sum=False, **OURS[backend])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = optimi.StableAdamW([theirs], lr=1e-2, kahan_sum=False, **THEIRS[backend])
    state = {"m": torch.zeros_like(ref), "v": torch.zeros_like(ref)}
    for i in range(1, 8):
        grad = (torch.randn(300, generator=g) * (1e-7 if i % 2 else 1e-2)).half()  # g² ≪ fp16 min: v = 0
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        bad.step()
        stableadamw_step(ref, grad, state, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=1e-2, t=i)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[ours]["exp_avg"], state["m"], rtol=0, atol=0)
    es = opt.state[ours]["eps_sq"]
    assert es.shape == () and es.dtype == torch.float16 and es.item() == 0.0  # optimi's (underflowed) layout
    assert not torch.equal(ours, theirs)  # optimi froze or NaN'd on the underflow steps


def _ranger_bf16_rms_error(make_opt, kahan_sum=True):
    """RMS distance of the exact bf16 trajectory (param + kahan_comp) from fp64 Ranger, 30 steps, k=3."""
    kw = dict(lr=3e-3, eps=1e-6, weight_decay=1e-2, k=3, alpha=0.5)
    g = torch.Generator().manual_seed(5)
    p64 = torch.randn(2000, generator=g, dtype=torch.float64)
    p = p64.bfloat16().requires_grad_()
    opt = make_opt([p], kahan_sum=kahan_sum, **kw)
    ref, st = p64.clone(), {"m": torch.zeros_like(p64), "v": torch.zeros_like(p64), "slow": p64.clone()}
    gg = torch.Generator().manual_seed(6)
    for t in range(1, 31):
        p.grad = torch.randn(2000, generator=gg, dtype=torch.float64).bfloat16()
        grad = p.grad.double()
        opt.step()
        ref = ranger_step(ref, grad, st, t=t, beta1=0.9, beta2=0.99, **kw)
    comp = opt.state[p]["kahan_comp"]
    exact = p.double() + (comp.double() if comp is not None else 0)
    return (exact - ref).pow(2).mean().sqrt().item(), (p.detach(), comp, opt.state[p]["la_param"])


def test_ranger_bf16_kahan_lookahead_tracks_fp64_reference():
    """optimi bug 3: its for-loop and foreach paths compensate the bf16 lookahead differently.
    Ours is one definition on every backend (eager == foreach bit for bit): the lookahead reads the
    exact param (param + kahan_comp) and ``p ← slow`` keeps slow's unrounded value in kahan_comp.
    Against an fp64 Ranger (tests/reference/ranger.py), Kahan must help, and be as accurate as
    optimi's better path (bf16 moments dominate the remaining error: ~0.3 bf16 ulp RMS)."""
    errs, outs = {}, {}
    for be in OURS:
        errs[be], outs[be] = _ranger_bf16_rms_error(lambda p, **kw: optcompile.Ranger(p, **kw, **OURS[be]))
    assert all(torch.equal(a, b) for a, b in zip(outs["eager"], outs["foreach"]))
    plain, _ = _ranger_bf16_rms_error(lambda p, **kw: optcompile.Ranger(p, **kw, **OURS["eager"]), kahan_sum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [_ranger_bf16_rms_error(lambda p, **kw: optimi.Ranger(p, **kw, **THEIRS[be]))[0] for be in THEIRS]
    assert errs["eager"] < 0.85 * plain, (errs, plain)
    assert errs["eager"] < 1.1 * min(theirs), (errs, theirs)


# ── torch.optim, where the algorithm coincides (translated arguments) ────────────────────────────
TORCH = [(info.name, dict(t.ours), t.torch_cls, dict(t.theirs)) for info in OPTIMIZERS for t in info.torch_optim]


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("name,ours,ref,theirs", TORCH, ids=[f"{t[0]}-{i}" for i, t in enumerate(TORCH)])
def test_matches_torch_optim(name, ours, ref, theirs, backend):
    """Params only (optimi's debiased state differs from torch's by design); rtol=2e-5, atol=2e-6."""
    mlp, odd = make_params()
    mlp2, odd2 = clone(mlp), clone(odd)
    train(lambda m, o: getattr(optcompile, name)(m + o, **ours, **OURS[backend]), mlp, odd)
    train(lambda m, o: ref(m + o, **theirs, foreach=backend == "foreach"), mlp2, odd2)
    for a, b in zip(mlp + odd, mlp2 + odd2):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ── functional forms and accumulation ───────────────────────────────────────────────────────────
@pytest.mark.parametrize("k", [2, 3])
def test_ranger_lookahead_only_on_updating_steps(k):
    """optimizer accumulation (gradient release): micro-steps update moments but never run the
    lookahead, even when ``t % k == 0`` falls on one; identical to optimi's functional form."""
    g = torch.Generator().manual_seed(9)
    p = torch.randn(40, generator=g)
    ps = [p.clone(), p.clone()]
    states = [[torch.zeros_like(p), torch.zeros_like(p), p.clone()] for _ in ps]
    steps = [torch.tensor(0, dtype=torch.int32) for _ in ps]
    for i in range(12):
        grad = torch.randn(40, generator=g)
        for j, lib in enumerate((optcompile, optimi)):
            extra = {"fused": False} if lib is optcompile else {}
            lib.ranger(ps[j], grad.clone(), *states[j], None, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0,
                       eps=1e-6, k=k, alpha=0.5, step=steps[j], decouple_wd=True, gradient_release=True,
                       optimizer_accumulation=i % 4 != 3, **extra)
        assert torch.equal(ps[0], ps[1]) and torch.equal(states[0][2], states[1][2]), i
    assert not torch.equal(states[0][2], p)  # the lookahead did run (on updating steps t = 4, 8, 12)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("name", list(CASES))
def test_functional_form_matches_optimi(name, backend):
    """``optcompile.<fn>(params, grads, *states, kahan_comps, **group values)`` on the same tensors
    as ``optimi.<fn>``: identical after 8 steps (state allocated by one class step in each library)."""
    import inspect
    fn = name.lower()
    lr = LR.get(name, 1e-2)
    kw = {"weight_decay": 0.01, **BY_NAME[name].stateful}
    libs = {}
    for lib in (optcompile, optimi):
        ps = [p.detach().clone().requires_grad_() for p in make_params()[1]]
        extra = OURS[backend] if lib is optcompile else THEIRS[backend]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = getattr(lib, name)(ps, lr=lr, **kw, **extra)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        libs[lib] = (ps, opt)
    (ours, o_opt), (theirs, t_opt) = libs[optcompile], libs[optimi]
    sig = inspect.signature(getattr(optimi, fn)).parameters
    positional = [n for n, p in sig.items() if p.kind is p.POSITIONAL_OR_KEYWORD][2:-1]  # state lists
    runtime = {"kahan_sum", "foreach", "triton", "gradient_release", "step"}
    keys = [n for n, p in sig.items() if p.kind is p.KEYWORD_ONLY and n in t_opt.param_groups[0] and n not in runtime]
    for i in range(8):
        g = torch.Generator().manual_seed(i)
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for lib, ps, opt in ((optcompile, ours, o_opt), (optimi, theirs, t_opt)):
            group = opt.param_groups[0]
            states = [[opt.state[p][n[:-1]] for p in ps] for n in positional]
            extra = {"step": group["step"]} if "step" in sig else {}
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                getattr(lib, fn)([p.data for p in ps], [x.clone() for x in grads], *states,
                                 [opt.state[p]["kahan_comp"] for p in ps], **{k: group[k] for k in keys}, **extra,
                                 foreach=backend == "foreach")
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


# ── CPU pieces: eager/foreach on CPU run elementwise algorithms in slices and batches ───────────
@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_slices_and_batches_change_nothing(name, backend, monkeypatch):
    """runtime._run_in_cpu_pieces with 7-element slices and 50-element foreach batches: still bit-exact
    with optimi (StableAdamW's per-tensor RMS keeps whole tensors)."""
    monkeypatch.setattr(runtime, "CPU_CHUNK", 7)
    monkeypatch.setattr(runtime, "CPU_FOREACH_BATCH", 50)
    compare(name, CASES[name][1] if len(CASES[name]) > 1 else {}, backend)


@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_slices_change_nothing_in_bf16(name, backend, monkeypatch):
    """bf16 with Kahan: sliced and whole-tensor steps give identical params and states."""
    runs = []
    for chunk in (7, runtime.CPU_CHUNK):
        monkeypatch.setattr(runtime, "CPU_CHUNK", chunk)
        mlp, odd = make_params(torch.bfloat16)
        opt = train(lambda m, o: getattr(optcompile, name)(m + o, lr=LR.get(name, 1e-2), kahan_sum=True,
                                                           **OURS[backend]), mlp, odd, steps=5)
        runs.append((mlp + odd, opt))
    (p1, o1), (p2, o2) = runs
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    assert_same_state(o1, o2)
