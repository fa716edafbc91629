"""``state_precision`` and ``stochastic_rounding`` (optcompile/rounding.py) on every backend.

States are stored in the requested dtype and the math stays fp32, so a backend tracks the eager
reference of the same configuration; stochastic rounding draws the same counter-based bits on
eager, foreach, fused and Triton, is unbiased, moves a bf16 param by updates far below its ulp,
and resumes bit for bit from a state dict."""
import functools
import io

import pytest
import torch

from optcompile import rounding
from optcompile.runtime import CPU_CHUNK
from tests.optimizers import BACKENDS, BY_STEM, STEMS, backend_params, make_model

STEPS = 4


def _kwargs(stem: str, **extra) -> dict:
    info = BY_STEM[stem]
    training = dict(info.training[0].kwargs)
    return {"lr": info.lr, **training, **info.stateful, **extra}


def _precision(stem: str, which: str):
    """``which`` as a state_precision value: a dict stores the first state in fp32, the last in bf16."""
    if which != "dict":
        return which
    states = BY_STEM[stem].cls._info.states
    return {states[0]: "fp32", **({states[-1]: "bf16"} if len(states) > 1 else {})}


def _train(stem: str, backend: str, dtype, steps=STEPS, **kw):
    """``steps`` steps of the shared model in ``dtype``; its params and the optimizer."""
    model = make_model(dtype)
    params = list(model.parameters())
    opt = BY_STEM[stem].cls(params, **_kwargs(stem, **kw), **BACKENDS[backend].flags)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@functools.cache
def _eager(stem: str, dtype, which):
    params, opt = _train(stem, "eager", dtype, **({} if which is None else {"state_precision": _precision(stem, which)}))
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()
                                                   if torch.is_tensor(v) and v.dim()} for p in params]


def _assert_close(t, ref, what):
    """fp32: reassociation and FMA contraction, a few ulps. bf16: a one-ulp flip where the fp32
    values straddle a rounding boundary (FMA contraction differs by backend), carried by the state:
    bounded by 2 ulp of the tensor's largest value (as tests/test_triton.py measures)."""
    if t.dtype == torch.float32:
        torch.testing.assert_close(t, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
        return
    bound = 2 * 2 ** -7 * ref.float().abs().max().item()
    assert (t.float() - ref.float()).abs().max().item() <= bound, what


# ── state_precision ─────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("which", ["fp32", "bf16", "dict"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("stem", [s for s in STEMS if not BY_STEM[s].param_ndims])  # (1-D params: not Muon)
def test_states_in_requested_precision_track_eager(stem, backend, which):
    """Every state has the requested dtype (kahan_comp the param's); the backend matches the eager
    reference of the same configuration (fp32 math, one rounding per store: bf16 params within an
    ulp, fp32 states to fp32 reassociation), and tracks the fp32 training run."""
    dtype = torch.float32 if which == "bf16" else torch.bfloat16  # bf16 states of fp32 params, and the reverse
    precision = _precision(stem, which)
    params, opt = _train(stem, backend, dtype, state_precision=precision)
    ref_params, ref_states = _eager(stem, dtype, which)
    for p, ref_p, ref_s in zip(params, ref_params, ref_states):
        state = opt.state[p]
        for name in BY_STEM[stem].cls._info.states:
            if state.get(name) is None:
                continue
            assert state[name].dtype == rounding.state_dtype(precision, name, dtype), (name, state[name].dtype)
            _assert_close(state[name], ref_s[name], f"{stem} {name}")
        if state.get("kahan_comp") is not None:
            assert state["kahan_comp"].dtype == dtype
        _assert_close(p.detach(), ref_p, f"{stem} param")
    fp32_params, _ = _eager(stem, torch.float32, None)
    for p, ref in zip(params, fp32_params):  # within a few bf16 ulps of the fp32 run after STEPS steps
        torch.testing.assert_close(p.detach().float(), ref, rtol=0, atol=3e-2)


def test_default_is_param_dtype_and_fp32_states_are_more_accurate():
    """None keeps optimi's layout (states in the param's dtype); fp32 states of bf16 params end
    closer to the fp32 run than bf16 states do."""
    params, opt = _train("adamw", "eager", torch.bfloat16, steps=20)
    assert {opt.state[p]["exp_avg"].dtype for p in params} == {torch.bfloat16}
    fp32_params, fp32_opt = _train("adamw", "eager", torch.float32, steps=20)
    lean_params, lean_opt = _train("adamw", "eager", torch.bfloat16, steps=20, state_precision="fp32")
    err = lambda ps, o: sum((o.state[p]["exp_avg_sq"].float() - fo.state[q]["exp_avg_sq"]).abs().sum().item()  # noqa
                            for p, q, fo in zip(ps, fp32_params, [fp32_opt] * len(ps)))
    assert err(lean_params, lean_opt) < err(params, opt)


def test_state_precision_per_param_group():
    model = make_model(torch.bfloat16)
    a, b = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = BY_STEM["adamw"].cls([{"params": a, "state_precision": "fp32"}, {"params": b}], lr=1e-2,
                               **BACKENDS["fused"].flags if BACKENDS["fused"].unavailable() is None
                               else BACKENDS["eager"].flags)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert {opt.state[p]["exp_avg"].dtype for p in a} == {torch.float32}
    assert {opt.state[p]["exp_avg"].dtype for p in b} == {torch.bfloat16}


# ── errors ──────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("bad, message", [
    (dict(state_precision="int8"), r"state_precision='int8'.*'fp32', 'bf16', 'fp16'"),
    (dict(state_precision="int4"), r"state_precision='int4'.*'fp16', '8bit'"),
    (dict(state_precision={"exp_avg": "8bits"}), r"state_precision\['exp_avg'\]='8bits'.*'8bit'"),
    (dict(state_precision={"exp_avgg": "fp32"}), r"unknown state 'exp_avgg'.*\['exp_avg', 'exp_avg_sq'\]"),
    (dict(state_precision={"exp_avg": "fp8"}), r"state_precision\['exp_avg'\]='fp8'"),
    (dict(state_precision={"kahan_comp": "fp32"}), r"unknown state 'kahan_comp'.*follows the param"),
    (dict(state_precision=torch.float32), r"invalid state_precision=torch.float32 \(dtype\)"),
    (dict(stochastic_rounding=True, kahan_sum=True), r"kahan_sum=True and stochastic_rounding=True"),
    (dict(stochastic_rounding=1), r"stochastic_rounding must be True or False"),
    (dict(sr_seed=1.5), r"sr_seed must be an int"),
])
def test_bad_arguments(bad, message):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        BY_STEM["adamw"].cls([p], lr=1e-2, **bad)
    with pytest.raises(ValueError, match=message):  # per param group too
        BY_STEM["adamw"].cls([{"params": [p], **bad}], lr=1e-2)


