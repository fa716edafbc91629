"""Gradient release: every spec, against a normal step (bit for bit), against optimi (the oracle),
its gradient memory, resuming from a checkpoint (optimi bug 5 fixed), and optimi's errors."""
import io

import pytest
import torch
from torch import nn

import optimi
from optcompile import loader, prepare_for_gradient_release, remove_gradient_release
from optimizers import BY_STEM, EAGER, ORACLE_EAGER, batches, make_model, mse_backward, training_cases


pytestmark = pytest.mark.usefixtures("one_thread")


ours = loader.builtin_class


def oracle(stem):
    cls = getattr(optimi, ours(stem).__name__, None)
    if cls is None:
        pytest.skip(f"optimi has no {ours(stem).__name__}")
    return cls


def train(model, opt, data, release):
    for x, y in data:
        mse_backward(model, x, y)
        opt.step()
        opt.zero_grad()
        if release:
            assert all(p.grad is None for p in model.parameters()), "the hooks free every gradient"
    return model


# ── same result as a normal step ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stem, kw", training_cases())
def test_release_equals_normal_step(stem, kw, dtype):
    """Same seed and data: the eager per-param step is the eager per-list step, bit for bit, also
    in bf16 with Kahan (8 steps, so Ranger's lookahead (k=6) and RAdam's rectified phase run)."""
    cls, data = ours(stem), batches(8)
    a, b = make_model(dtype, ndims=BY_STEM[stem].param_ndims), make_model(dtype, ndims=BY_STEM[stem].param_ndims)
    kahan = {"kahan_sum": True} if dtype == torch.bfloat16 else {}
    opt_a = cls(a.parameters(), lr=1e-2, **kahan, **kw, **EAGER)
    opt_b = cls(b.parameters(), lr=1e-2, gradient_release=True, **kahan, **kw, **EAGER)
    prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data, False)
    train(b, opt_b, data, True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for pb in b.parameters():
        state = opt_b.state[pb]
        assert state["group"] is opt_b.param_groups[0]
        if opt_b._info.uses_step:
            assert state["step"].dtype == torch.int32 and int(state["step"]) == 8 and state["step"].dim() == 0
    remove_gradient_release(b)


# ── against optimi ───────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("stem, kw", training_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_matches_optimi(stem, kw, dtype):
    """fp32: rtol 1e-5 / atol 1e-6 (same math, different op order in a few host scalars).
    bf16 + Kahan: we compute in fp32, optimi in bf16 (one rounding per op); over 6 steps of
    lr 1e-3 the params stay within 2 bf16 ulps (2**-7 relative) plus 2e-3 absolute."""
    cls, ocls, data = ours(stem), oracle(stem), batches(6)
    lr = 1e-2 if dtype == torch.float32 else 1e-3
    kahan = {} if dtype == torch.float32 else {"kahan_sum": True}
    a, b = make_model(dtype), make_model(dtype)
    opt_a = cls(a.parameters(), lr=lr, gradient_release=True, **kahan, **kw, **EAGER)
    opt_b = ocls(b.parameters(), lr=lr, gradient_release=True, **kahan, **kw, **ORACLE_EAGER)
    prepare_for_gradient_release(a, opt_a)
    optimi.prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data, True)
    train(b, opt_b, data, True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **tol)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert opt_a.state[pa].keys() == opt_b.state[pb].keys()


@pytest.mark.parametrize("stem, kw", training_cases())
def test_release_state_dict_matches_optimi(stem, kw):
    """The group's step advances once per step() after the hooks stepped its params, as optimi's
    does (it stayed at 0, so saved state dicts differed from optimi's); per-param steps, state
    keys and values agree too. A group none of whose params was stepped keeps its step (optimi
    advances it too: docs/differences.md, 9)."""
    cls, ocls, data = ours(stem), oracle(stem), batches(5)
    a, b = make_model(), make_model()
    frozen_a, frozen_b = nn.Linear(3, 3), nn.Linear(3, 3)
    groups = lambda m, f: [{"params": m.parameters()}, {"params": f.parameters()}]  # noqa: E731
    opt_a = cls(groups(a, frozen_a), lr=1e-2, gradient_release=True, **kw, **EAGER)
    opt_b = ocls(groups(b, frozen_b), lr=1e-2, gradient_release=True, **kw, **ORACLE_EAGER)
    prepare_for_gradient_release(a, opt_a)
    optimi.prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data, True)
    train(b, opt_b, data, True)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    if opt_a._info.uses_step:
        assert sa["param_groups"][0]["step"].dtype == torch.int32
        assert int(sa["param_groups"][0]["step"]) == int(sb["param_groups"][0]["step"]) == len(data)
        assert int(sa["param_groups"][1]["step"]) == 0 and int(sb["param_groups"][1]["step"]) == len(data)
    for key in set(sb["param_groups"][0]) - {"params"}:
        va, vb = sa["param_groups"][0][key], sb["param_groups"][0][key]
        assert (torch.equal(va, vb) if torch.is_tensor(vb) else va == vb), key
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sb["state"].items():
        assert list(sa["state"][i]) == list(st), i
        for k, v in st.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(sa["state"][i][k], v, rtol=1e-5, atol=1e-6)
    remove_gradient_release(a)


