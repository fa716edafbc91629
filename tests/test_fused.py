"""The fused C backend against the eager backend (the reference), for every built-in spec.

Both compute in fp32 and round once per store, so they differ only where the C compiler
associates or contracts (FMA) an expression differently from torch's op-by-op evaluation:
a few fp32 ulps, which in bf16 shows up as an occasional one-ulp difference when the fp32
value sits next to a rounding boundary. Tolerances below say this per dtype.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from optcompile import backends_available
from optcompile.backends import fused_runtime
from optcompile.loader import builtin_module, compile_spec
from optcompile.paths import generated_dir
from optcompile.runtime import run_functional
from optimizers import BACKENDS, BY_STEM, STEMS, class_ndims, param_shapes

pytestmark = [pytest.mark.fused,
              pytest.mark.skipif(backends_available.c_compiler() is None, reason="no C compiler")]

SPECS = STEMS
CHUNK = 16384  # OC_CHUNK in templates/fused.c.j2
SHAPES = [(), (1,), (0,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (33, 7)]
# hyperparameters that switch on every pass a spec has (weight decay, momentum, dampening …)
OPTIONS = {stem: BY_STEM[stem].kernel for stem in STEMS}


def _group(cls, kw):
    """A param group as the class builds it (defaults filled in), without its params."""
    (shape,) = param_shapes(class_ndims(cls), [(1,)])[:1]
    opt = cls([torch.zeros(shape, requires_grad=True)], lr=1e-2, **{k: v for k, v in kw.items() if _accepts(cls, k)})
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def _accepts(cls, name):
    import inspect
    return name in inspect.signature(cls.__init__).parameters


def _setup(name, shapes, dtype, kahan, seed=0):
    module = builtin_module(name)
    info, cls = module._INFO, getattr(module, module._INFO.name)
    gen = torch.Generator().manual_seed(seed)
    shapes = param_shapes(info.extra.get("param_ndims", ()), shapes)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return info, cls, params, grads


def _run(name, kw, dtype, kahan, backend, steps, shapes=SHAPES, accumulate_at=(), seed=0):
    info, cls, params, grads0 = _setup(name, shapes, dtype, kahan, seed)
    group = _group(cls, kw)
    hypers = {k: group[k] for k in info.keys}
    states = [{} for _ in params]
    for p, g, st in zip(params, grads0, states):
        p.grad = g
        info.init_state(st, p, group, kahan)
    step = torch.tensor(0, dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed + 1)
    flags = BACKENDS[backend].flags
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        run_functional(info, params, grads, [[st[s] for st in states] for s in info.states],
                       [st["kahan_comp"] for st in states], hypers, step=step if info.uses_step else None,
                       kahan_sum=kahan, optimizer_accumulation=k in accumulate_at, **flags,
                       scalar_states=[[st[s] for st in states] for s in info.scalar_states])
    return params, states


def _compare(a, b, dtype, what, ulps=4, fp32_atol=2e-6):
    """fp32: a few ulps per step from association / FMA contraction, accumulated over steps
    (``fp32_atol``: more for a summed state, OptimizerInfo.fp32_atol).
    bf16: those fp32 ulps flip a rounding rarely; a flip is one bf16 ulp (2^-8..2^-7 relative)
    and a flipped state moves later steps by a few more. Returns the number of differing values."""
    a, b = a.float(), b.float()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    if dtype == torch.float32:
        torch.testing.assert_close(b, a, rtol=2e-5, atol=fp32_atol, msg=what)
        return 0
    diff = (a - b).abs()
    ulp = torch.maximum(a.abs(), b.abs()) * 2.0 ** -7
    # plus: a flipped value feeds later steps (an update, Adan's gradient difference) and moves
    # them by about one ulp of the tensor's typical magnitude
    atol = 0.0 if ulps == 1 else ulps * 2.0 ** -7 * float(a.abs().mean()) + 5e-4
    assert (diff <= ulps * ulp + atol + 1e-30).all(), f"{what}: more than {ulps} bf16 ulps apart"
    return int((diff > 0).sum())


@pytest.mark.parametrize("dtype,kahan", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-kahan"])
@pytest.mark.parametrize("name", SPECS)
def test_fused_matches_eager(name, dtype, kahan):
    """Params and every state entry, odd sizes (0-d, empty, chunk ± 1), accumulation micro-steps,
    enough steps for RAdam's rectification to switch on (ρ_t > 5 from step 6)."""
    flips = total = 0
    for kw in OPTIONS[name]:
        ref_p, ref_s = _run(name, kw, dtype, kahan, "eager", steps=7, accumulate_at=(2,))
        out_p, out_s = _run(name, kw, dtype, kahan, "fused", steps=7, accumulate_at=(2,))
        for i, (a, b) in enumerate(zip(ref_p, out_p)):
            flips += _compare(a, b, dtype, f"{name} {kw} param {i} {tuple(a.shape)}")
            total += a.numel()
        for i, (sa, sb) in enumerate(zip(ref_s, out_s)):
            for key, va in sa.items():
                if key == "kahan_comp" and va is not None:  # compare what it compensates: param + comp
                    _compare(ref_p[i].float() + va.float(), out_p[i].float() + sb[key].float(), dtype,
                             f"{name} {kw} param {i} + kahan_comp")
                elif isinstance(va, torch.Tensor) and va.dim() == out_p[i].dim():
                    flips += _compare(va, sb[key], dtype, f"{name} {kw} state {key} of param {i}",
                                      fp32_atol=BY_STEM[name].fp32_atol(key, va, 2e-6))
                    total += va.numel()
    # measured: 0.01-0.1% for most specs; up to ~1.5% in Adan's exp_avg_diff, an average of
    # gradient differences where β·m + (1−β)·Δg cancels, so fp32 ulps of the operands (torch's
    # lerp formula vs ours) are large against the result and flip its bf16 rounding more often
    assert flips <= 0.02 * total, f"{flips} of {total} values differ"


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_bf16_one_step_is_one_ulp_at_most(name):
    """From identical inputs one step differs only where fp32 rounding flips a bf16 rounding."""
    kw = OPTIONS[name][0]
    flips = total = 0
    for kahan in (False, True):
        ref_p, ref_s = _run(name, kw, torch.bfloat16, kahan, "eager", steps=1)
        out_p, out_s = _run(name, kw, torch.bfloat16, kahan, "fused", steps=1)
        for i, (a, b) in enumerate(zip(ref_p, out_p)):
            flips += _compare(a, b, torch.bfloat16, f"{name} param {i}", ulps=1)
            total += a.numel()
    assert flips <= 0.001 * total, f"{flips} of {total}"


