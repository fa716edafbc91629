"""Optimizer step time: every built-in optimizer × backend against torch.optim and optimi.

    .venv/bin/python benchmarks/bench_step.py                   # CPU, 1 and 2 threads, markdown
    .venv/bin/python benchmarks/bench_step.py --scale 0.1 --optimizers adamw,sgd --threads 1
    .venv/bin/python benchmarks/bench_step.py --device cuda     # adds the Triton backend

Each configuration builds its own params and states (grads are shared, read-only), then times
``opt.step()`` in interleaved rounds (every implementation once per round, so machine noise
hits all of them alike) and reports the median ms/step. Effective GB/s counts the bytes an ideal
fused pass moves (the generated header's ``traffic`` line: AdamW fp32 reads p g m v and writes
p m v = 28 B/param; bf16 halves it and Kahan adds a read and a write of ``kahan_comp``);
"% BW" divides by the memory bandwidth measured in the same run (the faster of a large
``copy_`` and ``add_``). Compile costs run in subprocesses with fresh cache folders.
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
    d, layers, vocab = 512, max(1, round(8 * scale)), max(256, int(16384 * scale))
    shapes = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def many_small(scale: float) -> list[tuple[int, ...]]:
    """2,000 tensors of 64 to 4,096 elements (biases, norms, small adapters): per-tensor overhead."""
    g = torch.Generator().manual_seed(0)
    hi = max(65, int(4096 * scale))
    return [(int(n),) for n in torch.randint(64, hi, (2000,), generator=g)]


# ── implementations ─────────────────────────────────────────────────────────────────────────────
def implementations(name: str, device: str):
    """(label, factory(params, kahan) -> optimizer) for every backend of every library."""
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
        out += [("optimi loop", lambda ps, k: ocls(ps, lr=1e-3, kahan_sum=k, foreach=False, **extra)),
                ("optimi foreach", lambda ps, k: ocls(ps, lr=1e-3, kahan_sum=k, foreach=True, **extra))]
    except (ImportError, AttributeError, KeyError):
        pass
    return out


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


def bandwidth(device: str, mib: int = 512) -> float:
    """GB/s of the faster of ``dst.copy_(src)`` (2 × size moved) and ``a.add_(b)`` (3 × size)."""
    n = mib * 2**20 // 4
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    best = 0.0
    for fn, moved in ((lambda: a.copy_(b), 2), (lambda: a.add_(b), 3)):
        fn()
        ts = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        best = max(best, moved * n * 4 / min(ts) / 1e9)
    return best


def run_config(name, shapes, dtype, kahan, device, rounds, steps, only=None):
    """{label: median seconds per step} for one optimizer, parameter set and dtype."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    opts = {}
    for label, make in implementations(name, device):
        if only and not any(o in label for o in only):
            continue
        ps = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        try:
            opt = make(ps, kahan if dtype != torch.float32 else None)
            opt.step()  # state allocation, JIT build
            opts[label] = opt
        except Exception as exc:  # an implementation that does not support this case
            print(f"  skip {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
    times = {label: [] for label in opts}
    for _ in range(rounds):
        for label, opt in opts.items():
            times[label].append(time_steps(opt, steps, device))
    del opts
    gc.collect()
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", default="1,2", help="CPU thread counts (torch.set_num_threads)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the parameter sets (1.0: 35M / 2,000 tensors)")
    ap.add_argument("--sets", default="gpt2,small")
    ap.add_argument("--optimizers", default=",".join(p.stem for p in builtin_specs()))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--only", default="", help="comma-separated substrings of implementation labels")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed round")
    ap.add_argument("--no-compile-costs", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)

    lines = ["# optcompile step benchmark", "",
             f"- machine: {platform.node()} {platform.machine()}, {_cpu()}, {os.cpu_count()} cores; "
             f"torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"load average at start {os.getloadavg()[0]:.1f} (other processes share the cores)",
             f"- scale {args.scale}; median of {args.rounds} interleaved rounds × {args.steps} steps; "
             "ms/step; `*` = torch has no such optimizer: closest by traffic (SGD-momentum for Lion, AdamW else)",
             ""]
    print("\n".join(lines), flush=True)
    sets = {"gpt2": gpt2_like(args.scale), "small": many_small(args.scale)}
    dtypes = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, True)}
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [torch.get_num_threads()]
    only = [o for o in args.only.split(",") if o]
    for nt in threads:
        torch.set_num_threads(nt)
        bw = bandwidth(args.device)
        head = [f"## {nt} thread{'s' if nt > 1 else ''} — memory bandwidth {bw:.1f} GB/s (copy_/add_ of 512 MiB)", ""]
        cols = ["ours eager", "ours foreach", "ours fused" if args.device == "cpu" else "ours triton",
                "torch loop", "torch foreach", "torch fused", "optimi loop", "optimi foreach"]
        head += ["| set | optimizer | dtype | " + " | ".join(cols) + " | ours GB/s | % BW | × torch fused | × optimi best |",
                 "|" + "---|" * (len(cols) + 7)]
        print("\n".join(head), flush=True)
        lines += head
        for set_name in args.sets.split(","):
            shapes = sets[set_name]
            numel = sum(torch.Size(s).numel() for s in shapes)
            for name in args.optimizers.split(","):
                for dname in args.dtypes.split(","):
                    dtype, kahan = dtypes[dname]
                    res = run_config(name, shapes, dtype, kahan, args.device, args.rounds, args.steps, only)
                    by_col = {}
                    for label, t in res.items():
                        key = label if label.startswith("ours") or label.startswith("optimi") else \
                            "torch " + label.rsplit(" ", 1)[1]
                        by_col[key] = (t, label)
                    ours = by_col.get(cols[2], (None,))[0]
                    tf = by_col.get("torch fused", (None,))[0]
                    opt_best = min([by_col[c][0] for c in ("optimi loop", "optimi foreach") if c in by_col], default=None)
                    gbs = ideal_bytes(name, numel, dtype, kahan) / ours / 1e9 if ours else None
                    tname = TORCH_MATCH.get(name, TORCH_CLOSEST)[0]
                    tlabel = tname if name in TORCH_MATCH and tname.lower() == name else f"{tname}*"
                    row = [f"{set_name} ({numel / 1e6:.1f}M, {len(shapes)} t)", f"{name} (torch: {tlabel})",
                           dname + ("+Kahan" if kahan else "")]
                    row += [fmt_ms(by_col.get(c, (None,))[0]) for c in cols]
                    row += [f"{gbs:.1f}" if gbs else "–", f"{100 * gbs / bw:.0f}%" if gbs else "–",
                            f"{ours / tf:.2f}" if ours and tf else "–",
                            f"{ours / opt_best:.2f}" if ours and opt_best else "–"]
                    line = "| " + " | ".join(row) + " |"
                    print(line, flush=True)
                    lines.append(line)
        lines.append("")
        print()
    if not args.no_compile_costs:
        costs = compile_costs()
        block = ["## compile costs", "", "| what | seconds |", "|---|---|"] + \
            [f"| {k} | {v:.2f} |" for k, v in costs.items()] + [""]
        print("\n".join(block))
        lines += block
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


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