def test_release_group_step_needs_a_step_call_and_survives_resume():
    """Without opt.step() calls the group's step stays absent (optimi's too: only step() sets it
    up); a load in between forgets which groups the hooks stepped."""
    model = make_model()
    opt = ours("adamw")(model.parameters(), lr=1e-2, gradient_release=True, **EAGER)
    prepare_for_gradient_release(model, opt)
    for x, y in batches(2):
        ((model(x) - y) ** 2).mean().backward()
    assert "step" not in opt.param_groups[0]
    opt.step()
    assert int(opt.param_groups[0]["step"]) == 1, "one step() after the hooks: one step"
    opt.step()
    assert int(opt.param_groups[0]["step"]) == 1, "step() without hook steps in between: unchanged"
    ((model(batches(1)[0][0]) ** 2).mean()).backward()
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    opt.step()
    assert int(opt.param_groups[0]["step"]) == 1
    remove_gradient_release(model)


def test_fused_release_checkpoint_keeps_int32_param_steps():
    """torch's load_state_dict casts a per-param ``step`` to float32 when the group has
    ``fused=True`` (its own fused optimizers keep float steps); ours are int32, as optimi's."""
    model = make_model()
    opt = ours("adamw")(model.parameters(), lr=1e-2, gradient_release=True, fused=True)
    prepare_for_gradient_release(model, opt)
    train(model, opt, batches(2), True)
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    for p in model.parameters():
        assert opt.state[p]["step"].dtype == torch.int32 and int(opt.state[p]["step"]) == 2
    remove_gradient_release(model)