def test_stochastic_rounding_turns_default_kahan_off():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = BY_STEM["adamw"].cls([p], lr=1e-2, stochastic_rounding=True, **BACKENDS["eager"].flags)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["kahan_comp"] is None


# ── stochastic rounding ─────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("dtype, value", [(torch.bfloat16, 1.0 + 2 ** -9), (torch.bfloat16, -3.3e-3),
                                          (torch.float16, 1.0 + 2 ** -12), (torch.float16, 1e-6),
                                          (torch.float16, -4.2e-7)])
def test_stochastic_rounding_is_unbiased(dtype, value):
    """The mean of many roundings of one value converges to it (fixed seed); each rounding is one
    of the two neighbours."""
    n = 1 << 16
    x = torch.full((n,), value)
    bits = rounding.random_bits((n,), "cpu", rounding.buffer_key(rounding.tensor_key(rounding.step_key(0, 1), 0), 0), 0)
    y = rounding.stochastic_round(x, dtype, bits).double()
    assert len(torch.unique(y)) == 2
    lo, hi = y.min().item(), y.max().item()
    p = (value - lo) / (hi - lo)
    sigma = (hi - lo) * (p * (1 - p) / n) ** 0.5
    assert abs(y.mean().item() - value) < 4 * sigma
    nearest = x.to(dtype).double()
    assert abs(nearest.mean().item() - value) > 10 * sigma  # what SR fixes


def test_stochastic_rounding_keeps_nonfinite():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    for dtype in (torch.bfloat16, torch.float16):
        y = rounding.stochastic_round(x, dtype, torch.full((5,), 0xFFFFFFFF, dtype=torch.int64))
        assert y[0] == float("inf") and y[1] == -float("inf") and y[2].isnan()
        assert y[3] == 0 and not y[3].signbit() and y[4] == 0 and y[4].signbit()


def test_hash_matches_its_python_definition():
    """The torch bits are the documented formula, for large element indices too (past 2**32)."""
    key = rounding.buffer_key(rounding.tensor_key(rounding.step_key(7, 3), 2), 4)
    for offset in (0, (1 << 32) - 2):
        got = rounding.random_bits((4,), "cpu", key, offset).tolist()
        want = [rounding.fmix32(key + ((offset + e) & rounding.M32) * rounding.GOLDEN) for e in range(4)]
        assert got == want


def _sr_run(stem, backend, dtype, sizes, steps=3, lr=2 ** -6, **kw):
    """Steps with a power-of-two lr: SGD's ``param - lr*grad`` is then one rounding in fp32 whether
    or not a backend contracts it to an FMA, so the values before storage rounding agree."""
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in sizes]
    opt = BY_STEM[stem].cls(params, lr=lr, stochastic_rounding=True, sr_seed=11, **kw, **BACKENDS[backend].flags)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("stem, dtype, kw", [
    ("sgd", torch.bfloat16, {}), ("sgd", torch.float16, {}),
    ("adamw", torch.bfloat16, {"state_precision": "bf16"}), ("adamw", torch.float16, {}),
    ("adamw", torch.float32, {"state_precision": "bf16"}),
], ids=["sgd-bf16", "sgd-fp16", "adamw-bf16", "adamw-fp16", "adamw-fp32-bf16-states"])
@pytest.mark.parametrize("backend", backend_params("foreach", "triton", "fused"))
def test_stochastic_rounding_is_bit_identical_across_backends(stem, dtype, kw, backend):
    """The same bits on every backend: eager's torch ops, foreach, the fused C kernel and Triton.
    Bit for bit where the fp32 values before rounding agree (these inputs); fp32 params themselves
    differ by FMA contraction, so there the bf16 states may differ where such a difference straddles
    a rounding threshold (probability ~2**-16 an element)."""
    sizes = (300, 7, 1)
    ref, ref_opt = _sr_run(stem, "eager", dtype, sizes, **kw)
    got, opt = _sr_run(stem, backend, dtype, sizes, **kw)
    for p, q in zip(got, ref):
        if dtype == torch.float32:
            _assert_close(p.detach(), q.detach(), "fp32 param")
        else:
            assert torch.equal(p, q)
        for name, t in opt.state[p].items():
            if torch.is_tensor(t) and t.dim() and t.dtype != torch.float32:
                if dtype == torch.float32:
                    _assert_close(t, ref_opt.state[q][name], name)
                else:
                    assert torch.equal(t, ref_opt.state[q][name]), name


