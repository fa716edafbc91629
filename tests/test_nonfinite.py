"""NaN and ±inf: one semantics on every backend (README, "Semantics worth knowing").

For every built-in spec, every backend and a few non-finite gradient patterns (one NaN, +inf or
-inf element on every step or on the first step only, gradients ×1e30, ``weight_decay=inf``), a
few steps from the same start must leave NaN, +inf and -inf in the *same places* of the params
and of every state as the eager backend, and the eager backend in the same places as
torch-optimi 0.3.3, or torch.optim for the classes that are its (fp32; in bf16 our backends
against each other).
Finite values are the other test files' business; here only the masks are compared, so
reordered sums cannot make the test flaky. Tensors are small: Triton runs in its interpreter.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import functools  # noqa: E402
import importlib.util  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from optcompile import backends_available  # noqa: E402
from optcompile.loader import builtin_module, compile_spec  # noqa: E402
from optimizers import BACKENDS as REGISTRY, BY_NAME, BY_STEM, STEMS  # noqa: E402

SPECS = STEMS
BACKENDS = {name: backend.flags for name, backend in REGISTRY.items()}
PATTERNS = ["nan", "posinf", "neginf", "nan_once", "posinf_once", "huge", "wd_inf"]
SIZES = [(37,), (5,)]  # the first param gets the non-finite element; the second stays clean
MATRIX_SIZES = [(8, 5), (3, 4)]  # the same for a class that takes only matrices (Muon: its
# Newton-Schulz step spreads one element's NaN over the whole matrix, in torch.optim.Muon too)
POISONED = 5  # in the first param's flat order
STEPS = 3


def _skip_unavailable(backend):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "fused" and backends_available.c_compiler() is None:
        pytest.skip("no C compiler")


def _grad(pattern, step, shape, gen, first):
    g = torch.randn(shape, generator=gen)
    if pattern == "huge":
        return g * 1e30
    kind, _, once = pattern.partition("_")
    if first and kind in ("nan", "posinf", "neginf") and not (once and step > 0):
        g.view(-1)[POISONED] = {"nan": float("nan"), "posinf": float("inf"), "neginf": -float("inf")}[kind]
    return g


def _run(cls, pattern, dtype, flags):
    """Params and their param-shaped states after STEPS steps, as {name: tensor}."""
    gen = torch.Generator().manual_seed(0)
    info = BY_NAME[cls.__name__]
    sizes = MATRIX_SIZES if info.param_ndims == (2,) else SIZES
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]
    kw = dict(info.stateful)  # every state (SGD's momentum buffer, RMSprop's grad_avg)
    if pattern == "wd_inf":
        kw["weight_decay"] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimi's weight-decay advice
        opt = cls(params, lr=1e-2, **kw, **flags)
        for step in range(STEPS):
            for i, p in enumerate(params):
                p.grad = _grad(pattern, step, p.shape, gen, i == 0).to(dtype)
            opt.step()
    out = {}
    for i, p in enumerate(params):
        out[f"param{i}"] = p.detach().float()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
                out[f"param{i}.{k}"] = v.float()
    return out


def _masks(values):
    return {k: (v.isnan(), v.isposinf(), v.isneginf()) for k, v in values.items()}


def _describe(values):
    return {k: (v.isnan().nonzero().flatten().tolist(), v.isposinf().nonzero().flatten().tolist(),
                v.isneginf().nonzero().flatten().tolist()) for k, v in values.items()}


def _assert_same_places(got, want, what):
    assert got.keys() == want.keys(), what
    mg, mw = _masks(got), _masks(want)
    bad = [k for k in want if not all(torch.equal(a, b) for a, b in zip(mg[k], mw[k]))]
    if bad:  # (NaN, +inf, -inf) indices per tensor
        dg, dw = _describe(got), _describe(want)
        raise AssertionError(f"{what}: non-finite values in other places: " +
                             "; ".join(f"{k}: got {dg[k]}, want {dw[k]}" for k in bad))


def _cls(stem):
    module = builtin_module(stem)
    return getattr(module, module._INFO.name)


def _patterns(stem):
    """The patterns a spec can run: ``wd_inf`` needs weight decay (Rprop has none)."""
    return [p for p in PATTERNS if p != "wd_inf" or BY_STEM[stem].weight_decay]


CASES = [(stem, pattern) for stem in SPECS for pattern in _patterns(stem)]


@functools.lru_cache(maxsize=None)
def _eager(stem, pattern, dtype):
    values = _run(_cls(stem), pattern, dtype, BACKENDS["eager"])
    kind, _, once = pattern.partition("_")
    if kind in ("nan", "posinf", "neginf"):  # (huge grads and inf decay may stay finite)
        if once and BY_STEM[stem].forgets_nonfinite:  # Rprop: the next step's gradient replaces it
            assert all(v.isfinite().all() for v in values.values()), f"{stem} must forget a one-off {kind}"
        else:
            assert any(not v.isfinite().all() for v in values.values()), "the pattern must reach the result"
    return values


@pytest.mark.parametrize("stem, pattern", CASES)
def test_eager_nonfinite_places_match_the_oracle(stem, pattern):
    """optimi for its classes, torch.optim for the torch family (BY_STEM[stem].oracle)."""
    pytest.importorskip("optimi")
    oracle, flags = BY_STEM[stem].oracle
    ref = _run(oracle, pattern, torch.float32, flags)
    _assert_same_places(_eager(stem, pattern, torch.float32), ref,
                        f"{stem} eager vs {oracle.__module__}.{oracle.__name__}, {pattern}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["foreach", "triton", "fused"])
@pytest.mark.parametrize("stem, pattern", CASES)
def test_backend_nonfinite_places_match_eager(stem, pattern, backend, dtype, request):
    _skip_unavailable(backend)
    if (stem, pattern, backend) == ("rmsprop", "huge", "triton"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "centered RMSprop, grads ×1e30: torch's addcmul(v, ḡ, ḡ, value=-1) is a fused multiply-add, "
            "so inf − ḡ² (ḡ² = 1e56 unrounded) stays inf and g/√ṽ = 0, as in the fused C kernel; the Triton "
            "kernel rounds ḡ² to inf first and gets inf − inf = NaN (codegen/triton.py: needs tl.fma there)")))
    got = _run(_cls(stem), pattern, dtype, BACKENDS[backend])
    _assert_same_places(got, _eager(stem, pattern, dtype), f"{stem} {backend} vs eager, {pattern}, {dtype}")


# Max/Min drop a NaN operand (elementwise, tensor with scalar, on per-tensor and host scalars);
# a max reduction propagates it. Checked against plain torch on every backend.
NAN_SPEC = '''
"""Max/Min with NaN operands: elementwise, with a scalar, of a reduction and on the host."""
from optcompile.spec import Abs, Interval, Max, Min, OptimizerSpec, oo

spec = OptimizerSpec("NanMaxMin", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
cap = spec.hyper("cap", default=2.0, doc="Clip")
g = spec.grad
m = spec.state("exp_avg")
m = spec.assign(m, Max(g, m) + Min(g, -0.5) + Min(Abs(g), cap))
peak = spec.max(Abs(g))
scale = spec.let("scale", 1 / Max(1, peak))
host = spec.let("host", Max(cap, lr) * Min(cap, 3))
spec.update(m * scale * host, lr=lr)
'''


def _nan_reference(p, m, g, lr, cap):
    m = torch.fmax(g, m) + torch.fmin(g, torch.tensor(-0.5)) + torch.fmin(g.abs(), torch.tensor(cap))
    peak = g.abs().max()  # NaN: the reduction propagates it ...
    scale = 1 / torch.fmax(torch.tensor(1.0), peak)  # ... and Max(1, NaN) drops it
    host = torch.fmax(torch.tensor(cap), torch.tensor(lr)) * torch.fmin(torch.tensor(cap), torch.tensor(3.0))
    return p - lr * (m * scale * host), m


@pytest.mark.parametrize("cap", [2.0, float("nan")], ids=["cap2", "capnan"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_max_min_drop_nan_and_max_reduction_keeps_it(tmp_path, backend, cap):
    _skip_unavailable(backend)
    path = tmp_path / "nanmaxmin.py"
    path.write_text(NAN_SPEC)
    cls = compile_spec(path)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(37, generator=gen)
    g = torch.randn(37, generator=gen) * 3
    g[POISONED] = float("nan")
    p = torch.nn.Parameter(p0.clone())
    opt = cls([p], lr=0.1, cap=cap, **BACKENDS[backend])
    p.grad = g.clone()
    opt.step()
    want_p, want_m = _nan_reference(p0, torch.zeros(37), g, 0.1, cap)
    assert want_m.isfinite().all() == (cap == cap) and want_p.isfinite().sum() >= 36  # not a vacuous check
    torch.testing.assert_close(opt.state[p]["exp_avg"], want_m, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(p.detach(), want_p, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_host_math_is_ieee_and_identical_to_math_for_other_values():
    """Host and per-tensor values follow IEEE like the kernels (NaN, ±inf) where Python's math
    raises, and equal ``math`` bit for bit elsewhere (optimi's bias corrections stay identical)."""
    import math

    from optcompile import runtime
    assert math.isnan(runtime.sqrt(-math.inf)) and math.isnan(runtime.sqrt(-1.0)) and math.isnan(runtime.sqrt(math.nan))
    assert runtime.rsqrt(0.0) == math.inf and math.isnan(runtime.rsqrt(-2.0))
    assert runtime.reciprocal(0.0) == math.inf and runtime.reciprocal(-0.0) == -math.inf
    assert runtime.log(0.0) == -math.inf and math.isnan(runtime.log(-1.0)) and runtime.log(math.inf) == math.inf
    assert runtime.power(10.0, 400.0) == math.inf and runtime.power(-10.0, 401.0) == -math.inf
    assert runtime.power(0.0, -1.0) == math.inf and runtime.power(-0.0, -3.0) == -math.inf
    assert runtime.power(-0.0, -2.0) == math.inf and math.isnan(runtime.power(-8.0, 1 / 3))
    for x, y in [(0.999, 7), (0.9, 1e6), (2.0, -3), (-2.0, 3.0), (0.96, 0.004 * 11), (5, 2), (math.nan, 0.0)]:
        assert runtime.power(x, y) == x ** y
    for x in (0.0, 1e-300, 0.5, 1 - 0.999**7, 2.0, 1e300, math.inf):
        assert runtime.sqrt(x) == math.sqrt(x)
        assert x == 0 or runtime.rsqrt(x) == 1.0 / math.sqrt(x)
        assert x == 0 or runtime.reciprocal(x) == 1.0 / x
        assert x == 0 or runtime.log(x) == math.log(x)


# clamp propagates NaN like torch.clamp (from x and from either bound; lo > hi gives hi), unlike
# Max/Min: elementwise with host, tensor, mixed and one-sided bounds, on a per-tensor value and on
# the host. Checked against plain torch on every backend, fp32 and bf16.
CLAMP_SPEC = '''
"""clamp with NaN operands: elementwise, per tensor and on the host."""
from optcompile.spec import Abs, Interval, OptimizerSpec, clamp, oo

spec = OptimizerSpec("NanClamp", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
lo = spec.hyper("lo", default=-0.5)
hi = spec.hyper("hi", default=0.5)
g = spec.grad
m = spec.state("exp_avg", init=0.25)
m = spec.assign(m, clamp(g, lo, hi) + clamp(m + 1, -Abs(g), Abs(g)) + clamp(g, lo=lo) + clamp(g, -1, Abs(g) + 0.5))
s = spec.let("s", clamp(spec.max(Abs(g)), 0, 4))
h = spec.let("h", clamp(hi * 10, lo, 3))
spec.update(m * s * h, lr=lr)
'''


def _clamp_reference(p, g, lr, lo, hi):
    m = torch.full_like(p, 0.25)
    m = (torch.clamp(g, lo, hi) + torch.clamp(m + 1, -g.abs(), g.abs()) + torch.clamp(g, min=lo)
         + torch.clamp(torch.clamp(g, min=-1.0), max=g.abs() + 0.5))
    s = torch.clamp(g.abs().max(), 0, 4)
    h = torch.clamp(torch.tensor(hi * 10), lo, 3)
    return p - lr * (m * s * h), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bounds", [(-0.5, 0.5), (float("nan"), 0.5), (-0.5, float("nan")), (1.0, 0.5)],
                         ids=["finite", "lo_nan", "hi_nan", "lo_above_hi"])
