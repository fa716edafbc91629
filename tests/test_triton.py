"""The Triton backend against the eager backend (the reference), under the Triton interpreter.

Every built-in spec (parametrized over ``builtin_specs()``, so new specs are covered) runs 10
steps on both backends over three param groups with different hyperparameters and odd sizes
(1 element, BLOCK_SIZE ± 1, a 2-D tensor, many tiny tensors); params and every state entry are
compared. The interpreter runs kernels in numpy on CPU, so sizes stay small.

``OPTCOMPILE_TEST_DEVICE=cuda`` runs the same tests with compiled kernels on the GPU (tensors on
CUDA, no interpreter; benchmarks/gpu_check.sh); unset or ``cpu``, the interpreter on CPU.
"""
import os

DEVICE = os.environ.get("OPTCOMPILE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
elif DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels; read when the kernels are defined
else:
    raise RuntimeError(f"OPTCOMPILE_TEST_DEVICE={DEVICE!r}: expected 'cpu' (default: the Triton interpreter) "
                       "or 'cuda' (compiled kernels on the GPU)")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import sympy  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"OPTCOMPILE_TEST_DEVICE=cuda but torch.cuda.is_available() is False (torch "
                       f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")

from optcompile.codegen.triton import TritonPrinter  # noqa: E402
from optcompile.kernel_plan import ordered_terms  # noqa: E402
from optcompile.loader import builtin_module, compile_spec  # noqa: E402
from optimizers import BACKENDS, BY_STEM, STEMS, class_ndims, param_shapes  # noqa: E402

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 1024  # BLOCK_SIZE of the generated kernels
SIZES = [(1,), (BLOCK - 1,), (BLOCK + 1,), (17, 33)] + [(3,)] * 6
STEPS = 10

# fp32: each backend rounds every op once, but they group ops differently (torch's fused lerp /
# add-with-alpha use FMAs, the kernels evaluate the IR's sums left to right), so values drift
# apart by a few ulp over 10 steps. Measured: largest gap 2.1e-6 on params of magnitude up to ~4,
# at most ~1/4 of this tolerance for any spec; a wrong term moves values by >1e-4.
FP32 = dict(rtol=1e-5, atol=1e-6)


def _groups(cls, params):
    """Three groups: defaults, another lr with weight decay, fully decoupled decay (+ momentum)."""
    keys = cls._info.keys
    a, b, c = params[:2], params[2:4], params[4:]
    second = {"params": b, "lr": 3e-3}
    third = {"params": c, "lr": 2e-3}
    if "weight_decay" in keys:
        second["weight_decay"] = 0.1
        third["weight_decay"] = 0.05
    if "decouple_lr" in keys:
        third["decouple_lr"] = True
    if "momentum" in keys:
        second["momentum"] = 0.9
        third["momentum"] = 0.8
        third["dampening"] = True
    return [{"params": a}, second, third]


def _run(cls, dtype, backend, steps=STEPS, sizes=SIZES, **kw):
    torch.manual_seed(0)
    sizes = param_shapes(class_ndims(cls), sizes)
    params = [torch.nn.Parameter(torch.randn(s).to(DEVICE, dtype)) for s in sizes]
    flags = BACKENDS[backend].flags
    opt = cls(_groups(cls, params), lr=1e-3, **flags, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
        opt.step()
    return params, opt


def _pairs(cls, dtype, **kw):
    """(name, eager tensor, triton tensor) for every param and every floating state entry."""
    pe, oe = _run(cls, dtype, "eager", **kw)
    pt, ot = _run(cls, dtype, "triton", **kw)
    out = []
    for i, (a, b) in enumerate(zip(pe, pt)):
        out.append((f"param{i}", a.detach(), b.detach()))
        for k, v in oe.state[a].items():
            w = ot.state[b][k]
            assert (v is None) == (w is None), k
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out.append((f"param{i}.{k}", v, w))
    return out


def _class(stem):
    mod = builtin_module(stem)
    return getattr(mod, mod._INFO.name)


SPECS = STEMS


@pytest.mark.parametrize("stem", SPECS)
def test_fp32_matches_eager(stem):
    for name, e, t in _pairs(_class(stem), torch.float32):
        state = name.partition(".")[2] or None  # a summed state: a few ulps of its largest |value|
        tol = {**FP32, "atol": BY_STEM[stem].fp32_atol(state, e, FP32["atol"])}
        torch.testing.assert_close(t, e, **tol, msg=lambda m: f"{stem} {name}: {m}")


@pytest.mark.parametrize("stem", SPECS)
def test_bf16_matches_eager(stem):
    """Both backends compute in fp32 and round once per store (RNE), so values agree to the bit
    except where the two op groupings land an fp32 value on opposite sides of a bf16 rounding
    boundary; a state that differs by 1 ulp can carry it to the next step. Measured over 10 steps:
    params and moments bit-exact for most specs, at most 0.9% of elements off by 1-2 ulp (Lion's
    lerp, Adan, StableAdamW's reduction order); ``kahan_comp`` off in under 0.6%. Bounds: at most
    2% of elements differ; each by at most 2 bf16 ulp of the tensor's largest value (a flip decays
    with the state, so its ulp is that of the value when it happened), and ``kahan_comp`` (a
    residual below the param's ulp) by at most 2**-10 of its param."""
    _assert_low_precision_close(_pairs(_class(stem), torch.bfloat16), ulp=2 ** -7, what=stem)


def _assert_low_precision_close(pairs, ulp: float, what: str) -> None:
    params = {n: e.float().abs() for n, e, _ in pairs if "." not in n}
    for name, e, t in pairs:
        e32, t32 = e.float(), t.float()
        differ = (e32 != t32).float().mean().item()
        assert differ <= 0.02, f"{what} {name}: {differ:.1%} of elements differ"
        if name.endswith("kahan_comp"):
            scale = params[name.split(".")[0]] * 2 ** -10
        else:  # a 1-ulp flip at some step decays with the state, so bound it by the tensor's scale
            scale = torch.maximum(e32.abs(), t32.abs()).clamp_min(e32.abs().max().item()) * 2 * ulp
        bad = (e32 - t32).abs() > scale + 1e-30
        assert not bad.any(), f"{what} {name}: {e32[bad][:4].tolist()} vs {t32[bad][:4].tolist()}"


def test_bf16_params_bit_exact_adamw():
    """No Kahan: the stored values themselves are bit-identical to eager (RNE stores in both)."""
    for name, e, t in _pairs(_class("adamw"), torch.bfloat16, kahan_sum=False):
        assert torch.equal(e, t), name


def test_fp16_matches_eager_adamw():
    """fp16 stores use the cast (round-to-nearest-even in the interpreter and on GPUs). fp16 keeps
    3 more bits than bf16, so a last-bit fp32 difference flips its rounding more often; same bounds
    as bf16 in fp16 ulps (measured: 0.1-0.4% of moment elements off by 1 ulp)."""
    pairs = _pairs(_class("adamw"), torch.float16, steps=5)
    _assert_low_precision_close(pairs, ulp=2 ** -10, what="adamw fp16")


def test_fp64_falls_back_to_eager_with_a_warning():
    """The kernels compute in fp32; fp64 params run on the for-loop backend instead of silently
    losing precision."""
    from optcompile.backends import triton_runtime
    triton_runtime._WARNED.clear()
    cls = _class("adamw")
    with pytest.warns(UserWarning, match="Triton kernels skipped.*float64"):
        pairs = _pairs(cls, torch.float64, steps=2, sizes=[(5,), (3,)])
    for name, e, t in pairs:
        assert torch.equal(e, t), name


def test_optimizer_accumulation_and_single_tensor_path():
    """The functional API on single tensors is the gradient-release path: a one-entry table."""
    mod = builtin_module("adamw")
    torch.manual_seed(0)
    p0 = torch.randn(BLOCK + 5).to(DEVICE)
    out = {}
    for triton in (False, True):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        step = torch.tensor(0, dtype=torch.int32)
        gen = torch.Generator().manual_seed(2)
        for i in range(4):
            g = torch.randn(p.shape, generator=gen).to(DEVICE)
            mod.adamw(p, g, m, v, None, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-6, step=step,
                      triton=triton, gradient_release=True, optimizer_accumulation=(i % 2 == 0))
        out[triton] = (p, m, v)
    for e, t in zip(out[False], out[True]):
        torch.testing.assert_close(t, e, **FP32)
    assert not torch.equal(out[True][0], p0)


class _Counter:
    """Wraps a kernel: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("name, per_step", [("adamw", 1), ("stableadamw", 3)])
def test_launches_do_not_grow_with_params(monkeypatch, name, per_step):
    if not (ROOT / "specs" / f"{name}.py").exists():
        pytest.skip(f"specs/{name}.py not present")
    mod = builtin_module(name)
    cls = getattr(mod, mod._INFO.name)
    step_fn = mod._INFO.backend("triton")
    log = []
    for attr, value in vars(step_fn.module).items():
        if attr.endswith("_kernel"):
            monkeypatch.setattr(step_fn.module, attr, _Counter(value, log))
    counts = {}
    for n in (3, 30):
        params = [torch.nn.Parameter(torch.randn(5 + i).to(DEVICE)) for i in range(n)]
        opt = cls(params, lr=1e-3, triton=True)
        for p in params:
            p.grad = torch.randn_like(p)
        log.clear()
        opt.step()
        opt.step()
        counts[n] = len(log)
    assert counts[3] == counts[30] == 2 * per_step, counts


def test_tables_are_cached_while_params_are_unchanged():
    from optcompile.backends import triton_runtime as rt
    rt.clear_tables()
    cls = _class("adamw")
    params = [torch.nn.Parameter(torch.randn(16 * (i + 1)).to(DEVICE)) for i in range(4)]
    opt = cls(params, lr=1e-3, triton=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)  # fresh tensors: new grad pointers, same sizes
        opt.step()
    assert len(rt._LAYOUTS) == 1
    plan = rt.launch_plan([params, [p.grad for p in params]], BLOCK)
    assert plan.aligned  # 16-element tensors from torch's allocator: the vector-load variant
    grads = [p.grad for p in params]
    before = len(rt._POINTERS)
    opt.step()
    opt.step()  # same grads, same states: no new pointer table
    assert len(rt._POINTERS) == before and all(p.grad is g for p, g in zip(params, grads))


def test_cpu_without_interpreter_raises_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = textwrap.dedent("""
        import torch
        from optcompile import AdamW
        p = torch.nn.Parameter(torch.randn(4))
        p.grad = torch.randn(4)
        try:
            AdamW([p], lr=1e-3, triton=True).step()
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ERROR:" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "before triton is imported" in out.stdout
    assert "triton=False" in out.stdout


def test_kernels_compile_for_a_gpu_target():
    """The interpreter is lenient about types; the real compiler is not. Compile every generated
    kernel (bf16, every flag on, ALIGNED) to PTX for sm_80 without a GPU, in a process without
    the interpreter, and check the alignment hints give 128-bit vector loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = textwrap.dedent("""
        import importlib.util, sys
        from pathlib import Path
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        failed = []
        for path in sorted(Path("generated").glob("*_triton.py")):
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            for name, fn in vars(mod).items():
                if not name.endswith("_kernel"):
                    continue
                sig, consts = {}, {}
                for p in fn.params:
                    n = p.name
                    if p.is_constexpr:
                        sig[n] = "constexpr"
                        bf16 = n in ("DTYPE", "GRAD_DTYPE") or n.startswith("DTYPE_")  # every storage bf16
                        consts[n] = tl.bfloat16 if bf16 else {"BLOCK_SIZE": 1024}.get(n, True)
                    elif n.endswith(("_partials", "_totals")):
                        sig[n] = "*fp32"
                    elif n.endswith("_ptrs") or n.lstrip("_") in ("numels", "program_tensor", "program_start",
                                                      "tensor_first_program", "tensor_offsets", "tensor_keys", "sizes",
                                                      "broadcast"):
                        sig[n] = "*i64"
                    elif n.startswith("_spill"):
                        sig[n] = "*fp32"
                    else:
                        sig[n] = "fp32"
                try:
                    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                       target=GPUTarget("cuda", 80, 32))
                except Exception as e:
                    failed.append(f"{name}: {type(e).__name__}: {e}")
                    continue
                if "reduce" not in name and "ld.global.v4" not in k.asm["ptx"]:
                    failed.append(f"{name}: ALIGNED=True but no 128-bit loads in the PTX")
                print("ok", name)
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0 and "ok " not in out.stdout and "GPUTarget" in out.stderr:
        pytest.skip("this triton build cannot compile for a CUDA target offline")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("ok ") >= len(SPECS)


# ── user specs: reductions of every kind, values recomputed across stages ──────────────────────
REDUCING_SPEC = '''
"""A test optimizer with sum, mean and max reductions over tensors larger than one block."""
from optcompile.spec import Abs, Interval, Max, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("Reducing", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
spec.weight_decay_hyper(0.0)
g = spec.grad
m = spec.state("exp_avg")
m = spec.assign(m, 0.9 * m + 0.1 * g)
scaled = spec.let("scaled", g * 3)
peak = spec.max(Abs(m))  # used bare: lowering rejects a `let` of a bare reduction symbol
total = spec.sum(m)
rms = spec.let("rms", sqrt(spec.mean(m**2)))
spec.update(m / Max(peak, 1e-3) + scaled * 0.01 + total * 1e-4 - rms * 0.1, lr=lr)
'''


def test_user_spec_reductions_and_recompute(tmp_path):
    path = tmp_path / "reducing.py"
    path.write_text(REDUCING_SPEC)
    cls = compile_spec(path)
    sizes = [(1,), (BLOCK + 1,), (3 * BLOCK - 1,), (5,)]
    for dtype in (torch.float32, torch.bfloat16):
        for name, e, t in _pairs(cls, dtype, steps=3, sizes=sizes, kahan_sum=False):
            if dtype == torch.float32:
                torch.testing.assert_close(t, e, rtol=1e-4, atol=1e-5)  # sums over 3k elements
            else:
                assert ((e.float() - t.float()).abs() <= e.float().abs() * 2 ** -7 + 1e-6).all(), name


STALE_SPEC = '''
"""Reads a value after a reduction that was computed from a buffer overwritten before it."""
from optcompile.spec import Interval, OptimizerSpec, oo

spec = OptimizerSpec("Stale", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
g = spec.grad
m = spec.state("exp_avg")
old = spec.let("old", m * g)
m = spec.assign(m, 0.9 * m + 0.1 * g)
spec.update(old * spec.mean(m), lr=lr)
'''


def test_value_crossing_a_reduction_goes_through_scratch(tmp_path):
    """``old`` is computed from ``exp_avg`` before it is overwritten and read after the reduction:
    the kernel plan spills it to fp32 scratch (it cannot be recomputed from memory), so the spec
    gets real kernels, without a warning, that agree with the eager backend."""
    from optcompile import kernel_plan
    from optcompile.compiler import as_spec, build_program
    path = tmp_path / "stale.py"
    path.write_text(STALE_SPEC)
    plan = kernel_plan.build(build_program(as_spec(path)))
    assert [b.value for b in plan.spills] == ["old"]
    assert [a.buffer for a in plan.stages[0].stores if a.buffer.startswith("spill")] == ["spill_old"]
    assert "spill_old" in [a.buffer for a in plan.stages[1].loads]
    cls = compile_spec(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = _pairs(cls, torch.float32, steps=3, sizes=[(5,), (3,), (1500,)])
    for name, e, t in pairs:
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7, msg=name)  # the mean's sum order differs


# ── printer golden strings ─────────────────────────────────────────────────────────────────────
def test_printer_golden():
    g, v, eps, x = sympy.symbols("g v eps x", real=True)
    flag = sympy.Symbol("flag")
    p = TritonPrinter(constexpr={"flag"})
    assert p.doprint(g**2 / sympy.Max(v, eps**2)) == \
        "g * g/tl.maximum(v, eps * eps, propagate_nan=tl.PropagateNan.NONE)"  # Max drops a NaN operand
    assert p.doprint(x / sympy.sqrt(v)) == "tl.rsqrt(v)*x"
    assert p.doprint(ordered_terms(x / (sympy.sqrt(v) + eps), {"x", "v"})) == "x/(tl.sqrt(v) + eps)"
    assert p.doprint(x / v**2) == "x/(v * v)"
    assert p.doprint(sympy.Rational(1, 4) * x) == "0.25*x"
    assert p.doprint(sympy.sign(x)) == "tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))"
    assert p.doprint(sympy.Piecewise((x, x > 0), (g, True))) == "tl.where((x > 0.0), x, g)"
    assert p.doprint(sympy.Piecewise((x, flag), (g, True))) == "(x if flag else g)"
    assert p.doprint(ordered_terms(sympy.Abs(x) + 1, {"x"})) == "tl.abs(x) + 1.0"  # the plan's term order
    assert p.doprint(ordered_terms(eps + g + v, {"g", "v"})) == "g + v + eps"
    with pytest.raises(NotImplementedError):
        p.doprint(sympy.Mod(x, 3))


def test_show_prints_the_kernel():
    out = subprocess.run([sys.executable, "-m", "optcompile", "show", "specs/adamw.py", "--backend", "triton"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "@triton.jit" in out.stdout and "def _adamw_kernel(" in out.stdout and "def _triton_adamw(" in out.stdout