@pytest.mark.parametrize("backend", backend_params("foreach", "fused"))
def test_stochastic_rounding_of_large_tensors_draws_by_element_index(backend):
    """A CPU tensor past CPU_CHUNK is stepped in slices by eager and foreach: each slice draws the
    bits of its elements' places in the whole tensor, so they match the fused kernel's."""
    sizes = (CPU_CHUNK + 77,)
    ref, _ = _sr_run("sgd", "eager", torch.bfloat16, sizes, steps=1)
    got, _ = _sr_run("sgd", backend, torch.bfloat16, sizes, steps=1)
    assert torch.equal(got[0], ref[0])


@pytest.mark.parametrize("backend", backend_params())
def test_updates_below_the_ulp_move_a_bf16_param_only_under_stochastic_rounding(backend):
    """SGD adds -1e-4 to bf16 params at 1.0 (ulp 2**-7, so nearest rounding drops every update):
    under stochastic rounding the mean follows the exact sum; under nearest it never moves."""
    n, steps, lr = 1024, 40, 1e-4
    out = {}
    for sr in (False, True):
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = BY_STEM["sgd"].cls([p], lr=lr, kahan_sum=False, stochastic_rounding=sr, **BACKENDS[backend].flags)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        out[sr] = p.detach().double()
    assert torch.all(out[False] == 1.0)
    exact = 1.0 - steps * lr
    assert abs(out[True].mean().item() - exact) < 0.1 * steps * lr


def _steps_4_to_6(opt, params, seed: int) -> None:
    """Steps 4-6 of a run whose grads are bf16 draws of ``Generator(seed)``, each param in turn
    (the draws of steps 1-3 are skipped): a resumed optimizer's, to compare with the straight run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for p in params:
            torch.randn(p.shape, generator=g)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        opt.step()


@pytest.mark.parametrize("stem, kw", [("adamw", {"state_precision": "bf16"}), ("sgd", {"momentum": 0.9})])
@pytest.mark.parametrize("backend", backend_params("eager", "fused"))
def test_resume_is_bit_exact(stem, kw, backend):
    """Three steps, a state dict through torch.save/torch.load(weights_only=True) into a fresh
    optimizer, three more: bit for bit the six-step run (the seed and the step count are saved)."""
    straight, _ = _sr_run(stem, backend, torch.bfloat16, (50, 3), steps=6, **kw)
    params, opt = _sr_run(stem, backend, torch.bfloat16, (50, 3), steps=3, **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["param_groups"][0]["sr_seed"] == 11
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = BY_STEM[stem].cls(resumed, lr=1e-2, stochastic_rounding=True, **kw, **BACKENDS[backend].flags)
    opt2.load_state_dict(saved)
    _steps_4_to_6(opt2, resumed, seed=1)
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)


# ── checkpoints across precisions ───────────────────────────────────────────────────────────────
def test_checkpoint_of_another_precision_is_cast_to_this_optimizers():
    """Loading keeps this optimizer's state_precision and casts the saved states to it; fp32
    states saved from bf16 params are read as saved (torch's loader alone would round them to
    the param's dtype first)."""
    params, opt = _train("adamw", "eager", torch.bfloat16, state_precision="fp32")
    saved = opt.state_dict()
    exp_avg = saved["state"][0]["exp_avg"].clone()
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32), (None, torch.bfloat16)):
        again = [p.detach().clone().requires_grad_() for p in params]
        opt2 = BY_STEM["adamw"].cls(again, lr=1e-2, state_precision=precision)
        opt2.load_state_dict(saved)
        assert opt2.param_groups[0]["state_precision"] == precision
        got = opt2.state[again[0]]["exp_avg"]
        assert got.dtype == want and torch.equal(got, exp_avg.to(want))
    assert torch.equal(saved["state"][0]["exp_avg"], exp_avg)  # the caller's dict is untouched


# ── memory ──────────────────────────────────────────────────────────────────────────────────────
def persistent_bytes_per_param(opt) -> float:
    """Bytes of params and states (grads aside) per parameter element, from the live tensors."""
    params = [p for g in opt.param_groups for p in g["params"]]
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        total += sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t) and t.dim())
    return total / sum(p.numel() for p in params)


@pytest.mark.parametrize("kw, expected", [
    (dict(dtype=torch.float32), 12.0),  # torch.optim-style fp32
    (dict(dtype=torch.bfloat16), 8.0),  # optimi: bf16 states + bf16 Kahan compensation
    (dict(dtype=torch.bfloat16, state_precision="fp32"), 12.0),  # + Kahan
    (dict(dtype=torch.bfloat16, state_precision="fp32", stochastic_rounding=True), 10.0),
    (dict(dtype=torch.bfloat16, stochastic_rounding=True), 6.0),  # bf16 states + SR
])
def test_persistent_bytes_per_param_adamw(kw, expected):
    dtype = kw.pop("dtype")
    params, opt = _train("adamw", "eager", dtype, steps=1, **kw)
    assert persistent_bytes_per_param(opt) == expected


