"""Optimizer step time: every built-in optimizer × backend against torch.optim and optimi.

    .venv/bin/python benchmarks/bench_step.py                   # CPU, 1 and 2 threads, markdown
    .venv/bin/python benchmarks/bench_step.py --scale 0.1 --optimizers adamw,sgd --threads 1
    .venv/bin/python benchmarks/bench_step.py --device cuda     # adds the Triton backend
    python3 benchmarks/bench_step.py --device cuda --sets gpt2-1b --only "ours triton,fused,optimi triton"
    .venv/bin/python benchmarks/bench_step.py --torch-family --scale 0.25 --readme README.md  # RMSprop, Adagrad, ...

Each configuration builds its own params and states (grads are shared, read-only), then times
``opt.step()`` in interleaved rounds (every implementation once per round, so machine noise
hits all of them alike) and reports the median ms/step. Effective GB/s counts the bytes an ideal
fused pass moves (the generated header's ``traffic`` line: AdamW fp32 reads p g m v and writes
p m v = 28 B/param; bf16 halves it and Kahan adds a read and a write of ``kahan_comp``);
"% BW" divides by the memory bandwidth measured in the same run (the faster of a large
``copy_`` and ``add_``). Compile costs run in subprocesses with fresh cache folders.

``--torch-family``: every built-in spec whose class *is* torch.optim's (same name, arguments and
state_dict; found from the specs, so a new one is picked up) against that class, with the same
keywords: ours eager/foreach/fused against torch's for-loop/foreach (and fused where torch has
one), and "× torch best", ours fused over torch's fastest path.

Optional peer: DeepSpeed's ``DeepSpeedCPUAdam`` (ZeRO-Offload's CPU Adam) for AdamW on CPU,
when ``deepspeed`` is installed and its C++ op builds (``pip install -e .[bench]``; the first
build takes minutes, then it is cached in ~/.cache/torch_extensions); it keeps fp32 states for
bf16 params, so ``--dtypes`` ``bf16-fp32states`` (bf16 params, ours ``state_precision="fp32"``
without Kahan summation) compares like with like. Without it the column is left out with a
one-line note:

    .venv/bin/python benchmarks/bench_step.py --optimizers adamw --sets gpt2 --threads 1 \
        --dtypes fp32,bf16,bf16-fp32states --only "fused,deepspeed" --rounds 10 --steps 3
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optcompile import loader  # noqa: E402
from optcompile.paths import builtin_specs, generated_dir  # noqa: E402

# torch.optim's counterpart: the same algorithm, else the one with the same memory traffic
TORCH_MATCH = {"adam": ("Adam", {}), "adamw": ("AdamW", {}), "sgd": ("SGD", {"momentum": 0.9}),
               "radam": ("RAdam", {}), "lion": ("SGD", {"momentum": 0.9})}
TORCH_CLOSEST = ("AdamW", {})
OURS_EXTRA = {"sgd": {"momentum": 0.9}}
OPTIMI_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "lion": "Lion", "adan": "Adan", "radam": "RAdam",
                "ranger": "Ranger", "stableadamw": "StableAdamW"}


# ── parameter sets ──────────────────────────────────────────────────────────────────────────────
def gpt2_like(scale: float) -> list[tuple[int, ...]]:
    """A GPT-2-shaped model: 8 layers, d=512, 16k vocab ≈ 35M params at scale 1 (layers and
    vocab shrink with ``scale``)."""
    return _transformer(512, max(1, round(8 * scale)), max(256, int(16384 * scale)))


def gpt2_1b(scale: float) -> list[tuple[int, ...]]:
    """The GPT-2 layout at GPT-3 XL size for GPUs: 24 layers, d=2048, 50,304 vocab = 1.31B
    params at scale 1 (fp32 params + 2 states 15.7 GB, grads 5.2 GB). Layers and vocab shrink
    with ``scale`` and the width with its square root (multiples of 64), so a small scale is a
    quick run on any machine."""
    d = max(64, round(2048 * scale ** 0.5 / 64) * 64)
    return _transformer(d, max(1, round(24 * scale)), max(256, int(50304 * scale)))


def _transformer(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Embeddings, per layer LN/attention (fused QKV)/LN/MLP (4d) with biases, final LN."""
    shapes = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def many_small(scale: float) -> list[tuple[int, ...]]:
    """2,000 tensors of 64 to 4,096 elements (biases, norms, small adapters): per-tensor overhead."""
    g = torch.Generator().manual_seed(0)
    hi = max(65, int(4096 * scale))
    return [(int(n),) for n in torch.randint(64, hi, (2000,), generator=g)]


