"""The classes that are torch.optim's (Adadelta, Adafactor, Adagrad, Adamax, ASGD, NAdam, RMSprop, Rprop) against
torch.optim 2.13 itself, and ``maximize`` on every built-in.

Differential: every option combination of the registry (``OptimizerInfo.torch_family``) × backend,
fp32, 20 steps, two param groups, a StepLR schedule. Tolerances: eager and foreach are
**bit-exact** with torch's for-loop and foreach paths (params and every state) where the registry's
``torch_exact`` says so (all but Adafactor, ASGD and NAdam: see the registry); the fused C and
Triton kernels evaluate the same math in fp32 with other roundings (``rsqrt``, fused multiply-adds,
division order): ``rtol=1e-5, atol=1e-6`` after 20 steps (seen: ≤ 3e-7 absolute).
"""
import inspect

import pytest
import torch

import optcompile
from optimizers import BACKENDS, BY_STEM, OPTIMIZERS, STEMS, backend_params

pytestmark = [pytest.mark.filterwarnings("error:.*kernels skipped"),  # a backend test must run its backend
              pytest.mark.filterwarnings("error:.*no .* kernels for this spec")]  # (Adafactor's included)
FAMILY = [i for i in OPTIMIZERS if i.torch_family]
CASES = [pytest.param(i.stem, dict(kw), id=f"{i.stem}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}")
         for i in FAMILY for kw in i.torch_family]
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
STEPS = 20


def make_params(dtype=torch.float32, ndims=()):
    """Two groups: a matrix and a vector; a 0-d tensor, a transposed (non-contiguous) matrix, a
    3-d tensor (Adafactor's batch dims) and a tall matrix; only those of the ranks ``ndims`` where
    the class takes only these (the registry's ``param_ndims``: Muon's matrices)."""
    g = torch.Generator().manual_seed(0)
    first = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]
    second = [torch.randn((), generator=g), torch.randn(3, 4, generator=g).t(), torch.randn(2, 3, 4, generator=g)]
    if ndims:
        second.append(torch.randn(6, 3, generator=g))
    return [[p.to(dtype).requires_grad_() for p in ps if not ndims or p.dim() in ndims] for ps in (first, second)]


def like(p, values):
    """``values`` as a gradient of ``p``: its dtype and strides (Triton steps only matching layouts)."""
    return torch.empty_like(p).copy_(values)


def make(cls, params, kw, **flags):
    """Two groups, the second at half the lr (a StepLR then scales both)."""
    lr = kw.get("lr", inspect.signature(cls.__init__).parameters["lr"].default)
    return cls([{"params": params[0]}, {"params": params[1], "lr": lr * 0.5}], **kw, **flags)


def train(opt, params, steps=STEPS, seed=1):
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    flat = [p for ps in params for p in ps]
    for _ in range(steps):
        for p in flat:  # sign changes and magnitudes that vary: Rprop's three branches all run
            p.grad = like(p, torch.randn(p.shape, generator=g) * 2)
        opt.step()
        sched.step()
    return opt


def states(opt):
    return [opt.state[p] for g in opt.param_groups for p in g["params"]]


def compare_states(ours, theirs, exact, info):
    for so, st in zip(states(ours), states(theirs)):
        for key, value in st.items():
            if key == "step":
                continue  # ours is the group's (see test_state_dict_*)
            assert key in so, key
            if exact:
                assert torch.equal(so[key], value), f"state {key!r}: max |Δ| = {(so[key] - value).abs().max():.3g}"
            else:  # a summed state (RMSprop's momentum buffer) crossing zero: ulps of its largest terms
                torch.testing.assert_close(so[key], value, rtol=TOLERANCE["rtol"],
                                           atol=info.fp32_atol(key, value, TOLERANCE["atol"]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("stem,kw", CASES)
def test_matches_torch_optim(stem, kw, backend):
    info = BY_STEM[stem]
    ours, theirs = make_params(ndims=BY_STEM[stem].param_ndims), make_params(ndims=BY_STEM[stem].param_ndims)
    o = train(make(info.cls, ours, kw, **BACKENDS[backend].flags), ours)
    t = train(make(info.torch_cls, theirs, kw, **info.torch_flags(foreach=backend == "foreach")), theirs)
    exact = backend in info.torch_exact
    for a, b in zip(sum(ours, []), sum(theirs, [])):
        if exact:
            assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max():.3g}"
        else:
            torch.testing.assert_close(a, b, **TOLERANCE)
    compare_states(o, t, exact, info)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("stem", [i.stem for i in FAMILY])
def test_bf16_kahan_tracks_fp32_torch(stem, backend):
    """bf16 params with Kahan summation (the default there) stay near torch's fp32 run, no further
    than bf16 without compensation, and every backend agrees with eager to a bf16 rounding."""
    info = BY_STEM[stem]
    kw = dict(info.training[0].kwargs)
    ref = make_params(ndims=BY_STEM[stem].param_ndims)
    train(make(info.torch_cls, ref, kw, **info.torch_flags()), ref)
    errors, runs = {}, {}
    for kahan in (True, False):
        ps = make_params(torch.bfloat16, BY_STEM[stem].param_ndims)
        opt = train(make(info.cls, ps, kw, kahan_sum=kahan, **BACKENDS[backend].flags), ps)
        if kahan:
            assert all(s["kahan_comp"] is not None for s in states(opt))
        errors[kahan] = max((p.float() - r).abs().max().item() for p, r in zip(sum(ps, []), sum(ref, [])))
        assert all(torch.isfinite(p).all() for p in sum(ps, []))
        runs[kahan] = sum(ps, [])
    assert errors[True] <= errors[False] + 1e-3, errors
    assert errors[True] < 0.05, errors
    eager = make_params(torch.bfloat16, BY_STEM[stem].param_ndims)
    train(make(info.cls, eager, kw, **BACKENDS["eager"].flags), eager)
    for a, b in zip(runs[True], sum(eager, [])):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2e-2)