@pytest.mark.parametrize("kahan", [False, True], ids=["bf16", "bf16-kahan"])
@pytest.mark.parametrize("name", [s for s in SPECS if not builtin_module(s)._INFO.extra["whole_tensor"]])  # elementwise
# specs: a NaN in a per-tensor reduction (StableAdamW's, Adafactor's) reaches every element
def test_simd_and_scalar_loops_agree_bitwise(name, kahan):
    """A NaN among a chunk's first 16 elements sends the rest of that chunk from the bf16 SIMD loop
    to the scalar loop. Every other element must come out with the same bits either way."""
    kw = OPTIONS[name][0]
    runs = []
    for poison in (False, True):
        info, _, params, grads = _setup(name, [(CHUNK + 1000,)], torch.bfloat16, kahan, seed=5)
        group, states = _group(getattr(builtin_module(name), info.name), kw), [{}]
        params[0].grad = grads[0]  # Adan's prev_grad starts from the first gradient
        info.init_state(states[0], params[0], group, kahan)
        hypers = {k: group[k] for k in info.keys}
        step = torch.tensor(0, dtype=torch.int32)
        for k in range(3):
            g = grads[0] * (1 + k)
            if poison:
                g[3] = float("nan")
            run_functional(info, params, [g], [[states[0][s]] for s in info.states], [states[0]["kahan_comp"]],
                           hypers, step=step if info.uses_step else None, kahan_sum=kahan, fused=True,
                           scalar_states=[[states[0][s]] for s in info.scalar_states])
        runs.append([params[0]] + [v for v in states[0].values() if isinstance(v, torch.Tensor) and v.dim() == 1])
    assert any(torch.isnan(buf[3].float()) for buf in runs[1])  # (Lion's sign(NaN) is 0, as torch's)
    for clean, poisoned in zip(*runs):
        keep = torch.ones(clean.numel(), dtype=torch.bool)
        keep[3] = False
        assert torch.equal(clean[keep].view(torch.int16), poisoned[keep].view(torch.int16))


