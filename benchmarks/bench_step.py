"""Optimizer step time: every built-in optimizer × backend against torch.optim and optimi.

    .venv/bin/python benchmarks/bench_step.py                   # CPU, 1 and 2 threads, markdown
    .venv/bin/python benchmarks/bench_step.py --scale 0.1 --optimizers adamw,sgd --threads 1
    .venv/bin/python benchmarks/bench_step.py --device cuda     # adds the Triton backend
    python3 benchmarks/bench_step.py --device cuda --sets gpt2-1b --only "ours triton,fused,optimi triton"

Each configuration builds its own params and states (grads are shared, read-only), then times
``opt.step()`` in interleaved rounds (every implementation once per round, so machine noise
hits all of them alike) and reports the median ms/step. Effective GB/s counts the bytes an ideal
fused pass moves (the generated header's ``traffic`` line: AdamW fp32 reads p g m v and writes
p m v = 28 B/param; bf16 halves it and Kahan adds a read and a write of ``kahan_comp``);
"% BW" divides by the memory bandwidth measured in the same run (the faster of a large
``copy_`` and ``add_``). Compile costs run in subprocesses with fresh cache folders.

Optional peer: DeepSpeed's ``DeepSpeedCPUAdam`` (ZeRO-Offload's CPU Adam) for AdamW on CPU,
when ``deepspeed`` is installed and its C++ op builds (``pip install -e .[bench]``); it keeps
fp32 states for bf16 params. Without it the column is left out with a one-line note.
"""
from __future__ import annotations