def _loaded_run(stem, kw):
    """10 steps in torch.optim, then its state_dict → ours → 5 steps → ours' state_dict → torch.optim,
    against torch.optim alone for all 20 steps."""
    info = BY_STEM[stem]
    ref, ps = make_params(ndims=BY_STEM[stem].param_ndims), make_params(ndims=BY_STEM[stem].param_ndims)
    t_ref = make(info.torch_cls, ref, kw, **info.torch_flags())
    first = make(info.torch_cls, ps, kw, **info.torch_flags())
    g = torch.Generator().manual_seed(3)
    flat_ref, flat = sum(ref, []), sum(ps, [])
    opts = [first]
    for i in range(20):
        if i == 10:  # torch.optim → optcompile
            opts.append(make(info.cls, ps, kw, **BACKENDS["eager"].flags))
            opts[-1].load_state_dict(opts[-2].state_dict())
        if i == 15:  # optcompile → torch.optim
            opts.append(make(info.torch_cls, ps, kw, **info.torch_flags()))
            opts[-1].load_state_dict(opts[-2].state_dict())
        grads = [torch.randn(p.shape, generator=g) for p in flat]
        for p, q, gr in zip(flat_ref, flat, grads):
            p.grad, q.grad = like(p, gr), like(q, gr)
        t_ref.step()
        opts[-1].step()
    return opts, t_ref, flat, flat_ref


@pytest.mark.parametrize("stem", [i.stem for i in FAMILY])
def test_state_dict_loads_both_ways(stem):
    """Continuation across torch.optim → optcompile → torch.optim, states and steps too: bit-exact
    where eager is torch's for-loop bit for bit (``torch_exact``), else within the tolerances."""
    info = BY_STEM[stem]
    opts, t_ref, flat, flat_ref = _loaded_run(stem, dict(info.state_dict))

    def same(a, b, what):
        if "eager" in info.torch_exact:
            assert torch.equal(a, b), f"{what}: max |Δ| = {(a - b).abs().max():.3g}"
        else:
            torch.testing.assert_close(a, b, **TOLERANCE, msg=what)
    for a, b in zip(flat, flat_ref):
        same(a, b, "param")
    final = opts[-1]
    for so, st in zip(states(final), states(t_ref)):
        assert set(so) == set(st)
        for k in st:
            assert so[k].dtype == st[k].dtype and so[k].shape == st[k].shape, k
            if k == "step":
                assert torch.equal(so[k], st[k]), k
            else:
                same(so[k], st[k], k)
    ours_sd = opts[1].state_dict()  # torch.optim's layout, as torch.optim saves it
    torch_keys = set(t_ref.state_dict()["param_groups"][0])
    assert torch_keys <= set(ours_sd["param_groups"][0]), torch_keys - set(ours_sd["param_groups"][0])
    torch_sd = t_ref.state_dict()
    assert [set(v) for v in ours_sd["state"].values()] == [set(v) for v in torch_sd["state"].values()]
    # a float32 step per param, as torch saves it (torch.optim.Muon keeps none)
    assert all(v["step"].dtype == torch.float32 and v["step"].item() == 15 for v in ours_sd["state"].values()
               if "step" in v)


def test_state_dict_from_torch_rejects_capturable_and_bad_tuples():
    ps = make_params()
    t = make(torch.optim.Adamax, ps, {}, foreach=False)
    train(t, ps, steps=2)
    sd = t.state_dict()
    sd["param_groups"][0]["capturable"] = True
    ours = make(optcompile.Adamax, make_params(), {}, fused=False)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has capturable=True .*nothing was loaded"):
        ours.load_state_dict(sd)
    sd = t.state_dict()
    sd["param_groups"][1]["betas"] = (0.9,)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['betas'\] is \(0.9,\), expected 2 values"):
        ours.load_state_dict(sd)