def test_many_tensors_and_threads_agree():
    """300 tensors in one call, empty ones and tensors of several chunks among them (each thread
    carries its tensor from chunk to chunk); the chunk partition (and so the result) is
    thread-count independent."""
    shapes = [(int(n),) for n in torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(3))]
    for i in (0, 1, 77, 150, 151, 298, 299):
        shapes[i] = (0,)
    for i in (2, 78, 152, 297):
        shapes[i] = (2 * CHUNK + 7,)
    ref_p, _ = _run("adamw", {"weight_decay": 0.1}, torch.float32, False, "eager", 3, shapes)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run("adamw", {"weight_decay": 0.1}, torch.float32, False, "fused", 3, shapes)[0])
    finally:
        torch.set_num_threads(threads)
    for a, b, c, d in zip(ref_p, *runs):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
        assert torch.equal(b, c) and torch.equal(b, d)


def test_non_contiguous_falls_back_correctly():
    module = builtin_module("adamw")
    torch.manual_seed(0)
    base = [torch.randn(40, 30), torch.randn(64)]
    out = {}
    for fused in (False, True):
        ps = [base[0].clone().t().requires_grad_(), base[1].clone().requires_grad_()]  # a transposed view
        opt = module.AdamW(ps, lr=1e-2, fused=fused, foreach=False, triton=False)
        for _ in range(2):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        out[fused] = ps
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


REDUCE_SPEC = '''
"""A test spec with two per-tensor reductions in two stages, like StableAdamW, and L2 decay
(a reassigned grad read by later stages)."""
from optcompile.spec import Interval, Max, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("RmsClipped", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta2 = spec.hyper("beta2", default=0.99, domain=Interval.Ropen(0, 1), doc="Second moment decay")
spec.weight_decay_hyper(0.01)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Epsilon")
g = spec.grad
v = spec.state("exp_avg_sq")
v = spec.assign(v, beta2 * v + (1 - beta2) * g**2)
rms = spec.let("rms", sqrt(spec.mean(g**2 / Max(v, eps**2))))
peak = spec.sum(g * g)  # (a bare reduction: spec.let of a lone symbol is read as a condition)
lr_t = spec.let("lr_t", lr / Max(1, rms))
spec.update(g / (sqrt(v) + eps) / (peak + 1), lr=lr_t)
'''


