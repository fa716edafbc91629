"""Per-tensor overhead of the fused CPU step: AdamW fp32 on the ``small`` set (2,000 tensors of
64–4,096 elements) against the same elements as one tensor (``small-flat``) and torch's fused
AdamW on ``small``, in interleaved rounds inside one process (RESULTS.md, session 5).

    .venv/bin/python benchmarks/bench_tables.py                  # 20 rounds × 10 steps, one thread
    .venv/bin/python benchmarks/bench_tables.py --clock cpu      # this thread's CPU time (busy machines)

Rows: ours from prebuilt tables checked and read by the C++ table checker (the default where a
C++ compiler and torch's headers are found), ours from tables checked by torch's TensorGuards
with the pointers read in one C call (no torch headers), or in Python (no C++ compiler), ours
over ``small-flat``, and ``torch.optim.AdamW(fused=True)`` over ``small``. Every optimizer has its own
params and states and steps the same grads; the table shows the minimum and the median ms/step
of the rounds and their ratios to ``small-flat`` and to torch fused.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import optcompile  # noqa: E402
from bench_step import many_small, many_small_flat  # noqa: E402
from optcompile.backends import fused_runtime  # noqa: E402

HYPERS = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)


def build(shapes, make):
    """An optimizer over fresh params with fixed grads, stepped until its table is built."""
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = make(params)
    for _ in range(3):
        opt.step()
    return opt


def ours(params):
    return optcompile.AdamW(params, fused=True, **HYPERS)


def _without(*names):
    """Ours whose tables are built without ``fused_runtime``'s ``names`` (factories of the C++
    helpers), as on a machine where they cannot be built."""
    def make(params):
        real = {n: getattr(fused_runtime, n) for n in names}
        for n in names:
            setattr(fused_runtime, n, lambda: None)
        try:
            opt = ours(params)
            for _ in range(3):
                opt.step()  # the table is built within these steps, without them
        finally:
            for n, f in real.items():
                setattr(fused_runtime, n, f)
        return opt
    return make


ours_guards = _without("table_checker")  # torch's TensorGuards, the pointers read in one C call
ours_python_pointers = _without("table_checker", "pointer_reader")  # no C++ compiler


def table(opt):
    """The prebuilt table of the optimizer's only param group, or None."""
    slot = next(iter(opt._fused_groups.values()), None)
    return None if slot is None else slot.table


def torch_fused(params):
    return torch.optim.AdamW(params, fused=True, **HYPERS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time, which leaves out the time other processes hold the core")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    small, flat = many_small(1.0), many_small_flat(1.0)
    rows = {"ours, C++ checker": build(small, ours), "ours, guards + C pointers": build(small, ours_guards),
            "ours, guards + Python pointers": build(small, ours_python_pointers),
            "ours, small-flat": build(flat, ours), "torch fused": build(small, torch_fused)}
    tables = {label: table(rows[label]) for label in list(rows)[:3]}
    if None in tables.values():
        print("no fused table was built (no C compiler?)", file=sys.stderr)
        return 1
    if tables["ours, C++ checker"].checked is None:
        print("no C++ table checker (no C++ compiler or torch headers): its row left out", file=sys.stderr)
        del rows["ours, C++ checker"]
    if tables["ours, guards + C pointers"].reader is None:
        print("no pointer reader (no C++ compiler): its row left out", file=sys.stderr)
        del rows["ours, guards + C pointers"]
    times: dict[str, list[float]] = {label: [] for label in rows}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for label, opt in rows.items():
            t0 = clock()
            for _ in range(args.steps):
                opt.step()
            times[label].append((clock() - t0) / args.steps * 1e3)
    best = {k: min(v) for k, v in times.items()}
    mid = {k: statistics.median(v) for k, v in times.items()}
    print(f"AdamW fp32, {args.threads} thread(s), {args.rounds} interleaved rounds × {args.steps} steps, "
          f"{args.clock} clock; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| ms/step | min | median | ÷ small-flat (min / median) | ÷ torch fused (min / median) |")
    print("|---|---|---|---|---|")
    for k in rows:
        flat_ratio = f"{best[k] / best['ours, small-flat']:.2f} / {mid[k] / mid['ours, small-flat']:.2f}"
        torch_ratio = f"{best[k] / best['torch fused']:.2f} / {mid[k] / mid['torch fused']:.2f}"
        print(f"| {k} | {best[k]:.2f} | {mid[k]:.2f} | {flat_ratio} | {torch_ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
