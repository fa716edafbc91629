"""state_dict compatibility with torch-optimi 0.3.3: same per-param state keys, dtypes and shapes,
same param_group keys (plus our keyword-only ``fused`` and ``maximize``); checkpoints move between the libraries
in both directions and training continues bit-identically (fp32, for-loop backends, which match
optimi bit for bit: see test_differential.py); a mid-training round trip through
``torch.save``/``torch.load(weights_only=True)`` resumes bit-identically."""
import copy
import io
import warnings

import optimi
import pytest
import torch

import optcompile
from optimizers import BY_NAME, EAGER as EAGER_OURS, NAMES, ORACLE_EAGER as EAGER_THEIRS

KW = {name: info.state_dict for name, info in BY_NAME.items()}
# optimi's classes; torch.optim's (Adadelta, Adagrad, …) keep torch's layout: tests/test_torch_family.py
NAMES = [n for n in NAMES if BY_NAME[n].optimi_cls is not None]


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            torch.randn((), generator=g).requires_grad_()]


def make(lib, name, params):
    kw = {"lr": 1e-2, **KW[name]}
    extra = EAGER_OURS if lib is optcompile else EAGER_THEIRS
    return getattr(lib, name)([{"params": params[:2]}, {"params": params[2:], "lr": kw["lr"] / 2}], **kw, **extra)