def test_reduction_spec(tmp_path):
    """Three stages: the mean, then the sum, are complete before their uses; grad (L2-decayed in
    stage 0) goes through a scratch buffer into stages 1 and 2."""
    path = tmp_path / "rmsclipped.py"
    path.write_text(REDUCE_SPEC)
    cls = compile_spec(path)
    torch.manual_seed(0)
    base = [torch.randn(s) for s in SHAPES if s != (0,)] + [torch.randn(3 * CHUNK + 5)]
    out = {}
    for fused in (False, True):
        ps = [b.clone().requires_grad_() for b in base]
        opt = cls(ps, lr=1e-2, fused=fused, foreach=False, triton=False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[fused] = (ps, [opt.state[p]["exp_avg_sq"] for p in ps])
    source = Path(sys.modules[cls._info.module].__file__)
    assert "oc_ptr_spill_grad" in source.with_name(source.stem + "_fused.c").read_text()
    for a, b in zip(out[False][0] + out[False][1], out[True][0] + out[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # sums in another order: ulps


LOOKALIKE_SPEC = '''
"""Element names like the fused kernel's own locals, and a 16-way tensor Piecewise."""
from optcompile.spec import Interval, OptimizerSpec, Piecewise, oo
spec = OptimizerSpec("Lookalike", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
g = spec.grad
m = spec.state("exp_avg")
m = spec.assign(m, 0.9 * m + 0.1 * g)
param_bits = spec.let("param_bits", m * 2 + g)
grad_raw = spec.let("grad_raw", Piecewise(*[(param_bits * (k + 1), g > k / 8 - 1) for k in range(16)], (g, True)))
spec.update(grad_raw + param_bits, lr=lr)
'''


def test_kernel_locals_and_deep_selects(tmp_path):
    """``param_bits``/``grad_raw`` do not collide with the SIMD loop's locals, and a 16-way select
    preprocesses to a small file (each vector macro argument expands once: it was 2^depth, 31 MB
    and 9 s of gcc here). The bf16 fused step runs (no fallback warning) and matches eager."""
    path = tmp_path / "lookalike.py"
    path.write_text(LOOKALIKE_SPEC)
    cls = compile_spec(path)
    module = Path(sys.modules[cls._info.module].__file__)
    source = module.with_name(module.stem + "_fused.c")
    pre = subprocess.run([backends_available.c_compiler(), "-E", "-march=native", "-std=gnu11", "-DOC_DTYPE=1",
                          str(source)], capture_output=True, text=True, check=True).stdout
    assert len(pre) < 4_000_000
    base = torch.randn(CHUNK + 33, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = []
    for fused in (False, True):
        p = base.clone().requires_grad_()
        opt = cls([p], lr=1e-3, fused=fused, foreach=False, triton=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for k in range(3):
                p.grad = (base * (k + 1)).clone()
                opt.step()
        out.append(p.detach().float())
    torch.testing.assert_close(out[1], out[0], rtol=2e-2, atol=1e-3)


IMPOSSIBLE_GUARD_SPEC = '''
"""A state allocated only without the flag and updated only with it: its load and store guards
simplify to False (the fuzzer found the C backend printing `(false) ? …`)."""
from optcompile.spec import *
spec = OptimizerSpec("Impossible", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
f = spec.flag("f", True)
s = spec.state("s", init=1, when=~f)
s = spec.assign(s, 0.5 * s + spec.grad, when=f)  # runs when f and s exists when ~f: never
r = spec.mean(spec.grad ** 2)  # the update reads s in the next stage
spec.update(spec.grad * r + Piecewise((s, ~f), (0, True)), lr=lr)
'''


@pytest.mark.parametrize("f", [True, False])
def test_state_behind_an_impossible_guard(tmp_path, f):
    path = tmp_path / "impossible.py"
    path.write_text(IMPOSSIBLE_GUARD_SPEC)
    cls = compile_spec(path)
    out = []
    for fused in (False, True):
        p = torch.ones(40, requires_grad=True)
        opt = cls([p], lr=0.1, f=f, fused=fused, foreach=False, triton=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                p.grad = torch.full_like(p, 0.5)
                opt.step()
        out.append(p.detach())
    assert torch.equal(out[1], out[0])


def test_printer_golden():
    """Element math as C: squares as products, max as a select that drops a NaN operand (fmaxf's
    semantics, but it vectorises), sign as a difference of comparisons, tensor Piecewise as a ternary."""
    import sympy
    from optcompile.codegen.c import cexpr
    from optcompile.kernel_plan import ordered_terms
    g, v, eps, m = sympy.symbols("grad exp_avg_sq eps exp_avg", real=True)
    assert cexpr(g**2 / sympy.Max(v, eps**2)) == "(grad*grad)/oc_max((eps*eps), exp_avg_sq)"
    assert cexpr(sympy.sign(m)) == "((float)((exp_avg) > 0.0f) - (float)((exp_avg) < 0.0f))"
    assert cexpr(sympy.Piecewise((m, v > 0), (g, True))) == "((exp_avg_sq > 0.0f) ? (exp_avg) : (grad))"
    # sums print in the kernel plan's term order (here: as sympy holds them, both are tensor terms)
    assert cexpr(ordered_terms(v / 3 + 1 / sympy.sqrt(v), {"exp_avg_sq"})) == \
        "(1.0f / sqrtf(exp_avg_sq)) + (0.3333333333333333f)*exp_avg_sq"
    assert cexpr(ordered_terms(eps + m + v, {"exp_avg", "exp_avg_sq"})) == "exp_avg + exp_avg_sq + eps"


def test_vector_printer_golden():
    """The bf16 SIMD loop's math: the same text on 8-lane vectors, selects for Piecewise/sign/Max,
    splats for scalar-only values, and no vector form for functions it lacks (the variant then
    keeps only the scalar loop)."""
    import sympy
    from optcompile.codegen.c import vexpr
    from optcompile.kernel_plan import ordered_terms
    g, v, c0, m = sympy.symbols("grad exp_avg_sq oc_c0 exp_avg", real=True)
    assert vexpr(g**2 / sympy.Max(v, c0), ["oc_c0"]) == "(grad*grad)/oc_vmax(exp_avg_sq, oc_c0)"
    assert vexpr(ordered_terms(-m * c0 / (sympy.sqrt(v) + c0), {"exp_avg", "exp_avg_sq"}), ["oc_c0"]) == \
        "-exp_avg*oc_c0/(oc_vsqrt(exp_avg_sq) + oc_c0)"
    assert vexpr(sympy.sign(m)) == "(oc_vsel((exp_avg) > 0.0f, 1.0f, 0.0f) - oc_vsel((exp_avg) < 0.0f, 1.0f, 0.0f))"
    assert vexpr(sympy.Piecewise((m, (v > 0) & (g < 1)), (g, True))) == \
        "oc_vsel((OC_VMASK(exp_avg_sq > 0.0f) & OC_VMASK(grad < 1.0f)), exp_avg, grad)"
    assert vexpr(sympy.Abs(m) * 2) == "2.0f*oc_vabs(exp_avg)"
    assert vexpr(c0 * 2, ["oc_c0"]) == "OC_VEC(2.0f*oc_c0)"
    assert vexpr(sympy.exp(m)) is None and vexpr(m**sympy.Rational(1, 3)) is None


# ── storage rounding, bit for bit against torch ─────────────────────────────────────────────────
def _converter(tmp_path, dtype_code):
    """The generated file's own OC_STORE (and, in bf16 with AVX2, the SIMD loop's rounding and
    its bf16 and fp32 even/odd loads and stores), compiled alone into float → storage-bits functions."""
    text = (generated_dir() / "adamw_fused.c").read_text()
    start = text.index("#define OC_CHUNK")
    end = text.index("#ifndef OC_SIMD\n#define OC_SIMD 0\n#endif") + len("#ifndef OC_SIMD\n#define OC_SIMD 0\n#endif")
    src = tmp_path / "conv.c"
    src.write_text("#include <stdint.h>\n#include <string.h>\n" + text[start:end] + textwrap.dedent("""
        void convert(const float *in, OC_T *out, int64_t n) {
            for (int64_t i = 0; i < n; i++) out[i] = OC_STORE(in[i]);
        }
        int convert_simd(const float *in, OC_T *out, int64_t n, char *flagged) {  // n: a multiple of 16
        #if OC_SIMD
            for (int64_t i = 0; i < n; i += 16) {
                oc_vf x[2];
                oc_vu bits[2];
                oc_vi nan = {0};
                for (int k = 0; k < 2; k++) {
                    for (int j = 0; j < 8; j++) x[k][j] = in[i + 2 * j + k];  // even, odd elements
                    bits[k] = oc_vrne(x[k], &nan);
                }
                oc_vstore_1(out + i, bits);
                flagged[i / 16] = (char)oc_vany(nan);
                oc_v2 back = oc_vload_1(out + i);  // unpacking gives the rounded values back
                for (int k = 0; k < 2; k++) {
                    oc_vf rounded = oc_vround_1(x[k], &nan);
                    if (!flagged[i / 16] && memcmp(&back.h[k], &rounded, 32)) return -1;
                }
                float wide[16];  // an fp32 buffer's load and store: the same even/odd halves
                oc_v2 halves = oc_vload_0(in + i);
                oc_vu raw[2] = {(oc_vu)halves.h[0], (oc_vu)halves.h[1]};
                oc_vstore_0(wide, raw);
                if (memcmp(&halves.h[0], &x[0], 32) || memcmp(&halves.h[1], &x[1], 32) || memcmp(wide, in + i, 64))
                    return -2;
            }
            return 1;
        #else
            (void)in; (void)out; (void)n; (void)flagged;
            return 0;
        #endif
        }
    """))
    lib = tmp_path / f"conv{dtype_code}.so"
    cc = backends_available.c_compiler()
    subprocess.run([cc, *fused_runtime.FLAGS, f"-DOC_DTYPE={dtype_code}", str(src), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))
    so.convert.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    so.convert_simd.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]

    def convert(x: torch.Tensor, dtype, simd=False):
        out = torch.empty(x.shape, dtype=dtype)
        if not simd:
            so.convert(x.data_ptr(), out.data_ptr(), x.numel())
            return out
        flagged = torch.zeros(x.numel() // 16, dtype=torch.int8)
        rc = so.convert_simd(x.data_ptr(), out.data_ptr(), x.numel(), flagged.data_ptr())
        assert rc != -1, "oc_vload_1(stored) differs from oc_vround_1"
        assert rc != -2, "oc_vload_0 does not give the even/odd halves, or oc_vstore_0 does not put them back"
        return (out, flagged.bool()) if rc == 1 else None
    return convert


EDGE_BITS = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F808001, 0x00008000, 0x00018000, 0x0000FFFF, 0x807FFFFF,
             0x00000001, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
             0xFF7F8000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF]


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 1), (torch.float16, 2)], ids=["bf16", "fp16"])
def test_store_rounding_is_torchs(tmp_path, dtype, code):
    """Ties to even, subnormals, ±inf, the largest finite values (which round to inf), NaNs, and
    200k random bit patterns: the same bits as ``x.to(dtype)`` (NaN payloads may differ)."""
    convert = _converter(tmp_path, code)
    rand = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    bits = torch.tensor([b - 2**32 if b >= 2**31 else b for b in EDGE_BITS], dtype=torch.int64)
    x = torch.cat([bits, rand]).to(torch.int32).view(torch.float32)
    if dtype == torch.float16:  # also the fp16 range edges: 65504, the rounding to inf, subnormals
        x = torch.cat([x, torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 6e-8, -1e-9])])
    ours, ref = convert(x, dtype), x.to(dtype)
    nan = torch.isnan(x)
    assert torch.isnan(ours[nan].float()).all()
    assert torch.equal(ours[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def test_simd_rounding_is_torchs_or_flags_nan(tmp_path):
    """The bf16 SIMD loop rounds without the NaN case: every 16-element block without a NaN gets
    torch's bits, and every block with one is flagged (the scalar loop then redoes it)."""
    convert = _converter(tmp_path, 1)
    rand = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    bits = torch.tensor([b - 2**32 if b >= 2**31 else b for b in EDGE_BITS], dtype=torch.int64)
    x = torch.cat([bits, rand, bits.flip(0)]).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.ones(-x.numel() % 16)])
    got = convert(x, torch.bfloat16, simd=True)
    if got is None:
        pytest.skip("no AVX2: the bf16 SIMD loop is not compiled")
    ours, flagged = got
    blocks_with_nan = torch.isnan(x).view(-1, 16).any(1)
    assert torch.equal(flagged, blocks_with_nan) and flagged.any() and not flagged.all()
    clean = (~blocks_with_nan).repeat_interleave(16)
    assert torch.equal(ours[clean].view(torch.int16), x[clean].to(torch.bfloat16).view(torch.int16))