@pytest.mark.parametrize("stem, kw", [("adamw", {"state_precision": "bf16"}), ("sgd", {})])
def test_gradient_release_draws_the_bits_of_a_normal_step(stem, kw):
    """Under gradient release each param is stepped from its hook with the step count the normal
    step() would use (SGD has no step: the group's sr_step), so both runs are bit for bit equal."""
    from optcompile import prepare_for_gradient_release
    from tests.optimizers import batches, mse_backward
    out = []
    for release in (False, True):
        model = make_model(torch.bfloat16)
        opt = BY_STEM[stem].cls(model.parameters(), lr=2 ** -6, stochastic_rounding=True, gradient_release=release,
                                **kw, **BACKENDS["eager"].flags)
        if release:
            prepare_for_gradient_release(model, opt)
        for x, y in batches(3):
            mse_backward(model, x, y)
            opt.step()
            opt.zero_grad()
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("stem", ["lamb", "signum"])
@pytest.mark.parametrize("backend", backend_params("foreach", "triton", "fused"))
def test_user_specs_get_state_precision_and_stochastic_rounding(stem, backend):
    """A user spec gets both for free (LAMB: reductions and an fp32 spill between stages): states in
    the requested dtype, every backend tracking eager (per-tensor sums are ordered differently, so
    a stochastic rounding may land an ulp apart)."""
    from pathlib import Path

    import optcompile
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / f"{stem}.py")
    states = cls._info.states
    precision = {states[0]: "fp32"}
    runs = []
    for name in ("eager", backend):
        torch.manual_seed(0)
        params = [torch.randn(n, dtype=torch.bfloat16, requires_grad=True) for n in (64, 5)]
        opt = cls(params, lr=1e-2, state_precision=precision, stochastic_rounding=True, **BACKENDS[name].flags)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()
        runs.append((params, opt))
    (ref, ref_opt), (got, opt) = runs
    for p, q in zip(got, ref):
        assert opt.state[p][states[0]].dtype == torch.float32
        assert opt.state[p].get("kahan_comp") is None
        _assert_close(p.detach(), q.detach(), f"{stem} param")
        for name in states:
            if torch.is_tensor(opt.state[p].get(name)):
                _assert_close(opt.state[p][name], ref_opt.state[q][name], f"{stem} {name}")


# ── state_precision="8bit" (optcompile/quantize.py) ─────────────────────────────────────────────
from optcompile import quantize  # noqa: E402

SIZES_8BIT = ((70, 64), (5000,), (10,))  # 17.5 blocks (a partial last one), 19.5 blocks, one below MIN_NUMEL


