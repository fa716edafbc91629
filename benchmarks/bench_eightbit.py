"""Fused CPU step time of 8-bit states (``state_precision="8bit"``) against bf16 states.

    .venv/bin/python benchmarks/bench_eightbit.py                 # gpt2 set, one thread
    .venv/bin/python benchmarks/bench_eightbit.py --scale 0.25 --rounds 9 --threads 2
    .venv/bin/python benchmarks/bench_eightbit.py --scale 0.25 --rounds 15 --cpu-time --no-peers   # a loaded machine

AdamW on the fused C backend with bf16 params and stochastic rounding, on bench_step.py's "gpt2"
set (35M params at scale 1), in three configurations: bf16 states; 8-bit states loaded and stored
by the kernel (blockwise decode on load, encode on store); and 8-bit states decoded to fp32
around the launch and encoded after (the path eager and foreach take, forced here by turning
``runtime.kernel_codes`` off). Each round times every configuration once (interleaved, so machine
noise hits all alike); the table reports the median ms/step, the ratio to bf16 states, and the
persistent bytes per param of the live tensors (params, states, scales). The load average is
printed before and after: the development VM is shared. ``--cpu-time`` times each step by the
calling thread's CPU time instead of the wall clock (one thread only: the step then runs on the
calling thread), which other processes on a loaded machine do not inflate; ``--no-peers`` leaves
out bitsandbytes and torchao (their steps take most of a run's time).

Optional peers, each with bf16 params and its own 8-bit AdamW, where installed (`pip install
bitsandbytes torchao`; left out with a note otherwise): bitsandbytes' `AdamW8bit` (blockwise
dynamic-map codes; on CPU it dequantizes to fp32 and requantizes with eager ops; no stochastic
rounding of the params) and torchao's `AdamW8bit(bf16_stochastic_round=True)` (the same storage
as ours: 8-bit moments, bf16 params rounded stochastically; its step is torch.compile'd, the
first call compiles for ~15-25 s, outside the timed rounds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import SETS, numel  # noqa: E402

from optcompile import loader, runtime  # noqa: E402

CONFIGS = (("bf16 states", "bf16", True), ("8-bit, in the kernel", "8bit", True),
           ("8-bit, decoded around it", "8bit", False))


def peers() -> tuple[list[tuple[str, object]], list[str]]:
    """The installed peers' 8-bit AdamW factories ``(label, make(params))`` and a note per missing one."""
    found, notes = [], []
    try:
        import bitsandbytes as bnb
        found.append(("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01)))
    except ImportError:
        notes.append("no bitsandbytes row: bitsandbytes is not installed")
    try:
        from torchao.optim import AdamW8bit
        found.append(("torchao AdamW8bit + SR", lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.01,
                                                                    bf16_stochastic_round=True)))
    except ImportError:
        notes.append("no torchao row: torchao is not installed")
    return found, notes


def persistent_bytes(opt, params) -> float:
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        for t in opt.state[p].values():
            if isinstance(t, torch.Tensor) and t.dim():
                inner = [getattr(t, a) for a in getattr(t, "__tensor_flatten__", lambda: ((), None))()[0]]
                total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total / sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="gpt2", choices=sorted(SETS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cpu-time", action="store_true", help="time steps by the thread's CPU time (--threads 1)")
    ap.add_argument("--no-peers", action="store_true", help="leave out bitsandbytes and torchao")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    shapes = SETS[args.set](args.scale)
    cls = loader.builtin_class("adamw")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    runs = []
    for label, precision, direct in CONFIGS:
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt = cls(params, lr=1e-3, weight_decay=0.01, fused=True, stochastic_rounding=True,
                  state_precision=precision)
        runs.append((label, direct, params, opt, []))
    found, notes = ([], ["no peer rows: --no-peers"]) if args.no_peers else peers()
    for label, make in found:
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr
        runs.append((label, True, params, make(params), []))
    saved = runtime.kernel_codes

    def step(direct, opt):
        runtime.kernel_codes = saved if direct else (lambda *a, **k: frozenset())
        try:
            t0 = clock()
            opt.step()
            return clock() - t0
        finally:
            runtime.kernel_codes = saved

    for _, direct, _, opt, _ in runs:  # warm up: allocate states, build the libraries
        step(direct, opt)
        step(direct, opt)
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for _, direct, _, opt, times in runs:
            times.append(step(direct, opt))
    load1 = os.getloadavg()
    n = numel(shapes)
    print(f"AdamW fused, bf16 params + stochastic rounding, set {args.set} (scale {args.scale}: {n / 1e6:.1f}M params "
          f"in {len(shapes)} tensors), {args.threads} thread(s), {args.rounds} rounds, "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}; load average "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after\n")
    for note in notes:
        print(note)
    print("| states | ms/step | × bf16 states | persistent B/param |")
    print("|---|---|---|---|")
    base = statistics.median(runs[0][4])
    for label, _, params, opt, times in runs:
        med = statistics.median(times)
        print(f"| {label} | {med * 1e3:.1f} | {med / base:.2f} | {persistent_bytes(opt, params):.3f} |")


if __name__ == "__main__":
    main()