# ── build cache and fallbacks ───────────────────────────────────────────────────────────────────
def test_library_cache_key(monkeypatch, cache_dir):
    source = generated_dir() / "sgd_fused.c"
    lib = fused_runtime.build(source, 0)
    assert lib.exists() and fused_runtime.build(source, 0) == lib  # second call: the cached file
    monkeypatch.setattr(fused_runtime, "cpu_model", lambda: "another cpu")
    assert fused_runtime.build(source, 0) != lib  # -march=native code belongs to one CPU model


FALLBACK = r'''
import sys, warnings
import torch
from optcompile import AdamW
def run(**kw):
    torch.manual_seed(0)
    ps = [torch.randn(100, requires_grad=True), torch.randn(3, 3, requires_grad=True)]
    opt = AdamW(ps, lr=1e-2, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
    return ps, [str(w.message) for w in caught]
ref, _ = run(foreach=False, triton=False, fused=False)
for mode in sys.argv[1:]:
    out, warned = run(fused=eval(mode))
    assert all(torch.equal(a, b) for a, b in zip(ref, out)), "fallback results differ from eager"
    print(mode, len(warned), warned)
'''


@pytest.mark.parametrize("cc,modes", [("/nonexistent/cc", ["None", "True"]), ("/bin/false", ["True"])],
                         ids=["no-compiler", "compiler-fails"])
def test_fallback_warns_once(tmp_path, cc, modes):
    """No compiler (CC unusable, nothing on PATH) or a failing one: one warning per cause (auto
    choice, explicit fused=True), and the eager results."""
    env = dict(os.environ, CC=cc, PATH=str(tmp_path), OPTCOMPILE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", FALLBACK, *modes], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == modes
    for line in lines:
        assert line.split()[1] == "1", line  # exactly one warning
        assert re.search(r"compiler|C kernel", line), line