# ── gradient memory ──────────────────────────────────────────────────────────────────────────
def _peak_live_grad_bytes(release: bool):
    """Sum of live ``.grad`` bytes, sampled by a hook that runs before the release hook of each
    param (hooks run in registration order), i.e. right after each gradient is accumulated."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(6)])
    params = list(model.parameters())
    samples = []
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda _: samples.append(sum(q.grad.nbytes for q in params if q.grad is not None)))
    opt = ours("adamw")(params, lr=1e-3, gradient_release=release, **EAGER)
    if release:
        prepare_for_gradient_release(model, opt, ignore_existing_hooks=True)
    for x, y in batches(3):
        model(torch.cat([x, x, x, x, x, x[:, :4]], 1)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return max(samples), [p.detach().clone() for p in params]


def test_release_lowers_peak_gradient_memory():
    normal_peak, normal_params = _peak_live_grad_bytes(False)
    release_peak, release_params = _peak_live_grad_bytes(True)
    print(f"\npeak live gradient bytes: normal step {normal_peak}, gradient release {release_peak}")
    assert normal_peak == 6 * 64 * 64 * 4  # every gradient is alive before step()
    assert release_peak == 64 * 64 * 4  # one at a time: freed by its hook before the next exists
    for a, b in zip(normal_params, release_params):
        assert torch.equal(a, b)


# ── the optimizer API under gradient release ─────────────────────────────────────────────────
def test_step_and_zero_grad_per_param_and_noops():
    model = make_model()
    opt = ours("adamw")(model.parameters(), lr=1e-2, gradient_release=True, **EAGER)
    w, b = model[0].weight, model[0].bias
    before = [p.detach().clone() for p in model.parameters()]
    w.grad = torch.ones_like(w)
    opt.step(param=w)  # no hooks: the user drives it
    assert not torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert int(opt.state[w]["step"]) == 1 and "step" not in opt.state[b]
    opt.zero_grad(param=w, set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w))
    opt.zero_grad(param=w)
    assert w.grad is None
    opt.step(param=b)  # no grad: nothing happens
    assert torch.equal(b, before[1])

    prepare_for_gradient_release(model, opt)
    after_hooks = train(model, opt, batches(2), True)
    snapshot = [p.detach().clone() for p in after_hooks.parameters()]
    opt.step()  # harmless no-ops: the hooks consumed every gradient
    opt.zero_grad()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    remove_gradient_release(model)
    ((model(batches(1)[0][0]) ** 2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters()), "hooks removed: grads stay"


def test_group_added_later_also_releases():
    model = make_model()
    opt = ours("adamw")(list(model[0].parameters()), lr=1e-2, gradient_release=True, **EAGER)
    opt.add_param_group({"params": list(model[1].parameters()) + list(model[3].parameters()), "lr": 0.0})
    prepare_for_gradient_release(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(1), True)
    after = list(model.parameters())
    assert not torch.equal(after[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after[2:], before[2:])), "lr 0 group: unchanged"
    assert opt.param_groups[1]["foreach"] is False


# ── resume: state_dict / load_state_dict ─────────────────────────────────────────────────────
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stem, kw", training_cases())
def test_resume_continues_and_follows_lr_schedule(stem, kw):
    """Fixed optimi bug 5: after load_state_dict, state[p]["group"] is the live param_group, so an
    LR scheduler attached after the resume is obeyed by the release steps."""
    cls, data = ours(stem), batches(6)
    a = make_model(ndims=BY_STEM[stem].param_ndims)
    opt_a = cls(a.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    prepare_for_gradient_release(a, opt_a)
    train(a, opt_a, data[:3], True)
    sd = opt_a.state_dict()
    assert all(isinstance(i, int) for s in sd["state"].values() for i in s["group"]["params"]), \
        "the checkpoint holds param indices, not a second copy of the params"
    sd = _roundtrip(sd)
    model_sd = {k: v.clone() for k, v in a.state_dict().items()}

    # 1) resuming continues exactly like the uninterrupted run
    b = make_model(ndims=BY_STEM[stem].param_ndims)
    b.load_state_dict(model_sd)
    opt_b = cls(b.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    # each optimizer loads its own copy: a loaded state holds the checkpoint's tensors (torch's
    # load_state_dict does not copy them), which its steps change in place (a param's step count,
    # Schedule-Free's z), so a second optimizer loading the same dict would resume from later
    opt_b.load_state_dict(_roundtrip(sd))
    prepare_for_gradient_release(b, opt_b)
    for p in b.parameters():
        assert opt_b.state[p]["group"] is opt_b.param_groups[0]
        if opt_b._info.uses_step:
            assert opt_b.state[p]["step"].dtype == torch.int32
    train(a, opt_a, data[3:], True)
    train(b, opt_b, data[3:], True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)

    # 2) a scheduler set up after the resume reaches the release steps
    c = make_model(ndims=BY_STEM[stem].param_ndims)
    c.load_state_dict(model_sd)
    opt_c = cls(c.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    opt_c.load_state_dict(_roundtrip(sd))
    prepare_for_gradient_release(c, opt_c)
    freeze = BY_STEM[stem].freeze  # group values under which a step must not move params
    if not freeze:  # ASGD, Ranger, Schedule-Free: lr = 0 does not stop them; the same schedule without release
        d = make_model(ndims=BY_STEM[stem].param_ndims)
        d.load_state_dict(model_sd)
        opt_d = cls(d.parameters(), lr=1e-2, **kw, **EAGER)
        opt_d.load_state_dict(_roundtrip(sd))
        for opt in (opt_c, opt_d):
            torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 0.25)
        train(c, opt_c, data[3:], True)
        train(d, opt_d, data[3:], False)
        for (k, p), q in zip(c.named_parameters(), d.parameters()):
            assert torch.equal(p, q), f"{k}: the release steps did not follow the schedule"
        return
    if BY_STEM[stem].lr_scales_step:
        torch.optim.lr_scheduler.LambdaLR(opt_c, lambda _: freeze["lr"])  # lr → 0
    else:  # Rprop: lr only seeds the step sizes (as in torch); clamp them to 0 in the live group
        opt_c.param_groups[0].update(freeze)
    train(c, opt_c, data[3:], True)
    for p, (k, v) in zip(c.parameters(), model_sd.items()):
        assert torch.equal(p, v), f"{k} moved with {dict(freeze)}: the step read a stale group"


@pytest.mark.parametrize("stem, kw", training_cases())
def test_switch_from_normal_steps_to_release(stem, kw):
    """A checkpoint of normal steps resumes under gradient release: each param's step counter
    continues from the group's, so the run equals the uninterrupted normal one bit for bit."""
    cls, data = ours(stem), batches(6)
    a = make_model(ndims=BY_STEM[stem].param_ndims)
    opt_a = cls(a.parameters(), lr=1e-2, **kw, **EAGER)
    train(a, opt_a, data[:3], False)
    b = make_model(ndims=BY_STEM[stem].param_ndims)
    b.load_state_dict(a.state_dict())
    opt_b = cls(b.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data[3:], False)
    train(b, opt_b, data[3:], True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_optimi_has_stale_group_after_load():
    """The bug we fix, shown on the oracle (so this test notices if optimi's behaviour changes)."""
    model = make_model()
    opt = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True, **ORACLE_EAGER)
    opt2 = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True, **ORACLE_EAGER)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[model[0].weight]["group"] is not opt2.param_groups[0]