import argparse
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
    module = loader.builtin_module(name)
    cls = getattr(module, module._INFO.name)
    extra = OURS_EXTRA.get(name, {})
    out = [("ours eager", lambda ps, k: cls(ps, lr=1e-3, kahan_sum=k, foreach=False, triton=False, fused=False, **extra)),
           ("ours foreach", lambda ps, k: cls(ps, lr=1e-3, kahan_sum=k, foreach=True, triton=False, fused=False, **extra))]
    if device == "cpu":
        out.append(("ours fused", lambda ps, k: cls(ps, lr=1e-3, kahan_sum=k, fused=True, **extra)))
    else:
        out.append(("ours triton", lambda ps, k: cls(ps, lr=1e-3, kahan_sum=k, triton=True, **extra)))
    tname, tkw = TORCH_MATCH.get(name, TORCH_CLOSEST)
    tcls = getattr(torch.optim, tname)
    label = tname if name in TORCH_MATCH and tname.lower() == name else f"{tname}*"
    out += [(f"torch {label} loop", lambda ps, k: tcls(ps, lr=1e-3, foreach=False, **tkw)),
            (f"torch {label} foreach", lambda ps, k: tcls(ps, lr=1e-3, foreach=True, **tkw))]
    if "fused" in tcls.__init__.__code__.co_varnames:
        out.append((f"torch {label} fused", lambda ps, k: tcls(ps, lr=1e-3, fused=True, **tkw)))
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
    rounded to bf16 after every step (what fp32 states + one rounding per step amount to)."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in ((1000,), (37, 53))]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        theirs = [p.to(dtype, copy=True).requires_grad_() for p in start]
        ref = [p.to(dtype).to(torch.float32, copy=True).requires_grad_() for p in start]
        ds, ta = dcls(theirs, adamw_mode=True, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
        for _ in range(steps):
            for a, b in zip(theirs, ref):
                a.grad = torch.randn(a.shape, generator=gen).to(dtype)
                b.grad = a.grad.float()
            ds.step()
            ta.step()
            with torch.no_grad():
                for b in ref:
                    b.copy_(b.to(dtype).float())
        diff = max((a.detach().float() - b.detach()).abs().max().item() for a, b in zip(theirs, ref))
        differ = sum(int((a.detach().float() != b.detach()).sum()) for a, b in zip(theirs, ref))
        out.append(f"{str(dtype).split('.')[1]} max |Δparam| {diff:.1e}, {differ} of "
                   f"{sum(p.numel() for p in start)} differ")
    return f"against torch.optim.AdamW over {steps} steps: " + "; ".join(out)


def traffic_bytes(name: str) -> int:
    """fp32 bytes per param from the generated file's header (``= 28 B/param/step``)."""
    head = (generated_dir() / f"{name}.py").read_text().splitlines()[5]
    return int(re.search(r"= (\d+) B/param", head).group(1))


def ideal_bytes(name: str, numel: int, dtype: torch.dtype, kahan: bool) -> float:
    b = traffic_bytes(name)
    per = b if dtype == torch.float32 else b // 2 + (4 if kahan else 0)
    return per * numel


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


def _build(make, shapes, grads, dtype, kahan, device, label):
    """A stepped-once optimizer over its own fresh params (state allocated, kernels built), or
    None with a note when the implementation does not support this case."""
    ps = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    for p, g in zip(ps, grads):
        p.grad = g
    try:
        opt = make(ps, kahan if dtype != torch.float32 else None)
        opt.step()  # state allocation, JIT build
        sync(device)
        return opt
    except Exception as exc:  # an implementation that does not support this case
        print(f"  skip {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return None


def run_config(name, shapes, dtype, kahan, device, rounds, steps, only=None, sequential=None):
    """{label: median seconds per step} for one optimizer, parameter set and dtype.

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
    makers = implementations(name, device, only)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", default="1,2", help="CPU thread counts (torch.set_num_threads)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink the parameter sets (1.0: gpt2 34M, small 2,000 tensors, gpt2-1b 1.31B)")
    ap.add_argument("--sets", default="gpt2,small,small-flat", help=f"comma-separated, of: {', '.join(SETS)}")
    ap.add_argument("--optimizers", default=",".join(p.stem for p in builtin_specs()))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--only", default="", help="comma-separated substrings of implementation labels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed round")
    ap.add_argument("--sequential", choices=("auto", "yes", "no"), default="auto",
                    help="build, time and free one implementation at a time (auto: on a GPU when they "
                         "do not all fit in memory together)")
    ap.add_argument("--no-compile-costs", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    dtypes = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, True)}
    for flag, given, known in (("--sets", args.sets, SETS), ("--dtypes", args.dtypes, dtypes),
                               ("--optimizers", args.optimizers, [p.stem for p in builtin_specs()])):
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(map(repr, bad))}; expected any of {', '.join(known)}")
    if args.scale <= 0:
        ap.error(f"--scale must be > 0, got {args.scale}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda or 'none'})")
    only = [o for o in args.only.split(",") if o]
    optimizers = args.optimizers.split(",")
    want_ds = args.device == "cpu" and "adamw" in optimizers and wanted(DEEPSPEED, only)
    ds_note = deepspeed_cpu_adam()[1] if want_ds else None
    with_ds = want_ds and deepspeed_cpu_adam()[0] is not None

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{_cpu()}, {os.cpu_count()} cores"
    lines = ["# optcompile step benchmark", "",
             f"- machine: {platform.node()} {platform.machine()}, {dev}; "
             f"torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"load average at start {os.getloadavg()[0]:.1f} (other processes share the cores)",
             f"- scale {args.scale}; median of {args.rounds} interleaved rounds × {args.steps} steps; "
             "ms/step; `*` = torch has no such optimizer: closest by traffic (SGD-momentum for Lion, AdamW else)"]
    if ds_note:
        lines.append(f"- {ds_note}" + ("; AdamW rows only (adamw_mode=True, ours' hyperparameters); with bf16 "
                                        "params it keeps fp32 exp_avg/exp_avg_sq and rounds the param once per "
                                        "step (22 B/param), while ours runs bf16 states + Kahan (18 B/param)"
                                        if with_ds else ""))
    lines.append("")
    print("\n".join(lines), flush=True)
    sets = {name: SETS[name](args.scale) for name in args.sets.split(",")}
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    sequential = {"auto": None, "yes": True, "no": False}[args.sequential]
    cols = columns(args.device, with_ds)
    for nt in threads:
        torch.set_num_threads(nt)
        bw = bandwidth(args.device)
        where = f"{nt} thread{'s' if nt > 1 else ''}" if args.device == "cpu" else torch.cuda.get_device_name()
        head = [f"## {where} — memory bandwidth {bw:.1f} GB/s (copy_/add_ of {bandwidth_mib(args.device)} MiB)", ""]
        extra = ["× DeepSpeedCPUAdam"] if with_ds else []
        head += ["| set | optimizer | dtype | " + " | ".join(cols) + " | ours GB/s | % BW | × torch fused | "
                 "× optimi best |" + "".join(f" {e} |" for e in extra),
                 "|" + "---|" * (len(cols) + 7 + len(extra))]
        print("\n".join(head), flush=True)
        lines += head
        results: dict = {}
        for set_name, shapes in sets.items():
            n = numel(shapes)
            for name in optimizers:
                for dname in args.dtypes.split(","):
                    dtype, kahan = dtypes[dname]
                    res = run_config(name, shapes, dtype, kahan, args.device, args.rounds, args.steps, only,
                                     sequential)
                    by_col = {column_of(label): t for label, t in res.items()}
                    ours = by_col.get(cols[2])
                    tf = by_col.get("torch fused")
                    opt_best = min([by_col[c] for c in ("optimi loop", "optimi foreach", "optimi triton")
                                    if c in by_col], default=None)
                    gbs = ideal_bytes(name, n, dtype, kahan) / ours / 1e9 if ours else None
                    tname = TORCH_MATCH.get(name, TORCH_CLOSEST)[0]
                    tlabel = tname if name in TORCH_MATCH and tname.lower() == name else f"{tname}*"
                    row = [f"{set_name} ({n / 1e6:.1f}M, {len(shapes)} t)", f"{name} (torch: {tlabel})",
                           dname + ("+Kahan" if kahan else "")]
                    row += [fmt_ms(by_col.get(c)) for c in cols]
                    row += [f"{gbs:.1f}" if gbs else "–", f"{100 * gbs / bw:.0f}%" if gbs else "–",
                            ratio(ours, tf), ratio(ours, opt_best)]
                    if with_ds:
                        row.append(ratio(ours, by_col.get(DEEPSPEED)))
                    results[(set_name, name, dname)] = by_col
                    line = "| " + " | ".join(row) + " |"
                    print(line, flush=True)
                    lines.append(line)
        overhead = per_tensor_overhead(results, nt)
        lines += overhead
        print("\n".join(overhead))
        lines.append("")
        print()
    if not args.no_compile_costs:
        costs = compile_costs()
        block = ["## compile costs", "", "| what | seconds |", "|---|---|"] + \
            [f"| {k} | {v:.2f} |" for k, v in costs.items()] + [""]
        print("\n".join(block))
        lines += block
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


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