def run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + i)
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def save_load(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_layout_matches_optimi(name):
    sds = []
    for lib in (optimi, optcompile):
        params = make_params()
        opt = make(lib, name, params)
        run(opt, params, 2)
        sds.append(opt.state_dict())
    theirs, ours = sds
    assert ours["state"].keys() == theirs["state"].keys()
    for i, st in theirs["state"].items():
        assert list(ours["state"][i]) == list(st), (list(ours["state"][i]), list(st))  # keys, in optimi's order
        for k, v in st.items():
            if torch.is_tensor(v):
                assert (ours["state"][i][k].dtype, ours["state"][i][k].shape) == (v.dtype, v.shape), k
            else:
                assert ours["state"][i][k] is v is None
    for go, gt in zip(ours["param_groups"], theirs["param_groups"]):
        extras = {"fused", "maximize", "state_precision", "stochastic_rounding", "sr_seed"}  # our keyword-only extras
        assert set(go) - set(gt) == extras and set(gt) <= set(go)
        if "step" in gt:
            assert torch.equal(go["step"], gt["step"]) and go["step"].dtype == torch.int32


@pytest.mark.parametrize("src,dst", [(optimi, optcompile), (optcompile, optimi)], ids=["optimi->ours", "ours->optimi"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_moves_between_libraries(name, src, dst):
    """Train 6 steps in one library, load its state_dict into the other, train 6 more: identical to
    training all 12 steps in the destination library (which equals the source library bit for bit)."""
    ref_params = make_params()
    ref = make(dst, name, ref_params)
    run(ref, ref_params, 12)

    params = make_params()
    first = make(src, name, params)
    run(first, params, 6)
    moved = [p.detach().clone().requires_grad_() for p in params]
    second = make(dst, name, moved)
    second.load_state_dict(save_load(first.state_dict()))
    if dst is optcompile:
        assert all(g["fused"] is False for g in second.param_groups)  # our constructor choice survives
    run(second, moved, 6, start=6)
    for a, b in zip(moved, ref_params):
        assert torch.equal(a, b)
    for p, q in zip(moved, ref_params):
        for k, v in ref.state[q].items():
            if torch.is_tensor(v):
                assert torch.equal(second.state[p][k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_resumes_bit_identically(name):
    full_params = make_params()
    full = make(optcompile, name, full_params)
    run(full, full_params, 10)

    params = make_params()
    opt = make(optcompile, name, params)
    run(opt, params, 5)
    sd = save_load(opt.state_dict())  # weights_only=True: plain tensors, numbers, None, dicts
    resumed = make(optcompile, name, params)
    resumed.load_state_dict(sd)
    run(resumed, params, 5, start=5)
    for a, b in zip(params, full_params):
        assert torch.equal(a, b)
    assert str(resumed.state_dict()) == str(full.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_construction_warns_only_like_optimi(name):
    """No warnings from constructing any optimizer with its defaults (nor with foreach=True: optimi's
    foreach DeprecationWarning does not apply); optimi's single high-decay warning with decouple_lr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(optcompile, name)(make_params(), lr=1e-3)
        getattr(optcompile, name)(make_params(), lr=1e-3, foreach=True)
        getattr(optcompile, name)(make_params(), lr=1e-3, decouple_lr=True, weight_decay=0)
    assert not caught, [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(optcompile, name)([{"params": make_params()}, {"params": make_params(), "weight_decay": 0.5}], lr=1e-3,
                                  decouple_lr=True, weight_decay=1e-2)
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert "You are using weight_decay up to 0.5 which is potentially high" in str(caught[0].message)


# ── load_state_dict rejects what it cannot step, and leaves the optimizer as it was ─────────────
def _trained_ours(name, steps=2, **kw):
    params = make_params()
    opt = make(optcompile, name, params)
    for k, v in kw.items():
        for g in opt.param_groups:
            g[k] = v
    run(opt, params, steps)
    return opt, params


def _rejects(opt, sd, match):
    before = str(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == before, "a rejected load changed the optimizer"


def _edit_state(sd, index, **changes):
    sd = {**sd, "state": dict(sd["state"])}
    st = dict(sd["state"][index])
    for k, v in changes.items():
        if v is KeyError:
            del st[k]
        else:
            st[k] = v
    sd["state"][index] = st
    return sd


def _edit_group(sd, gi, drop=(), **changes):
    groups = [dict(g) for g in sd["param_groups"]]
    for k in drop:
        del groups[gi][k]
    groups[gi].update(changes)
    return {**sd, "param_groups": groups}


@pytest.mark.parametrize("name", NAMES)
def test_state_of_the_wrong_shape_is_rejected_at_load(name):
    """It was accepted; the next step raised (eager) or aborted the process (fused)."""
    opt, params = _trained_ours(name)
    sd = save_load(opt.state_dict())
    state = opt._info.states[0]
    bad = _edit_state(sd, 1, **{state: torch.zeros(4)})
    _rejects(opt, bad, rf"{name}.load_state_dict: state\[1\] \(param_groups\[0\]\['params'\]\[1\], "
                       rf"shape \(5,\)\): {state} has shape \(4,\), expected \(5,\) "
                       r"\(nothing was loaded: the optimizer is unchanged\)")
    bad = _edit_state(sd, 0, kahan_comp=torch.zeros(40))
    _rejects(opt, bad, r"state\[0\] .*kahan_comp has shape \(40,\), expected \(8, 5\)")
    run(opt, params, 1, start=2)  # still steps


@pytest.mark.parametrize("name", NAMES)
def test_missing_state_key_is_rejected_at_load(name):
    """It was accepted, then a bare KeyError at the first step."""
    opt, _ = _trained_ours(name)
    sd = save_load(opt.state_dict())
    for state in opt._info.states:
        _rejects(opt, _edit_state(sd, 2, **{state: KeyError}),
                 rf"{name}.load_state_dict: state\[2\] \(param_groups\[1\]\['params'\]\[0\], shape \(\)\) "
                 rf"has no '{state}'")


@pytest.mark.parametrize("name", NAMES)
def test_missing_group_key_is_rejected_at_load(name):
    opt, _ = _trained_ours(name)
    sd = save_load(opt.state_dict())
    keys = [k for k in opt._info.keys if k in ("beta1", "decouple_lr", "lr")]
    _rejects(opt, _edit_group(sd, 1, drop=keys),
             rf"{name}.load_state_dict: param_groups\[1\] has no {', '.join(repr(k) for k in keys)}")


def test_momentum_buffer_needed_by_the_loaded_hyperparameters():
    """Which states must exist follows init_state under the *loaded* group: SGD without momentum
    keeps no buffer, so a checkpoint with momentum=0.9 and exp_avg=None cannot be stepped."""
    opt, params = _trained_ours("SGD")
    sd = save_load(opt.state_dict())
    _rejects(opt, _edit_state(sd, 0, exp_avg=None), r"state\[0\] .*exp_avg is None, but param_groups\[0\]'s "
                                                     r"hyperparameters need it")
    other = make_params()
    no_momentum = optcompile.SGD([{"params": other[:2]}, {"params": other[2:]}], lr=1e-2, **EAGER_OURS)
    run(no_momentum, other, 2)
    assert no_momentum.state_dict()["state"][0]["exp_avg"] is None
    opt.load_state_dict(save_load(no_momentum.state_dict()))  # momentum=0 loaded with it: fine
    run(opt, params, 1)


@pytest.mark.parametrize("src,dst,match", [
    ("Adan", "AdamW", r"state\[0\] .* has 'exp_avg_diff', 'prev_grad', which AdamW does not keep"),
    ("AdamW", "Lion", r"state\[0\] .* has 'exp_avg_sq', which Lion does not keep"),
    ("Lion", "AdamW", r"param_groups\[0\] has no 'eps'"),
    ("StableAdamW", "AdamW", r"state\[0\] .* has 'eps_sq', which AdamW does not keep"),
    ("AdamW", "StableAdamW", r"state\[0\] .* has no 'eps_sq'"),
    ("SGD", "RAdam", r"param_groups\[0\] has no 'beta1', 'beta2', 'eps'"),
])
def test_state_dict_of_another_optimizer_is_rejected(src, dst, match):
    source, _ = _trained_ours(src)
    opt, _ = _trained_ours(dst)
    _rejects(opt, save_load(source.state_dict()), rf"{dst}.load_state_dict: .*{match}.*another optimizer class")


# ── a checkpoint without kahan_comp keeps its moments ───────────────────────────────────────
@pytest.mark.parametrize("layout", ["no-key", "None"])
def test_state_without_kahan_comp_keeps_its_moments(layout):
    """An fp32 checkpoint loaded for bf16 training has no compensation (no key once converted,
    ``kahan_comp=None`` as saved). optimi (and we, before) re-initialized every state on the next
    step when the key was missing, zeroing the moments, and with None ran without compensation;
    now the moments are kept and only the compensation starts, at zero: the step equals one from
    the same state given a zero kahan_comp."""
    opt, params = _trained_ours("AdamW", steps=3)
    sd = save_load(opt.state_dict())
    results = []
    for explicit in (False, True):
        bf16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in params]
        resumed = make(optcompile, "AdamW", bf16)
        converted = {**sd, "state": {i: dict(st) for i, st in sd["state"].items()},
                     "param_groups": [dict(g) for g in sd["param_groups"]]}
        for i, st in converted["state"].items():
            assert st["kahan_comp"] is None
            if explicit:
                st["kahan_comp"] = torch.zeros_like(bf16[i])
            elif layout == "no-key":
                del st["kahan_comp"]
        for g in converted["param_groups"]:
            g["kahan_sum"] = True if explicit else None  # None: the fp32 run never resolved it
        resumed.load_state_dict(converted)
        g = torch.Generator().manual_seed(7)
        for p in bf16:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        resumed.step()
        results.append((bf16, resumed))
    (a, opt_a), (b, opt_b) = results
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "kahan_comp"):
            assert torch.equal(opt_a.state[p][k], opt_b.state[q][k]), k
    assert opt_a.param_groups[0]["kahan_sum"] is True
    assert opt_a.state[a[0]]["kahan_comp"].abs().sum() > 0, "the compensation runs"


# ── foreign layouts that convert ────────────────────────────────────────────────────────────
@pytest.mark.parametrize("ours,theirs,kw", [("AdamW", torch.optim.AdamW, dict(weight_decay=0.05)),
                                            ("Adam", torch.optim.Adam, dict(weight_decay=0.05))], ids=["AdamW", "Adam"])
def test_torch_optim_adam_state_dict_converts(ours, theirs, kw):
    """torch keeps raw moments and a per-param float step; optimi bias-corrected moments and an
    int32 group step. After 5 torch steps, loading into ours and stepping 5 more matches torch's
    10 steps (fp32 rounding apart)."""
    ref_params = make_params()
    ref = theirs(ref_params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, **kw)
    run(ref, ref_params, 10, start=0)

    params = make_params()
    first = theirs(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, **kw)
    run(first, params, 5, start=0)
    moved = [p.detach().clone().requires_grad_() for p in params]
    second = getattr(optcompile, ours)(moved, lr=1.0, fused=False, foreach=False, triton=False)
    second.load_state_dict(save_load(first.state_dict()))
    group = second.param_groups[0]
    assert (group["beta1"], group["beta2"], group["lr"], group["eps"]) == (0.9, 0.99, 1e-2, 1e-6)
    assert group["step"].dtype == torch.int32 and int(group["step"]) == 5 and group["fused"] is False
    assert "betas" not in group and "amsgrad" not in group
    assert set(second.state[moved[0]]) == {"exp_avg", "exp_avg_sq"}
    run(second, moved, 5, start=5)
    for a, b in zip(moved, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert list(second.state_dict()["state"][0]) == ["exp_avg", "exp_avg_sq", "kahan_comp"]


def test_torch_optim_state_dicts_that_do_not_convert():
    params = make_params()
    adam_l2 = torch.optim.Adam(params, lr=1e-2, weight_decay=0.1)
    amsgrad = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    sgd = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    for o in (adam_l2, amsgrad, sgd):
        run(o, params, 1, start=0)
    ours, _ = _trained_ours("AdamW")
    single = lambda sd: {**sd, "param_groups": sd["param_groups"] * 0 + [  # noqa: E731
        {**sd["param_groups"][0], "params": [0, 1]}, {**sd["param_groups"][0], "params": [2]}]}
    _rejects(ours, single(adam_l2.state_dict()), r"is torch.optim.Adam's \(L2 weight decay")
    _rejects(ours, single(amsgrad.state_dict()), r"amsgrad=True \(torch.optim\), which AdamW does not implement")
    sgd_ours, _ = _trained_ours("SGD")
    _rejects(sgd_ours, single(sgd.state_dict()), r"SGD.load_state_dict: .*torch.optim")


def test_optimi_triton_placeholders_load_as_none():
    """optimi with triton=True stores a 1-element tensor for states the step never reads (no
    Kahan; SGD without momentum) and a per-param mean_square scratch (StableAdamW)."""
    for name, extra in (("AdamW", {"kahan_comp": torch.zeros(1, dtype=torch.uint8)}),
                        ("StableAdamW", {"kahan_comp": torch.zeros(1, dtype=torch.uint8),
                                         "mean_square": torch.zeros(1)})):
        opt, params = _trained_ours(name)
        sd = save_load(opt.state_dict())
        for i in list(sd["state"]):
            sd = _edit_state(sd, i, **extra)
        opt.load_state_dict(sd)
        assert all(opt.state[p]["kahan_comp"] is None and "mean_square" not in opt.state[p] for p in params)
        run(opt, params, 1, start=2)
    params = make_params()
    sgd = optcompile.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, **EAGER_OURS)
    run(sgd, params, 1)
    sd = sgd.state_dict()
    for i in list(sd["state"]):
        sd = _edit_state(sd, i, exp_avg=torch.zeros(1), kahan_comp=torch.zeros(1, dtype=torch.uint8))
    sgd.load_state_dict(sd)
    assert all(sgd.state[p]["exp_avg"] is None and sgd.state[p]["kahan_comp"] is None for p in params)
    run(sgd, params, 1, start=1)


def test_group_step_as_a_number_or_without_setup_continues():
    """A group step stored as a Python int or a float tensor, or a group without optimi's setup
    flag (which would restart the step at 0), loads as optimi's int32 step and continues."""
    ref, ref_params = _trained_ours("AdamW", steps=4)
    for variant in ({"step": 2}, {"step": torch.tensor(2.0)}, {"setup": KeyError}):
        opt, params = _trained_ours("AdamW", steps=2)
        sd = save_load(opt.state_dict())
        for gi in range(2):
            drop = [k for k, v in variant.items() if v is KeyError]
            sd = _edit_group(sd, gi, drop=drop, **{k: v for k, v in variant.items() if v is not KeyError})
        fresh = make(optcompile, "AdamW", params)
        fresh.load_state_dict(sd)
        assert fresh.param_groups[0]["step"].dtype == torch.int32 and fresh.param_groups[0]["setup"] is True
        run(fresh, params, 2, start=2)
        for a, b in zip(params, ref_params):
            assert torch.equal(a, b), variant


def test_deepcopy_of_an_optimizer_steps_and_checks_loads():
    """copy.deepcopy rebuilds an optimizer from its state only: it kept working, and its loads are
    checked like the original's (the hooks are set up again)."""
    import copy
    opt, params = _trained_ours("AdamW")
    twin = copy.deepcopy(opt)
    assert twin.optimizer_accumulation is False
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    run(twin, twin_params, 1)
    _rejects(twin, _edit_state(save_load(opt.state_dict()), 0, exp_avg=torch.zeros(3)), "exp_avg has shape")


@pytest.mark.parametrize("step", [torch.tensor(2.5), torch.tensor(2, dtype=torch.int32, device="meta"), -1, True,
                                  float("nan"), float("inf"), 2 ** 40, torch.tensor(2 + 0j)],
                         ids=["fractional", "meta", "negative", "bool", "nan", "inf", "past-int32", "complex"])
def test_group_step_that_is_not_a_count_is_rejected_at_load(step):
    """Such a step used to load and then fail at the first step (meta, -1: a ZeroDivisionError in
    the bias correction), raise a bare OverflowError, or be truncated silently (2.5 → 2)."""
    opt, _ = _trained_ours("AdamW")
    sd = save_load(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['step'\] is .*not a step count"):
        opt.load_state_dict(_edit_group(sd, 0, step=step))
    assert str(opt.state_dict()) == str(before)


def test_state_step_of_gradient_release_that_is_not_a_count_is_rejected_at_load():
    params = make_params()
    opt = optcompile.AdamW(params, lr=1e-2, gradient_release=True, **EAGER_OURS)
    run(opt, params, 2)
    sd = _edit_state(save_load(opt.state_dict()), 0, step=torch.tensor(-3, dtype=torch.int32))
    _rejects(opt, sd, r"state\[0\] .*: step is tensor\(-3, dtype=torch.int32\), not a step count")


@pytest.mark.parametrize("bad", [torch.empty(8, 5, device="meta"), torch.zeros(8, 5, dtype=torch.int64),
                                 torch.zeros(8, 5, dtype=torch.complex64)], ids=["meta", "int64", "complex64"])
def test_state_without_data_or_not_floating_is_rejected_at_load(bad):
    """A meta state used to fail inside torch with "Cannot copy out of meta tensor"; an integer or
    complex one was cast to the param's dtype silently (complex dropping its imaginary part)."""
    opt, _ = _trained_ours("AdamW")
    _rejects(opt, _edit_state(save_load(opt.state_dict()), 0, exp_avg=bad),
             r"state\[0\] .*: exp_avg is (on the meta device|of dtype torch\.(int64|complex64))[^;]*; a state must be")