def _bound(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The documented error bound per element: sqrt(|x|·s)/top + s/(4·top²), plus 4 fp32 ulps of s."""
    top = 255 if codes.dtype == torch.uint8 else 127
    s = scales.repeat_interleave(quantize.BLOCK)[:x.numel()].view(x.shape)
    return (x.abs() * s).sqrt() / top + s / (4 * top ** 2) + 4 * torch.finfo(torch.float32).eps * s


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("n", [4096, 4097, 70 * 64, 1 << 16])
def test_dequantize_quantize_is_within_the_documented_bound(n, nonnegative):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) ** 3 * torch.logspace(-12, 2, n)[torch.randperm(n, generator=g)]
    x[:256] = 0.0  # a block of zeros: scale 0, decoded exactly
    if nonnegative:
        x = x.abs()
    codes, scales = quantize.quantize(x, nonnegative)
    assert codes.dtype == (torch.uint8 if nonnegative else torch.int8) and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (quantize.blocks(n),)
    assert torch.equal(scales, torch.nn.functional.pad(x.abs(), (0, (-n) % 256)).view(-1, 256).amax(1))
    y = quantize.dequantize(codes, scales)
    assert torch.equal(y[:256], x[:256])
    assert ((y - x).abs() <= _bound(x, codes, scales)).all()
    assert torch.equal(quantize.dequantize(*quantize.quantize(y, nonnegative)), y)  # decoded values are fixed points


def test_quantize_extremes():
    """Each block's absmax decodes exactly; an unsigned code stores a negative value as 0; a
    non-finite value makes its block decode as NaN and leaves the other blocks alone."""
    x = torch.linspace(-3, 5, 1024)
    for nonnegative in (False, True):
        y = quantize.dequantize(*quantize.quantize(x, nonnegative))
        assert y[-1] == 5.0 and (y[x < 0] == 0).all() == nonnegative
    x[300] = float("inf")
    y = quantize.dequantize(*quantize.quantize(x, False))
    assert y[256:512].isnan().all() and torch.isfinite(y[:256]).all() and torch.isfinite(y[512:]).all()


def test_nonnegative_states_are_the_registrys():
    """The compiler's inference (optcompile/nonnegative.py) gives every built-in exactly the
    unsigned states the registry lists."""
    for stem in STEMS:
        assert BY_STEM[stem].cls._info.extra.get("nonnegative", ()) == BY_STEM[stem].nonnegative, stem


def _train_8bit(cls, backend: str, dtype=torch.float32, steps=STEPS, kwargs=None, seed=3, **kw):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SIZES_8BIT]
    opt = cls(params, **(kwargs or {}), **kw, **BACKENDS[backend].flags)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


def _check_8bit_layout(opt, params, nonnegative):
    for p in params:
        state = opt.state[p]
        for name in opt._info.states:
            t = state.get(name)
            if t is None:
                continue
            if p.numel() < quantize.MIN_NUMEL or t.shape != p.shape:
                assert t.dtype == torch.float32 and quantize.scale_key(name) not in state, name
                continue
            assert t.dtype == (torch.uint8 if name in nonnegative else torch.int8), name
            assert state[quantize.scale_key(name)].shape == (quantize.blocks(p.numel()),)


@functools.cache
def _eager_8bit(stem: str):
    params, opt = _train_8bit(BY_STEM[stem].cls, "eager", kwargs=_kwargs(stem), state_precision="8bit")
    return [p.detach().clone() for p in params], [
        {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()} for p in params]


def _assert_codes_agree(state, ref, what):
    """Codes equal, or one step apart where two backends' fp32 values straddle a rounding boundary."""
    for name, t in state.items():
        if not torch.is_tensor(t) or not t.dim():
            continue
        if quantize.is_codes(t):
            diff = (t.int() - ref[name].int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, f"{what} {name}"
        else:
            torch.testing.assert_close(t, ref[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("backend", backend_params("eager", "foreach", "fused"))
@pytest.mark.parametrize("stem", [s for s in STEMS if not BY_STEM[s].param_ndims])  # (1-D params: not Muon)
def test_eightbit_states_on_every_backend(stem, backend):
    """Every built-in: 8-bit states in the documented layout (codes unsigned where the state is
    non-negative, fp32 below the size threshold), and every backend agrees with eager: the same
    codes (one step apart at most, on under 1 % of elements) and params within fp32 tolerances."""
    info = BY_STEM[stem]
    params, opt = _train_8bit(info.cls, backend, kwargs=_kwargs(stem), state_precision="8bit")
    _check_8bit_layout(opt, params, info.nonnegative)
    ref_params, ref_states = _eager_8bit(stem)
    for p, ref_p, ref_s in zip(params, ref_params, ref_states):
        _assert_codes_agree(opt.state[p], ref_s, f"{stem} {backend}")
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-3, atol=1e-4)
    if backend == "foreach":  # the same torch ops per element: bit for bit
        for p, ref_s in zip(params, ref_states):
            assert all(torch.equal(t, ref_s[k]) for k, t in opt.state[p].items() if torch.is_tensor(t) and t.dim())


@pytest.mark.parametrize("stem", ["adamw", "lion"])
@pytest.mark.parametrize("backend", backend_params("triton"))
def test_eightbit_states_on_triton(stem, backend):
    info = BY_STEM[stem]
    params, opt = _train_8bit(info.cls, backend, steps=2, kwargs=_kwargs(stem), state_precision="8bit")
    _check_8bit_layout(opt, params, info.nonnegative)
    ref_params, _ = _train_8bit(info.cls, "eager", steps=2, kwargs=_kwargs(stem), state_precision="8bit")
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4)


def _codes_step_pair(cls, backend, monkeypatch, steps=3, **kw):
    """The same bf16 training run twice on ``backend`` with 8-bit states and stochastic rounding:
    once with the kernel loading and storing the codes, once with every 8-bit state decoded to
    fp32 around the launch and encoded after (``runtime.kernel_codes`` turned off)."""
    from optcompile import runtime
    runs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(runtime, "kernel_codes", lambda *a, **k: frozenset())
        params, opt = _train_8bit(cls, backend, torch.bfloat16, steps=steps, kwargs=kw, state_precision="8bit",
                                  stochastic_rounding=True)
        runs.append((params, opt))
    monkeypatch.undo()
    return runs


@pytest.mark.parametrize("stem", ["adamw", "lion", "user:lamb"])
@pytest.mark.parametrize("backend", backend_params("fused", "triton"))
def test_eightbit_codes_in_the_kernel_equal_the_decoded_step(stem, backend, monkeypatch):
    """The fused C and Triton kernels decode each 256-element block on load and encode it on store
    (a tensor's last block partial; several tensors, one below the size threshold with fp32 states):
    the same codes, scales and bf16 params, bit for bit, as decoding to fp32, stepping on the same
    backend and encoding with torch (quantize.py): the fp32 math is the kernel's either way, and
    the encode's division and square root are correctly rounded on both sides. LAMB has
    reductions and spills across three stages."""
    from pathlib import Path

    import optcompile
    from optcompile import runtime
    if stem.startswith("user:"):
        cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / f"{stem[5:]}.py")
        kw = {"lr": 1e-2}
    else:
        cls, kw = BY_STEM[stem].cls, _kwargs(stem)
    (got, opt), (ref, ref_opt) = _codes_step_pair(cls, backend, monkeypatch, steps=2 if backend == "triton" else 3,
                                                  **kw)
    group = opt.param_groups[0]
    taken = runtime.kernel_codes(cls._info, group, got)
    assert taken == set(n for n in cls._info.states if n != "kahan_comp"), taken  # the kernel took every state
    _check_8bit_layout(opt, got, cls._info.extra.get("nonnegative", ()))
    for p, q in zip(got, ref):
        assert torch.equal(p, q), f"{stem} param {tuple(p.shape)}"
        for k, t in opt.state[p].items():
            if torch.is_tensor(t) and t.dim():
                assert torch.equal(t, ref_opt.state[q][k]), f"{stem} {k} of {tuple(p.shape)}"


def test_eightbit_training_tracks_fp32():
    """AdamW on a least-squares problem, 200 steps: 8-bit moments end within 2 % of the fp32 run's
    loss, and its weights (of scale 1) within 1e-3 on average and 5e-2 at most (two steps of lr
    3e-2, the jitter about the optimum)."""
    torch.manual_seed(0)
    x, w_true = torch.randn(512, 64), torch.randn(64, 96)
    y = x @ w_true + 0.1 * torch.randn(512, 96)
    out = {}
    for precision in (None, "8bit"):
        w = torch.zeros(64, 96, requires_grad=True)
        opt = BY_STEM["adamw"].cls([w], lr=3e-2, weight_decay=0.0, state_precision=precision)
        for i in range(200):
            idx = torch.arange(i * 64, i * 64 + 64) % 512
            loss = ((x[idx] @ w - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[precision] = (((x @ w - y) ** 2).mean().item(), w.detach())
    (loss32, w32), (loss8, w8) = out[None], out["8bit"]
    assert abs(loss8 - loss32) <= 0.02 * loss32
    assert (w8 - w32).abs().mean() < 1e-3 and (w8 - w32).abs().max() < 5e-2


@pytest.mark.parametrize("backend", backend_params("eager", "foreach", "fused"))
def test_eightbit_resume_is_bit_exact(backend):
    """bf16 params, stochastic rounding, 8-bit moments: three steps, a state dict through
    torch.save/torch.load(weights_only=True) into a fresh optimizer, three more: bit for bit the
    six-step run (codes and scales are saved as they are)."""
    kw = dict(lr=1e-2, stochastic_rounding=True, sr_seed=5, state_precision="8bit")
    cls = BY_STEM["adamw"].cls
    straight, s_opt = _train_8bit(cls, backend, torch.bfloat16, steps=6, **kw)
    params, opt = _train_8bit(cls, backend, torch.bfloat16, steps=3, **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["state"][0]["exp_avg"].dtype == torch.int8
    assert saved["state"][0]["exp_avg_sq_scale"].dtype == torch.float32
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(resumed, **kw, **BACKENDS[backend].flags)
    opt2.load_state_dict(saved)
    _steps_4_to_6(opt2, resumed, seed=3)
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        for k, t in opt2.state[p].items():
            if torch.is_tensor(t) and t.dim():
                assert torch.equal(t, s_opt.state[q][k]), k


def test_eightbit_checkpoint_conversions():
    """A full-precision checkpoint (optimi's AdamW) loads into an 8-bit optimizer encoded, and an
    8-bit checkpoint into a full-precision one decoded; dequantized_state reads either."""
    optimi = pytest.importorskip("optimi")
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in SIZES_8BIT]
    ref = optimi.AdamW(params, lr=1e-2, foreach=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        ref.step()
    full = ref.state_dict()
    opt8 = BY_STEM["adamw"].cls([p.detach().clone().requires_grad_() for p in params], lr=1e-2, state_precision="8bit")
    opt8.load_state_dict(full)
    p8 = opt8.param_groups[0]["params"]
    _check_8bit_layout(opt8, p8, ("exp_avg_sq",))
    for i, p in enumerate(p8):
        for name in ("exp_avg", "exp_avg_sq"):
            want = full["state"][i][name]
            got = opt8.dequantized_state(p, name)
            if p.numel() >= quantize.MIN_NUMEL:
                codes, scales = quantize.quantize(want, name == "exp_avg_sq")
                assert torch.equal(opt8.state[p][name], codes) and torch.equal(got, quantize.dequantize(codes, scales))
            else:
                assert torch.equal(got, want)
    back = BY_STEM["adamw"].cls([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    back.load_state_dict(opt8.state_dict())
    for i, (p, q) in enumerate(zip(back.param_groups[0]["params"], p8)):
        assert set(back.state[p]) == {"exp_avg", "exp_avg_sq", "kahan_comp"}
        for name in ("exp_avg", "exp_avg_sq"):
            assert back.state[p][name].dtype == torch.float32
            assert torch.equal(back.state[p][name], opt8.dequantized_state(q, name))
    with pytest.raises(ValueError, match="no state 'momentum'"):
        opt8.dequantized_state(p8[0], "momentum")


def test_eightbit_checkpoint_with_wrong_scales_is_rejected():
    params, opt = _train_8bit(BY_STEM["adamw"].cls, "eager", steps=1, lr=1e-2, state_precision="8bit")
    saved = opt.state_dict()
    saved["state"][0]["exp_avg_scale"] = saved["state"][0]["exp_avg_scale"][:-1]
    with pytest.raises(ValueError, match=r"exp_avg_scale is torch.float32 of shape \(17,\), expected float32 of "
                                         r"shape \(18,\)"):
        opt.load_state_dict(saved)


def test_eightbit_persistent_bytes_per_param():
    """AdamW, bf16 params, stochastic rounding, 8-bit moments: 2 + 1 + 1 + 2·4/256 = 4.03 B/param
    on tensors past the size threshold."""
    torch.manual_seed(0)
    params = [torch.randn(256, 256, dtype=torch.bfloat16, requires_grad=True)]
    opt = BY_STEM["adamw"].cls(params, lr=1e-2, stochastic_rounding=True, state_precision="8bit")
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    assert persistent_bytes_per_param(opt) == 2 + 1 + 1 + 2 * 4 / 256


def test_eightbit_per_state_and_gradient_release():
    """A dict stores only the named state in 8 bits; gradient release steps 8-bit states exactly as
    the normal step does."""
    cls = BY_STEM["adamw"].cls
    params, opt = _train_8bit(cls, "eager", lr=1e-2, state_precision={"exp_avg": "8bit", "exp_avg_sq": "bf16"})
    assert opt.state[params[0]]["exp_avg"].dtype == torch.int8
    assert opt.state[params[0]]["exp_avg_sq"].dtype == torch.bfloat16 and "exp_avg_sq_scale" not in opt.state[params[0]]
    from optcompile import prepare_for_gradient_release
    out = []
    for release in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 80)
        opt = cls(model.parameters(), lr=1e-2, gradient_release=release, state_precision="8bit",
                  **BACKENDS["eager"].flags)
        if release:
            prepare_for_gradient_release(model, opt)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(8, 64, generator=g)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def _lerp_rms_spec(declare):
    """A user spec whose second moment is written in lerp form, ``v + ρ(g² − v)``, which the
    inference cannot show non-negative: ``declare`` is its ``nonnegative=``."""
    from optcompile.spec import Interval, OptimizerSpec, oo, sqrt
    spec = OptimizerSpec("LerpRMS", weight_decay=None)
    lr = spec.hyper("lr", domain=Interval(0, oo))
    rho = spec.hyper("rho", default=0.1, domain=Interval(0, 1))
    g = spec.grad
    v = spec.state("v", nonnegative=declare)
    m = spec.state("m")
    v = spec.assign(v, v + rho * (g**2 - v))
    m = spec.assign(m, 0.9 * m + g)
    spec.update(m / (sqrt(v) + 1e-8), lr=lr)
    return spec


@pytest.mark.parametrize("backend", backend_params("eager", "foreach", "fused"))
def test_user_spec_declares_a_nonnegative_state(backend):
    import optcompile
    assert optcompile.compile_spec(_lerp_rms_spec(None))._info.extra.get("nonnegative", ()) == ()
    cls = optcompile.compile_spec(_lerp_rms_spec(True))
    assert cls._info.extra["nonnegative"] == ("v",)
    params, opt = _train_8bit(cls, backend, lr=1e-2, state_precision="8bit")
    _check_8bit_layout(opt, params, ("v",))
    ref, _ = _train_8bit(cls, "eager", lr=1e-2, state_precision="8bit")
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-4)
    full, _ = _train_8bit(cls, "eager", lr=1e-2)
    for p, q in zip(params, full):  # 4 steps of ~0.03 each: 8-bit moments stay within 1e-2 of the fp32 run
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-2)


def _edge_values() -> torch.Tensor:
    """Blocks that probe the fused kernel's encode (optcompile/templates/fused.c.j2): each block's
    first element sets its scale s (a random mantissa; exponents inside and just outside the
    range where the kernel divides by multiplying with 1/s and correcting once, and near the ends
    of fp32), the others sit within 3 ulps of each signed and unsigned code's rounding midpoint
    s·((k + ½)/top)², where a quotient one ulp off would change the code."""
    g = torch.Generator().manual_seed(13)
    exponents = [0, -20, -79, -80, -81, -100, -126, -130, 40, 119, 120, 121, 126, 127]
    blocks = []
    for e in exponents:
        for top in (127, 255):
            s = torch.ldexp(1 + torch.rand((), generator=g), torch.tensor(e)).float()
            mid = s * ((torch.arange(top, dtype=torch.float64) + 0.5) / top) ** 2
            near = mid.float().view(-1, 1).view(torch.int32) + torch.arange(-3, 4, dtype=torch.int32)
            vals = near.view(torch.float32).reshape(-1)
            vals = vals[torch.isfinite(vals) & (vals <= s)]
            signs = torch.where(torch.rand(vals.shape, generator=g) < 0.5, -1.0, 1.0)
            for lo in range(0, vals.numel(), 255):
                part = vals[lo:lo + 255] * signs[lo:lo + 255]
                blocks.append(torch.cat([s.view(1), part, part.new_zeros(255 - part.numel())]))
    return torch.cat(blocks)


def test_eightbit_fused_encode_and_decode_are_correctly_rounded(monkeypatch):
    """The fused kernel's encode equals quantize_ (torch's correctly rounded division and square
    root) on values within ulps of every code's rounding boundary, at scales across fp32's range;
    and its decode of every code (a block holding all 255 signed or 256 unsigned codes) steps an
    fp32 param bit for bit as the torch-decoded state does."""
    from optcompile import runtime
    cls = BY_STEM["adamw"].cls
    x = _edge_values()
    p = torch.nn.Parameter(torch.zeros_like(x))
    opt = cls([p], lr=1e-3, betas=(0.0, 0.0), fused=True, state_precision="8bit")
    p.grad = x.clone()
    opt.step()  # betas 0: exp_avg is the grad, exp_avg_sq its square, each encoded by the kernel
    for name, value in (("exp_avg", x), ("exp_avg_sq", x * x)):
        codes, scales = quantize.quantize(value, name == "exp_avg_sq")
        assert torch.equal(opt.state[p][quantize.scale_key(name)], scales), name
        assert torch.equal(opt.state[p][name], codes), name
    n = 256 * 16  # MIN_NUMEL
    signed = torch.arange(-127, 128, dtype=torch.int8)
    runs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(runtime, "kernel_codes", lambda *a, **k: frozenset())
        p = torch.nn.Parameter(torch.linspace(-1, 1, n))
        opt = cls([p], lr=1e-2, betas=(0.5, 0.5), fused=True, state_precision="8bit")
        p.grad = torch.zeros(n)
        opt.step()
        state = opt.state[p]
        state["exp_avg"].copy_(torch.cat([signed, signed[:1]]).repeat(16))
        state["exp_avg_sq"].copy_(torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(16))
        state["exp_avg_scale"].copy_(torch.logspace(-30, 30, 16))
        state["exp_avg_sq_scale"].copy_(torch.logspace(-36, 36, 16))
        p.grad = torch.linspace(-1e-3, 1e-3, n)
        opt.step()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim()}))
    monkeypatch.undo()
    (got, got_state), (ref, ref_state) = runs
    assert torch.equal(got, ref)
    assert all(torch.equal(t, ref_state[k]) for k, t in got_state.items())