# ── signatures and validation: torch.optim's ─────────────────────────────────────────────────────
# optcompile's keyword-only extras (``foreach`` and ``maximize`` where torch's class lacks them: Muon)
EXTRAS = {"decouple_wd", "decouple_lr", "max_lr", "kahan_sum", "triton", "gradient_release", "fused",
          "state_precision", "stochastic_rounding", "sr_seed", "foreach", "maximize"}


@pytest.mark.parametrize("stem", [i.stem for i in FAMILY])
def test_signature_is_torch_optims(stem):
    """torch.optim's arguments first (names, kinds, defaults), then optcompile's keyword-only extras."""
    info = BY_STEM[stem]
    ours = list(inspect.signature(info.cls.__init__).parameters.values())
    theirs = list(inspect.signature(info.torch_cls.__init__).parameters.values())
    theirs_names = [p.name for p in theirs]
    shared = [p for p in ours if p.name in theirs_names]
    assert [p.name for p in shared] == [n for n in theirs_names if n != "fused" or stem == "adagrad"]
    assert [p.name for p in ours[:len(shared)]] == [p.name for p in shared], "torch's arguments come first"
    for a in shared:
        b = theirs[theirs_names.index(a.name)]
        assert (a.kind, a.default, type(a.default)) == (b.kind, b.default, type(b.default)), a.name
    extra = ours[len(shared):]
    assert all(p.kind is p.KEYWORD_ONLY and p.name in EXTRAS for p in extra), [p.name for p in extra]


BAD = [  # one bad argument: torch.optim's exact message
    ("rmsprop", dict(lr=-1.0)), ("rmsprop", dict(alpha=-0.5)), ("rmsprop", dict(eps=-1.0)),
    ("rmsprop", dict(momentum=-0.1)), ("rmsprop", dict(weight_decay=-1.0)),
    ("adagrad", dict(lr_decay=-1.0)), ("adagrad", dict(initial_accumulator_value=-1.0)), ("adagrad", dict(eps=-1.0)),
    ("adagrad", dict(weight_decay=-1.0)),
    ("adamax", dict(betas=(1.0, 0.9))), ("adamax", dict(betas=(0.9, -0.1))), ("adamax", dict(eps=-1.0)),
    ("adamax", dict(weight_decay=-1.0)),
    ("adadelta", dict(rho=1.5)), ("adadelta", dict(eps=-1.0)), ("adadelta", dict(weight_decay=-1.0)),
    ("adadelta", dict(lr=-1.0)),
    ("rprop", dict(etas=(1.5, 1.2))), ("rprop", dict(etas=(0.5, 0.9))), ("rprop", dict(lr=-1.0)),
    ("adafactor", dict(lr=-1.0)), ("adafactor", dict(beta2_decay=0.5)), ("adafactor", dict(eps=(-1.0, 1e-3))),
    ("adafactor", dict(eps=(None, -1.0))), ("adafactor", dict(d=0.5)), ("adafactor", dict(weight_decay=-1.0)),
    ("nadam", dict(lr=-1.0)), ("nadam", dict(eps=-1.0)), ("nadam", dict(betas=(1.0, 0.9))),
    ("nadam", dict(betas=(0.9, -0.1))), ("nadam", dict(weight_decay=-1.0)), ("nadam", dict(momentum_decay=-1.0)),
    ("asgd", dict(lr=-1.0)), ("asgd", dict(weight_decay=-1.0)),
    ("muon", dict(lr=-1.0)), ("muon", dict(momentum=-0.1)), ("muon", dict(weight_decay=-1.0)),
    ("muon", dict(adjust_lr_fn="rms")),
]


@pytest.mark.parametrize("stem,kw", BAD, ids=[f"{s}-{list(k)[0]}" for s, k in BAD])
def test_validation_messages_are_torch_optims(stem, kw):
    info = BY_STEM[stem]
    with pytest.raises(ValueError) as theirs:
        info.torch_cls([torch.zeros(2, requires_grad=True)], **kw)
    with pytest.raises(ValueError) as ours:
        info.cls([torch.zeros(2, requires_grad=True)], **kw)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("stem,flag", [(i.stem, f) for i in FAMILY for f in ("capturable", "differentiable")
                                       if f in inspect.signature(i.torch_cls.__init__).parameters])
