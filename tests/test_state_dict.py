"""state_dict compatibility with torch-optimi 0.3.3: same per-param state keys, dtypes and shapes,
same param_group keys (plus our keyword-only ``fused``); checkpoints move between the libraries
in both directions and training continues bit-identically (fp32, for-loop backends, which match
optimi bit for bit: see test_differential.py); a mid-training round trip through
``torch.save``/``torch.load(weights_only=True)`` resumes bit-identically."""
import io
import warnings

import optimi
import pytest
import torch

import optcompile

NAMES = optcompile.OPTIMIZERS
KW = {"Adam": dict(weight_decay=0.01), "Adan": dict(), "Lion": dict(lr=1e-3, weight_decay=0.1),
      "Ranger": dict(k=3), "SGD": dict(momentum=0.9, dampening=True, torch_init=True),
      "StableAdamW": dict(), "AdamW": dict(), "RAdam": dict(betas=(0.9, 0.9))}
EAGER_OURS, EAGER_THEIRS = dict(foreach=False, triton=False, fused=False), dict(foreach=False, triton=False)


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
        assert set(go) - set(gt) == {"fused"} and set(gt) <= set(go)
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