# ── the functional forms: 8-bit codes with their scales, stochastic rounding by seed ────────────
def _functional_args(stem: str):
    if stem == "adamw":
        return dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-6), {"weight_decay": 0.01, "lr": 1e-2}
    return dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01), {"weight_decay": 0.01, "lr": 1e-3}


@pytest.mark.parametrize("backend", backend_params("eager", "foreach", "fused"))
@pytest.mark.parametrize("stem", ["adamw", "lion"])
def test_functional_form_takes_eightbit_codes_and_a_rounding_seed(stem, backend):
    """``optcompile.adamw(..., code_scales=..., sr_seed=...)`` over codes made by quantize(), bf16 params:
    the params, codes and scales equal the class's with ``state_precision="8bit",
    stochastic_rounding=True`` and the same seed, bit for bit (Lion keeps no step count: the
    functional form numbers its steps with ``sr_step``); a small param's states stay fp32."""
    import optcompile
    info = BY_STEM[stem]
    fn = getattr(optcompile, stem)
    args, class_kw = _functional_args(stem)
    torch.manual_seed(0)
    shapes = [(70, 64), (10,)]
    ref = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    params = [p.detach().clone() for p in ref]
    opt = info.cls(ref, **class_kw, betas=(0.9, 0.99), **({"eps": 1e-6} if stem == "adamw" else {}),
                   state_precision="8bit", stochastic_rounding=True, sr_seed=11, **BACKENDS[backend].flags)
    nonnegative = info.nonnegative
    states, scales = [], {}
    for name in info.cls._info.states:
        made = [quantize.quantize(torch.zeros(s), name in nonnegative) if torch.Size(s).numel() >= 4096
                else (torch.zeros(s), None) for s in shapes]
        states.append([c for c, _ in made])
        scales[name] = [s for _, s in made]
    step = torch.tensor(0, dtype=torch.int32)
    for k in range(3):
        grads = [torch.randn(s).bfloat16() for s in shapes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        extra = {"step": step} if stem == "adamw" else {"sr_step": k + 1}
        fn(params, grads, *states, **args, **extra, code_scales=scales, sr_seed=11, **BACKENDS[backend].flags)
    for i, (p, q) in enumerate(zip(params, ref)):
        assert torch.equal(p, q), f"{stem} param {i}"
        for name, lst in zip(info.cls._info.states, states):
            assert torch.equal(lst[i], opt.state[q][name]), f"{stem} {name} of param {i}"
            if scales[name][i] is not None:
                assert torch.equal(scales[name][i], opt.state[q][quantize.scale_key(name)])


def test_functional_form_errors_name_the_argument():
    import optcompile
    p, g = torch.zeros(64, 64), torch.ones(64, 64)
    codes, sc = quantize.quantize(torch.zeros(64, 64), False)
    v_codes, v_sc = quantize.quantize(torch.zeros(64, 64), True)
    args = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, step=torch.tensor(0, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] holds 8-bit codes .*scales\['exp_avg'\]\[0\]"):
        optcompile.adamw([p], [g], [codes], [torch.zeros(64, 64)], **args)
    with pytest.raises(ValueError, match="code_scales names 'm', not a state of AdamW"):
        optcompile.adamw([p], [g], [codes], [torch.zeros(64, 64)], **args, code_scales={"exp_avg": [sc], "m": [sc]})
    with pytest.raises(ValueError, match=r"scales\['exp_avg_sq'\]\[0\] is given, but exp_avg_sqs\[0\] is not 8-bit"):
        optcompile.adamw([p], [g], [codes], [torch.zeros(64, 64)], **args,
                         code_scales={"exp_avg": [sc], "exp_avg_sq": [v_sc]})
    with pytest.raises(ValueError, match=r"exp_avg_sq_scale is torch.float32 of shape \(15,\)"):
        optcompile.adamw([p], [g], [codes], [v_codes], **args, code_scales={"exp_avg": [sc], "exp_avg_sq": [v_sc[:15]]})
    with pytest.raises(ValueError, match="sr_seed .* and kahan_sum=True cannot be used together"):
        optcompile.adamw([p], [g], [torch.zeros(64, 64)], [torch.zeros(64, 64)], **args, sr_seed=1, kahan_sum=True)
    with pytest.raises(ValueError, match="sr_seed needs sr_step"):
        optcompile.lion([p], [g], [torch.zeros(64, 64)], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, sr_seed=1)
    assert args["step"] == 0  # nothing stepped