def many_small_flat(scale: float) -> list[tuple[int, ...]]:
    """The elements of ``small`` as one tensor: what ``small`` would cost without per-tensor overhead."""
    return [(numel(many_small(scale)),)]


SETS = {"gpt2": gpt2_like, "small": many_small, "small-flat": many_small_flat, "gpt2-1b": gpt2_1b}


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


# ── implementations ─────────────────────────────────────────────────────────────────────────────
def implementations(name: str, device: str, only=None):
    """(label, factory(params, kahan) -> optimizer) for every backend of every library (those
    whose label contains one of ``only``'s substrings, when given)."""
    cls = loader.builtin_class(name)
    extra = OURS_EXTRA.get(name, {})
    out = ours_backends(cls, device, dict(lr=1e-3, **extra))
    tname, tkw, label = torch_counterpart(name)
    out += torch_paths(getattr(torch.optim, tname), label, dict(lr=1e-3, **tkw))
    try:
        import optimi
        ocls = getattr(optimi, OPTIMI_NAMES[name])
        out += [("optimi loop", lambda ps, k: ocls(ps, lr=1e-3, kahan_sum=k, foreach=False, triton=False, **extra)),
                ("optimi foreach", lambda ps, k: ocls(ps, lr=1e-3, kahan_sum=k, foreach=True, triton=False, **extra))]
        if device == "cuda":
            out.append(("optimi triton", lambda ps, k: ocls(ps, lr=1e-3, kahan_sum=k, triton=True, **extra)))
    except (ImportError, AttributeError, KeyError):
        pass
    if name == "adamw" and device == "cpu" and wanted(DEEPSPEED, only) and deepspeed_cpu_adam()[0] is not None:
        dcls = deepspeed_cpu_adam()[0]
        # ours' (= optimi's) defaults, so both do the same work (decoupled decay included)
        out.append((DEEPSPEED, lambda ps, k: dcls(ps, lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2,
                                                  adamw_mode=True)))
    return [(label, make) for label, make in out if wanted(label, only)]


def torch_counterpart(name: str) -> tuple[str, dict, str]:
    """(torch.optim class name, its extra keywords, column label) for spec ``name``: the class
    itself for the torch family, else TORCH_MATCH's, else TORCH_CLOSEST (labelled ``*``)."""
    if name in torch_family():
        return torch_family()[name], {}, torch_family()[name]
    tname, tkw = TORCH_MATCH.get(name, TORCH_CLOSEST)
    return tname, tkw, tname if name in TORCH_MATCH and tname.lower() == name else f"{tname}*"


def ours_backends(cls, device: str, kw: dict):
    """(label, factory) for our eager, foreach and fused (CPU) or Triton (GPU) step of ``cls(**kw)``."""
    last = ("ours fused", dict(fused=True)) if device == "cpu" else ("ours triton", dict(triton=True))
    paths = [("ours eager", dict(foreach=False, triton=False, fused=False)),
             ("ours foreach", dict(foreach=True, triton=False, fused=False)), last]
    return [(label, lambda ps, k, flags=flags, **more: cls(ps, kahan_sum=k, **flags, **kw, **more))
            for label, flags in paths]


def torch_paths(tcls, label: str, kw: dict):
    """(label, factory) for torch.optim's for-loop, foreach and fused step, those ``tcls`` has
    (torch.optim.Muon has only its loop)."""
    args = tcls.__init__.__code__.co_varnames
    if "foreach" not in args:
        return [(f"torch {label} loop", lambda ps, k: tcls(ps, **kw))]
    out = [(f"torch {label} loop", lambda ps, k: tcls(ps, foreach=False, **kw)),
           (f"torch {label} foreach", lambda ps, k: tcls(ps, foreach=True, **kw))]
    if "fused" in args:
        out.append((f"torch {label} fused", lambda ps, k: tcls(ps, fused=True, **kw)))
    return out