@pytest.mark.parametrize("stem, kw", training_cases("adam", "adamw", "sgd", "stableadamw", "adan", "lion"))
def test_optimi_loads_our_release_checkpoint(stem, kw):
    """Our packed per-param group (param indices) still works for optimi's release step."""
    ocls, data = oracle(stem), batches(4)
    a = make_model()
    opt_a = ours(stem)(a.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    prepare_for_gradient_release(a, opt_a)
    train(a, opt_a, data[:2], True)
    b = make_model()
    b.load_state_dict(a.state_dict())
    opt_b = ocls(b.parameters(), lr=1e-2, gradient_release=True, **kw, **ORACLE_EAGER)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    optimi.prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data[2:], True)
    train(b, opt_b, data[2:], True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stem, kw", training_cases("adamw", "sgd", "stableadamw"))
def test_we_load_optimi_release_checkpoint(stem, kw):
    """optimi's checkpoint holds the whole group (params included) per param: we re-link it."""
    ocls, data = oracle(stem), batches(4)
    a = make_model()
    opt_a = ocls(a.parameters(), lr=1e-2, gradient_release=True, **kw, **ORACLE_EAGER)
    optimi.prepare_for_gradient_release(a, opt_a)
    train(a, opt_a, data[:2], True)
    b = make_model()
    b.load_state_dict(a.state_dict())
    opt_b = ours(stem)(b.parameters(), lr=1e-2, gradient_release=True, **kw, **EAGER)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    assert all(opt_b.state[p]["group"] is opt_b.param_groups[0] for p in b.parameters())
    prepare_for_gradient_release(b, opt_b)
    train(a, opt_a, data[2:], True)
    train(b, opt_b, data[2:], True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


# ── bad input: optimi's errors and warning ───────────────────────────────────────────────────
def _optimi_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def test_requires_gradient_release_optimizer():
    model = make_model()
    opt = ours("adamw")(model.parameters(), lr=1e-2, **EAGER)
    with pytest.raises(ValueError) as info:
        prepare_for_gradient_release(model, opt)
    theirs = optimi.AdamW(model.parameters(), lr=1e-2, **ORACLE_EAGER)
    assert (ValueError, str(info.value)) == _optimi_error(lambda: optimi.prepare_for_gradient_release(model, theirs))
    assert not hasattr(model, "_gradient_release_hooks")


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1),
                                  lambda ps: optimi.AdamW(ps, lr=0.1, gradient_release=True, triton=False)])
def test_rejects_other_optimizers(make):
    model = make_model()
    with pytest.raises(TypeError, match="`optimizer` must be an instance of `CompiledOptimizer`"):
        prepare_for_gradient_release(model, make(model.parameters()))


def test_existing_hooks_raise_and_roll_back():
    model = make_model()
    last = list(model.parameters())[-1]
    last.register_post_accumulate_grad_hook(lambda p: None)  # a user's hook on the last param
    opt = ours("adamw")(model.parameters(), lr=1e-2, gradient_release=True, **EAGER)
    with pytest.raises(ValueError) as info:
        prepare_for_gradient_release(model, opt)
    theirs = optimi.AdamW(model.parameters(), lr=1e-2, gradient_release=True, **ORACLE_EAGER)
    assert (ValueError, str(info.value)) == _optimi_error(lambda: optimi.prepare_for_gradient_release(model, theirs))
    assert str(info.value).startswith("Model already has post_accumulate_grad_hooks")
    counts = [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]
    assert counts == [0] * (len(counts) - 1) + [1], "the hooks added before the error are removed again"
    assert not hasattr(model, "_gradient_release_hooks")
    prepare_for_gradient_release(model, opt, ignore_existing_hooks=True)
    assert [len(p._post_accumulate_grad_hooks) for p in model.parameters()][-1] == 2
    remove_gradient_release(model)
    assert [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()] == counts


def test_step_param_needs_release_optimizer():
    model = make_model()
    opt = ours("adamw")(model[0].parameters(), lr=1e-2, **EAGER)
    w = model[0].weight
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match="gradient_release=True"):
        opt.step(param=w)  # optimi: KeyError('group')
    release = ours("adamw")(model[0].parameters(), lr=1e-2, gradient_release=True, **EAGER)
    stranger = model[3].weight
    stranger.grad = torch.ones_like(stranger)
    with pytest.raises(ValueError, match="holds this param"):
        release.step(param=stranger)


def test_remove_without_hooks_warns():
    with pytest.warns(UserWarning) as ours_warning:
        remove_gradient_release(make_model())
    with pytest.warns(UserWarning) as theirs:
        optimi.remove_gradient_release(make_model())
    assert str(ours_warning[0].message) == str(theirs[0].message)
    assert ours_warning[0].filename == __file__, "stacklevel points at the caller"