def test_capturable_and_differentiable_are_refused(stem, flag):
    """Accepted where torch.optim's signature has them (False); True is refused by name."""
    info = BY_STEM[stem]
    info.cls([torch.zeros(2, requires_grad=True)], **{flag: False})
    with pytest.raises(ValueError, match=f"{info.name}: {flag}=True is not supported"):
        info.cls([torch.zeros(2, requires_grad=True)], **{flag: True})


# ── maximize: every built-in ─────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("stem", STEMS)
def test_maximize_is_descent_on_the_negated_gradient(stem, backend):
    """``maximize=True`` on g steps exactly as ``maximize=False`` on −g (L2 decay and states that
    start from the gradient included), and leaves ``p.grad`` as it was."""
    info = BY_STEM[stem]
    kw = {"lr": info.lr, **dict(info.training[0].kwargs)}
    if stem == "sgd":
        kw.update(dampening=True, torch_init=True)  # a buffer that starts from the (ascent) gradient
    runs = []
    for maximize in (True, False):
        ps = make_params(ndims=BY_STEM[stem].param_ndims)
        opt = info.cls([{"params": ps[0]}, {"params": ps[1]}], **kw, maximize=maximize,
                       **BACKENDS[backend].flags)
        g = torch.Generator().manual_seed(5)
        for _ in range(6):
            grads = [like(p, torch.randn(p.shape, generator=g)) for p in sum(ps, [])]
            for p, gr in zip(sum(ps, []), grads):
                p.grad = gr.clone() if maximize else -gr
            opt.step()
            if maximize:
                assert all(torch.equal(p.grad, gr) for p, gr in zip(sum(ps, []), grads)), "p.grad was changed"
        runs.append(sum(ps, []))
    for a, b in zip(*runs):
        assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("stem", ["sgd", "adam"])
def test_maximize_matches_torch_optim(stem):
    """Where a built-in is torch.optim's algorithm (tests/optimizers.py ``torch_optim``), maximize is too."""
    case = BY_STEM[stem].torch_optim[-1]
    ours, theirs = make_params(ndims=BY_STEM[stem].param_ndims), make_params(ndims=BY_STEM[stem].param_ndims)
    train(getattr(optcompile, BY_STEM[stem].name)(sum(ours, []), **case.ours, maximize=True,
                                                     **BACKENDS["eager"].flags), ours)
    train(case.torch_cls(sum(theirs, []), **case.theirs, maximize=True, foreach=False), theirs)
    for a, b in zip(sum(ours, []), sum(theirs, [])):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_user_spec_gets_maximize(tmp_path):
    """The pass runs on every spec: a user's spec has ``maximize`` too, keyword-only, default False."""
    path = tmp_path / "signsgd.py"
    path.write_text('from optcompile.spec import Interval, OptimizerSpec, oo, sign\n'
                    'spec = OptimizerSpec("SignSGD", weight_decay=None)\n'
                    'lr = spec.hyper("lr", domain=Interval(0, oo))\n'
                    'spec.update(sign(spec.grad), lr=lr)\n')
    cls = optcompile.compile_spec(path)
    param = inspect.signature(cls.__init__).parameters["maximize"]
    assert param.kind is param.KEYWORD_ONLY and param.default is False
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    cls([p], lr=0.1, maximize=True, **BACKENDS["eager"].flags).step()
    assert torch.equal(p.detach(), torch.tensor([0.1, -0.1, 0.0]))


def test_torch_adam_state_dict_with_maximize_converts():
    """torch.optim.Adam(maximize=True) checkpoints convert onto optcompile.Adam, maximize kept."""
    case = BY_STEM["adam"].torch_optim[-1]
    ours, theirs = make_params(), make_params()
    t = train(case.torch_cls(sum(theirs, []), **case.theirs, maximize=True, foreach=False), theirs, steps=5)
    for p, q in zip(sum(ours, []), sum(theirs, [])):
        p.data.copy_(q.data)
    o = optcompile.Adam(sum(ours, []), **case.ours, **BACKENDS["eager"].flags)
    o.load_state_dict(t.state_dict())
    assert o.param_groups[0]["maximize"] is True
    train(o, ours, steps=5, seed=2)
    train(t, theirs, steps=5, seed=2)
    for a, b in zip(sum(ours, []), sum(theirs, [])):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_reduced_shape_specs_default_to_the_loop_on_cpu():
    """Adafactor's fused kernel reads its factors by a broadcast index and is slower than the
    for-loop on CPU (README, the torch.optim family benchmark): the automatic choice is the loop,
    an explicit ``fused=True`` the kernel."""
    from optcompile.runtime import choose_backend
    assert "kernel_segments" in BY_STEM["adafactor"].cls._info.extra
    p = [torch.zeros(3, 4)]
    assert choose_backend(p, segments=True) == "eager" and choose_backend(p, fused=True, segments=True) == "fused"
    assert choose_backend(p) == "fused" or not optcompile.backends_available.fused_cpu()