# ── the torch.optim family ──────────────────────────────────────────────────────────────────────
# Rows beyond each class's defaults, declared once: options that change what a step computes.
TORCH_FAMILY_OPTIONS = {"rmsprop": ({"centered": True, "momentum": 0.9},)}


@functools.cache
def torch_family() -> dict[str, str]:
    """{spec stem: class name} for every built-in spec whose class *is* torch.optim's (torch's
    state_dict layout, ``state_dict="torch"``, and a torch.optim class of the same name)."""
    out = {}
    for path in builtin_specs():
        info = loader.builtin_module(path.stem)._INFO
        if info.extra.get("state_dict") == "torch" and hasattr(torch.optim, info.name):
            out[path.stem] = info.name
    stale = sorted(set(TORCH_FAMILY_OPTIONS) - set(out))
    if stale:
        raise LookupError(f"TORCH_FAMILY_OPTIONS names {stale}, which are not torch.optim-family specs")
    return out


def torch_family_cases(stems) -> list[tuple[str, dict]]:
    """(stem, options) per row: each class at its defaults, then its TORCH_FAMILY_OPTIONS."""
    return [(stem, dict(kw)) for stem in stems for kw in ({},) + TORCH_FAMILY_OPTIONS.get(stem, ())]


def torch_family_implementations(stem: str, options: dict, device: str, only=None):
    """Ours and torch.optim's class of the same name, both with ``options`` and their (identical)
    defaults otherwise."""
    cls = loader.builtin_class(stem)
    out = ours_backends(cls, device, options) + torch_paths(getattr(torch.optim, cls.__name__), cls.__name__, options)
    return [(label, make) for label, make in out if wanted(label, only)]


def wanted(label: str, only) -> bool:
    return not only or any(o in label for o in only)


DEEPSPEED = "deepspeed CPUAdam"
_DEEPSPEED: list = []


def deepspeed_cpu_adam():
    """(DeepSpeedCPUAdam or None, one-line note). Imports deepspeed and loads (the first time:
    JIT-builds, ~2-4 min) its C++ CPU Adam op once per process; its log lines go to stderr."""
    if not _DEEPSPEED:
        import contextlib
        try:
            with contextlib.redirect_stdout(sys.stderr):  # deepspeed's logger binds sys.stdout at import
                import deepspeed
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                from deepspeed.ops.op_builder import CPUAdamBuilder
                CPUAdamBuilder().load()
            _DEEPSPEED[:] = [DeepSpeedCPUAdam, f"DeepSpeedCPUAdam from deepspeed {deepspeed.__version__}"]
        except ImportError as exc:
            _DEEPSPEED[:] = [None, f"no DeepSpeedCPUAdam column: deepspeed is not installed ({exc}; "
                                   "`pip install -e .[bench]`)"]
        except Exception as exc:  # the op's C++ build failed (no compiler, no ninja, ...)
            msg = str(exc).strip().splitlines()
            _DEEPSPEED[:] = [None, f"no DeepSpeedCPUAdam column: its CPU Adam op did not build "
                                   f"({type(exc).__name__}: {msg[-1] if msg else ''})"]
        if _DEEPSPEED[0] is not None:
            _DEEPSPEED[1] += f" ({deepspeed_agreement(_DEEPSPEED[0])})"
    return _DEEPSPEED[0], _DEEPSPEED[1]