@pytest.mark.parametrize("poison", [False, True], ids=["clean", "nan_grad"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_clamp_propagates_nan_like_torch(tmp_path, backend, poison, bounds, dtype):
    _skip_unavailable(backend)
    path = tmp_path / "nanclamp.py"
    path.write_text(CLAMP_SPEC)
    cls = compile_spec(path)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(77, generator=gen).to(dtype).float()
    g = (torch.randn(77, generator=gen) * 2).to(dtype).float()
    if poison:
        g[POISONED] = float("nan")
    lo, hi = bounds
    p = torch.nn.Parameter(p0.clone().to(dtype))
    opt = cls([p], lr=0.1, lo=lo, hi=hi, kahan_sum=False, **BACKENDS[backend])
    p.grad = g.clone().to(dtype)
    opt.step()
    want_p, want_m = _clamp_reference(p0, g, 0.1, lo, hi)
    nans = want_p.isnan()
    assert nans.all() == (poison or lo != lo or hi != hi) and (nans.any() or want_p.isfinite().all())
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    torch.testing.assert_close(opt.state[p]["exp_avg"].float(), want_m, **tol, equal_nan=True)
    torch.testing.assert_close(p.detach().float(), want_p, **tol, equal_nan=True)
    assert torch.equal(p.detach().float().isnan(), nans)


ZERO_SUM_SPEC = '''
"""Per-tensor divisions by a zero sum, and by numel, of a zero gradient."""
from optcompile.spec import Abs, Interval, Max, OptimizerSpec, oo

spec = OptimizerSpec("ZeroSum", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
g = spec.grad
s, s2 = spec.sum(Abs(g)), spec.sum(g**2)
r = spec.let("r", spec.numel / s + s / spec.numel)
spec.update(g + r, lr=lr * Max(1, s / s2))
'''


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_per_tensor_division_by_zero_is_ieee(tmp_path, backend):
    """``n/0 = inf``, ``0/0 = nan`` for per-tensor values in every backend (the eager and foreach
    code computes them as Python floats, which would raise ZeroDivisionError)."""
    _skip_unavailable(backend)
    path = tmp_path / "zerosum.py"
    path.write_text(ZERO_SUM_SPEC)
    cls = compile_spec(path)
    p = torch.nn.Parameter(torch.ones(5))
    opt = cls([p], lr=0.1, **BACKENDS[backend])
    p.grad = torch.zeros(5)
    opt.step()  # r = 5/0 + 0/5 = inf; Max(1, 0/0) = Max(1, nan) = 1: p − 0.1·inf
    assert (p.detach() == -float("inf")).all()