def deepspeed_agreement(dcls, steps: int = 20) -> str:
    """How close DeepSpeedCPUAdam(adamw_mode=True) stays to torch.optim.AdamW, so the column
    compares the same algorithm: fp32 params, and bf16 params against fp32 AdamW whose param is
    rounded to bf16 after every step (what fp32 states + one rounding per step amount to); and,
    for bf16, ours fused with ``state_precision="fp32"`` (the bf16-fp32states rows) against the
    same reference."""
    from optcompile import AdamW
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in ((1000,), (37, 53))]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        theirs = [p.to(dtype, copy=True).requires_grad_() for p in start]
        ref = [p.to(dtype).to(torch.float32, copy=True).requires_grad_() for p in start]
        ours = [p.to(dtype, copy=True).requires_grad_() for p in start]
        ds, ta = dcls(theirs, adamw_mode=True, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
        oc = AdamW(ours, fused=True, state_precision="fp32", kahan_sum=False, **kw)
        for _ in range(steps):
            for a, b, c in zip(theirs, ref, ours):
                a.grad = torch.randn(a.shape, generator=gen).to(dtype)
                b.grad = a.grad.float()
                c.grad = a.grad.clone()
            ds.step()
            ta.step()
            oc.step()
            with torch.no_grad():
                for b in ref:
                    b.copy_(b.to(dtype).float())
        diff = max((a.detach().float() - b.detach()).abs().max().item() for a, b in zip(theirs, ref))
        differ = sum(int((a.detach().float() != b.detach()).sum()) for a, b in zip(theirs, ref))
        out.append(f"{str(dtype).split('.')[1]} max |Δparam| {diff:.1e}, {differ} of "
                   f"{sum(p.numel() for p in start)} differ")
        if dtype == torch.bfloat16:
            mine = max((c.detach().float() - b.detach()).abs().max().item() for c, b in zip(ours, ref))
            flips = sum(int((c.detach().float() != b.detach()).sum()) for c, b in zip(ours, ref))
            out[-1] += f" (ours fused, fp32 states: {mine:.1e}, {flips} differ: fp32 rounding, then bf16's)"
    return f"against torch.optim.AdamW over {steps} steps: " + "; ".join(out)


def traffic_buffers(name: str) -> tuple[list[str], list[str]]:
    """The buffers an ideal fused pass reads and writes, from the generated file's header
    (``reads param grad exp_avg exp_avg_sq, writes exp_avg exp_avg_sq param = 28 B/param/step``)."""
    head = (generated_dir() / f"{name}.py").read_text().splitlines()[5]
    m = re.search(r"reads ([\w ]*), writes ([\w ]*) = \d+ B/param", head)
    return m.group(1).split(), m.group(2).split()


def ideal_bytes(name: str, numel: int, dtype: torch.dtype, kahan: bool, fp32_states: bool = False) -> float:
    """Bytes per step: param and grad in ``dtype``, states in it too unless ``fp32_states``; Kahan
    summation adds a read and a write of ``kahan_comp`` (the param's dtype)."""
    size = dtype.itemsize
    reads, writes = traffic_buffers(name)
    per = sum(size if b in ("param", "grad") or not fp32_states else 4 for b in reads + writes)
    return (per + (2 * size if kahan else 0)) * numel


# ── timing ──────────────────────────────────────────────────────────────────────────────────────
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def bandwidth(device: str, mib: int | None = None) -> float:
    """GB/s of the faster of ``dst.copy_(src)`` (2 × size moved) and ``a.add_(b)`` (3 × size);
    ``mib`` per buffer: 512 on CPU, 2048 on a GPU (many times its L2)."""
    mib = mib or bandwidth_mib(device)
    n = mib * 2**20 // 4
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    best = 0.0
    for fn, moved in ((lambda: a.copy_(b), 2), (lambda: a.add_(b), 3)):
        fn()
        ts = []
        for _ in range(5 if device == "cpu" else 20):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        best = max(best, moved * n * 4 / min(ts) / 1e9)
    del a, b
    free_device_memory(device)
    return best


def bandwidth_mib(device: str) -> int:
    return 512 if device == "cpu" else 2048


def free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# The first step allocates state and builds kernels; ours fused records its buffers' layout on the
# second and steps prebuilt pointer tables from the third (measured on 2,000 tensors: 30-160 ms,
# 4.5, then 2.7 ms from the fourth on), so timing starts after the third.
WARMUP_STEPS = 3


def _build(make, shapes, grads, dtype, kahan, device, label):
    """An optimizer over its own fresh params, stepped WARMUP_STEPS times, or None with a note
    when the implementation does not support this case."""
    ps = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    for p, g in zip(ps, grads):
        p.grad = g
    try:
        opt = make(ps, kahan if dtype != torch.float32 else None)
        for _ in range(WARMUP_STEPS):
            opt.step()
        sync(device)
        return opt
    except Exception as exc:  # an implementation that does not support this case
        print(f"  skip {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return None


def run_config(name, shapes, dtype, kahan, device, rounds, steps, only=None, sequential=None):
    """{label: median seconds per step} for one optimizer's implementations (:func:`implementations`)."""
    return time_implementations(implementations(name, device, only), shapes, dtype, kahan, device, rounds, steps,
                                sequential)


def time_implementations(makers, shapes, dtype, kahan, device, rounds, steps, sequential=None):
    """{label: median seconds per step} for ``makers`` ((label, factory) pairs) on one parameter
    set and dtype.

    Interleaved (every implementation once per round) when all of them fit in memory together;
    on a GPU, where one 1B-param implementation holds ~16 GB, the first one's measured footprint
    decides, and otherwise each implementation is built, timed and freed in turn (``sequential``
    forces either)."""
    if device == "cuda":  # drawn on the device: a CPU randn of 1B elements takes seconds
        gen = torch.Generator(device=device).manual_seed(0)
        grads = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    else:
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    times: dict[str, list[float]] = {}
    opts = {}
    for i, (label, make) in enumerate(makers):
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        opt = _build(make, shapes, grads, dtype, kahan, device, label)
        if opt is None:
            continue
        if sequential is None and device == "cuda":
            footprint = torch.cuda.memory_allocated() - before
            free = torch.cuda.mem_get_info()[0]
            sequential = footprint * (len(makers) - i - 1) > 0.8 * free
            print(f"  {label}: {footprint / 1e9:.1f} GB of params + states; {free / 1e9:.1f} GB free: "
                  f"{'one implementation at a time' if sequential else 'interleaved rounds'}", file=sys.stderr)
        if sequential:
            times[label] = [time_steps(opt, steps, device) for _ in range(rounds)]
            del opt
            free_device_memory(device)
        else:
            opts[label] = opt
    for _ in range(rounds if opts else 0):
        for label, opt in opts.items():
            times.setdefault(label, []).append(time_steps(opt, steps, device))
    opt = None
    del opts, grads
    free_device_memory(device)
    return {label: statistics.median(ts) for label, ts in times.items()}


# ── compile costs (subprocesses) ────────────────────────────────────────────────────────────────
def compile_costs() -> dict:
    py = sys.executable
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OPTCOMPILE_CACHE_DIR=tmp)
        t0 = time.perf_counter()
        subprocess.run([py, "-m", "optcompile", "compile", "--all"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        out["cold optcompile compile --all (sources, every backend)"] = time.perf_counter() - t0
        code = ("import time, torch; from optcompile.backends import fused_runtime as F; "
                "from optcompile.paths import builtin_specs, generated_dir; t=time.perf_counter(); "
                "[F.build(generated_dir() / f'{p.stem}_fused.c', d) for p in builtin_specs() for d in (0, 1)]; "
                "print(time.perf_counter() - t)")
        r = subprocess.run([py, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        out["cold C build of every *_fused.c, fp32 + bf16 (cc -O3)"] = float(r.stdout.split()[-1])
    out["cold total"] = sum(out.values())

    code = ("import time, torch; t = time.perf_counter(); from optcompile import AdamW; "
            "print(time.perf_counter() - t)")
    ts = [float(subprocess.run([py, "-c", code], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.split()[-1]) for _ in range(5)]
    out["warm `from optcompile import AdamW` after `import torch` (median of 5 processes)"] = statistics.median(ts)
    return out


# ── report ──────────────────────────────────────────────────────────────────────────────────────
def fmt_ms(s):
    return f"{s * 1e3:.2f}" if s is not None else "–"


def columns(device: str, with_deepspeed: bool) -> list[str]:
    cols = ["ours eager", "ours foreach", "ours fused" if device == "cpu" else "ours triton",
            "torch loop", "torch foreach", "torch fused", "optimi loop", "optimi foreach"]
    if device == "cuda":
        cols.append("optimi triton")
    if with_deepspeed:
        cols.append(DEEPSPEED)
    return cols


def column_of(label: str) -> str:
    """The table column of an implementation label ("torch AdamW fused" -> "torch fused")."""
    if label.startswith(("ours", "optimi", "deepspeed")):
        return label
    return "torch " + label.rsplit(" ", 1)[1]


# (param dtype, ours' Kahan summation); "bf16-fp32states": bf16 params with ours' states in fp32 and no
# Kahan summation, DeepSpeedCPUAdam's storage (torch and optimi keep bf16 states there)
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, True), "bf16-fp32states": (torch.bfloat16, False)}
OURS_DTYPE_OPTIONS = {"bf16-fp32states": {"state_precision": "fp32"}}


def dtype_label(dname: str) -> str:
    return {"bf16": "bf16 (ours +Kahan)", "bf16-fp32states": "bf16, ours fp32 states"}.get(dname, dname)
README_TAG = "torch-family"  # --readme rewrites README.md between <!-- bench:torch-family:begin/end -->


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--torch-family", action="store_true",
                    help="every spec whose class is torch.optim's (RMSprop, Adagrad, ...) against that class: "
                         "ours eager/foreach/fused against torch's for-loop/foreach/fused")
    ap.add_argument("--threads", help="CPU thread counts (torch.set_num_threads); default 1,2 (--torch-family: 1)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink the parameter sets (1.0: gpt2 34M, small 2,000 tensors, gpt2-1b 1.31B)")
    ap.add_argument("--sets", help=f"comma-separated, of: {', '.join(SETS)}; default gpt2,small,small-flat "
                                   "(--torch-family: gpt2,small)")
    ap.add_argument("--optimizers", help="spec stems; default every built-in spec (--torch-family: every "
                                         "torch.optim-family spec)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--only", default="", help="comma-separated substrings of implementation labels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed round")
    ap.add_argument("--sequential", choices=("auto", "yes", "no"), default="auto",
                    help="build, time and free one implementation at a time (auto: on a GPU when they "
                         "do not all fit in memory together)")
    ap.add_argument("--no-compile-costs", action="store_true", help="skip them (--torch-family never runs them)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--readme", type=Path, help=f"with --torch-family: rewrite this file's table between <!-- "
                                                f"bench:{README_TAG}:begin --> and <!-- bench:{README_TAG}:end -->")
    args = ap.parse_args(argv)
    family = args.torch_family
    known = list(torch_family()) if family else [p.stem for p in builtin_specs()]
    args.optimizers = args.optimizers or ",".join(known)
    args.sets = args.sets or ("gpt2,small" if family else "gpt2,small,small-flat")
    args.threads = args.threads or ("1" if family else "1,2")
    for flag, given, options in (("--sets", args.sets, SETS), ("--dtypes", args.dtypes, DTYPES),
                                 ("--optimizers", args.optimizers, known)):
        bad = [x for x in given.split(",") if x not in options]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(map(repr, bad))}; expected any of {', '.join(options)}"
                     + (" (the torch.optim family)" if flag == "--optimizers" and family else ""))
    if args.scale <= 0:
        ap.error(f"--scale must be > 0, got {args.scale}")
    if args.readme and not family:
        ap.error("--readme rewrites the --torch-family table; add --torch-family")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda or 'none'})")
    only = [o for o in args.only.split(",") if o]
    optimizers = args.optimizers.split(",")
    want_ds = not family and args.device == "cpu" and "adamw" in optimizers and wanted(DEEPSPEED, only)
    ds_note = deepspeed_cpu_adam()[1] if want_ds else None
    with_ds = want_ds and deepspeed_cpu_adam()[0] is not None

    run = [machine_line(args.device),
           f"scale {args.scale}; median of {args.rounds} interleaved rounds × {args.steps} steps; ms/step"]
    notes = list(run)
    if family:
        notes += ["the same keywords for both (the classes' defaults, which agree, plus the row's options); "
                  "bf16: ours bf16 states with Kahan summation, torch.optim plain bf16 (it has no Kahan option); "
                  "× torch best = ours fused ÷ torch's fastest path (named)"]
    else:
        notes[-1] += "; `*` = torch has no such optimizer: closest by traffic (SGD-momentum for Lion, AdamW else)"
    if ds_note:
        notes.append(ds_note + ("; AdamW rows only (adamw_mode=True, ours' hyperparameters); with bf16 "
                                "params it keeps fp32 exp_avg/exp_avg_sq and rounds the param once per "
                                "step (22 B/param): like with like on the bf16-fp32states rows (ours "
                                "state_precision=\"fp32\", no Kahan: 22 B/param); on the bf16 rows ours "
                                "runs bf16 states + Kahan (18 B/param)" if with_ds else ""))
    title = "# optcompile torch.optim-family step benchmark" if family else "# optcompile step benchmark"
    lines = emit([title, ""] + [f"- {n}" for n in notes] + [""])
    sets = {name: SETS[name](args.scale) for name in args.sets.split(",")}
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    sequential = {"auto": None, "yes": True, "no": False}[args.sequential]
    timing = dict(device=args.device, rounds=args.rounds, steps=args.steps, sequential=sequential)
    tables = []
    for nt in threads:
        torch.set_num_threads(nt)
        where = f"{nt} thread{'s' if nt > 1 else ''}" if args.device == "cpu" else torch.cuda.get_device_name()
        if family:
            table = torch_family_table(sets, optimizers, args.dtypes.split(","), only, timing, where)
        else:
            table = step_table(sets, optimizers, args.dtypes.split(","), only, timing, where, with_ds)
        tables.append((where, table))
        lines += table + emit([""])
    if not (args.no_compile_costs or family):
        costs = compile_costs()
        lines += emit(["## compile costs", "", "| what | seconds |", "|---|---|"] +
                      [f"| {k} | {v:.2f} |" for k, v in costs.items()] + [""])
    end = emit([f"- load average at the end {os.getloadavg()[0]:.1f}"])
    lines += end
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    if args.readme:
        block = [f"- {n}" for n in run] + end
        for where, table in tables:
            block += ["", f"**{where}**", ""] + [ln for ln in table if ln.startswith("|")]
        rewrite_block(args.readme, README_TAG, block)
    return 0


def emit(lines: list[str]) -> list[str]:
    """Print ``lines`` as they come (a long run shows progress) and return them for the report."""
    if lines:
        print("\n".join(lines), flush=True)
    return lines


def machine_line(device: str) -> str:
    dev = torch.cuda.get_device_name() if device == "cuda" else f"{_cpu()}, {os.cpu_count()} cores"
    return (f"machine: {platform.node()} {platform.machine()}, {dev}; torch {torch.__version__}; "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
            f"{os.getloadavg()[0]:.1f} (other processes share the cores)")


def timed_rows(sets: dict, cases, dtypes, makers_of, timing: dict, shapes_of=None):
    """(set name, shapes, case, dtype name, {column: median s/step}) for every set × case × dtype,
    ``makers_of(case)`` giving the implementations to time, ``shapes_of(case, shapes)`` the
    shapes it takes of a set (all of them by default)."""
    for set_name, all_shapes in sets.items():
        for case in cases:
            shapes = all_shapes if shapes_of is None else shapes_of(case, all_shapes)
            if not shapes:  # none of the set's tensors has a rank the class takes
                continue
            for dname in dtypes:
                dtype, kahan = DTYPES[dname]
                makers, more = makers_of(case), OURS_DTYPE_OPTIONS.get(dname)
                if more:
                    makers = [(label, functools.partial(make, **more) if label.startswith("ours") else make)
                              for label, make in makers]
                res = time_implementations(makers, shapes, dtype, kahan, **timing)
                yield set_name, shapes, case, dname, {column_of(label): t for label, t in res.items()}


def set_label(set_name: str, shapes) -> str:
    return f"{set_name} ({numel(shapes) / 1e6:.1f}M, {len(shapes)} t)"


def table_head(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def step_table(sets, optimizers, dtypes, only, timing, where, with_ds) -> list[str]:
    """Every optimizer against torch.optim (or its closest), optimi and DeepSpeed, with GB/s."""
    device = timing["device"]
    bw = bandwidth(device)
    cols = columns(device, with_ds)
    extra = ["× DeepSpeedCPUAdam"] if with_ds else []
    lines = emit([f"## {where} — memory bandwidth {bw:.1f} GB/s (copy_/add_ of {bandwidth_mib(device)} MiB)", ""]
                 + table_head(["set", "optimizer", "dtype", *cols, "ours GB/s", "% BW", "× torch fused",
                               "× optimi best", *extra]))
    results: dict = {}
    for set_name, shapes, name, dname, by_col in timed_rows(
            sets, optimizers, dtypes, lambda name: implementations(name, device, only), timing):
        dtype, kahan = DTYPES[dname]
        ours = by_col.get(cols[2])
        opt_best = min([by_col[c] for c in ("optimi loop", "optimi foreach", "optimi triton") if c in by_col],
                       default=None)
        fp32_states = OURS_DTYPE_OPTIONS.get(dname, {}).get("state_precision") == "fp32"
        gbs = ideal_bytes(name, numel(shapes), dtype, kahan, fp32_states) / ours / 1e9 if ours else None
        row = [set_label(set_name, shapes), f"{name} (torch: {torch_counterpart(name)[2]})",
               dtype_label(dname)]
        row += [fmt_ms(by_col.get(c)) for c in cols]
        row += [f"{gbs:.1f}" if gbs else "–", f"{100 * gbs / bw:.0f}%" if gbs else "–",
                ratio(ours, by_col.get("torch fused")), ratio(ours, opt_best)]
        if with_ds:
            row.append(ratio(ours, by_col.get(DEEPSPEED)))
        results[(set_name, name, dname)] = by_col
        lines += emit(["| " + " | ".join(row) + " |"])
    return lines + emit(per_tensor_overhead(results, torch.get_num_threads()))


def torch_family_table(sets, stems, dtypes, only, timing, where) -> list[str]:
    """Each torch.optim-family spec (and its TORCH_FAMILY_OPTIONS rows) against torch.optim's class
    of the same name: every path of both, and ours fused over torch's fastest."""
    device = timing["device"]
    ours = "ours fused" if device == "cpu" else "ours triton"
    theirs = ["torch loop", "torch foreach", "torch fused"]
    cols = ["ours eager", "ours foreach", ours, *theirs]
    lines = emit([f"## {where}", ""] + table_head(["set", "optimizer", "dtype", *cols, "× torch best"]))
    for set_name, shapes, (stem, options), dname, by_col in timed_rows(
            sets, torch_family_cases(stems), dtypes,
            lambda case: torch_family_implementations(*case, device, only), timing, shapes_of=_ranks_taken):
        best = min(((by_col[c], c) for c in theirs if c in by_col), default=None)
        best_cell = f"{ratio(by_col.get(ours), best[0])} ({best[1].split()[1]})" if best else "–"
        row = [set_label(set_name, shapes), " ".join([stem] + [f"{k}={v}" for k, v in options.items()]),
               dtype_label(dname)]
        lines += emit(["| " + " | ".join(row + [fmt_ms(by_col.get(c)) for c in cols] + [best_cell]) + " |"])
    return lines


def _ranks_taken(case, shapes):
    """The shapes of a set a class takes: those of the ranks in its ``spec.param_ndim`` (Muon's
    matrices), else all."""
    ndims = loader.builtin_module(case[0])._INFO.extra.get("param_ndims", ())
    return [s for s in shapes if not ndims or len(s) in ndims]


def rewrite_block(path: Path, tag: str, block: list[str]) -> None:
    """Replace what lies between ``<!-- bench:<tag>:begin -->`` and ``<!-- bench:<tag>:end -->`` in
    ``path`` with ``block``."""
    begin, end = f"<!-- bench:{tag}:begin -->", f"<!-- bench:{tag}:end -->"
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path}: expected one {begin} followed by one {end} around the table to rewrite")
    head, rest = text.split(begin)
    path.write_text(head + begin + "\n" + "\n".join(block) + "\n" + end + rest.split(end, 1)[1])


def per_tensor_overhead(results: dict, threads: int) -> list[str]:
    """Lines comparing the ``small`` set with the same elements as one tensor (``small-flat``),
    where both ran: the price of stepping 2,000 tensors instead of one, per implementation."""
    out = []
    for (set_name, name, dname), by_col in results.items():
        flat = results.get(("small-flat", name, dname)) if set_name == "small" else None
        if flat:
            parts = [f"{col} {ratio(t, flat.get(col))}×" for col, t in by_col.items() if flat.get(col)]
            out.append(f"- small ÷ small-flat, {name} {dname}, {threads} thread{'s' if threads > 1 else ''}: "
                       + ", ".join(parts))
    return [""] + out if out else []


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
