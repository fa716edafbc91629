"""Step time of the algorithms beyond elementwise: Muon against torch.optim.Muon, and the
Schedule-Free classes against the ``schedulefree`` package's.

    .venv/bin/python benchmarks/bench_muon.py                   # CPU, 1 thread, full size (minutes)
    .venv/bin/python benchmarks/bench_muon.py --quick           # small sizes, a smoke run (seconds)
    .venv/bin/python benchmarks/bench_muon.py --device cuda     # ours' Triton backend instead of fused C

**Muon** steps the 2-D matrices of the hidden layers of bench_step.py's GPT-2-shaped set (QKV,
attention output, the MLP's two: 4 per layer; embeddings, norms and biases go to AdamW in real
use): ours eager, foreach and fused (CPU) or Triton (GPU) against torch.optim.Muon (one path, its
for-loop). Both run Newton–Schulz in bf16 with torch matmuls, so the step is matmul-bound; ours'
kernel backends add two elementwise stages around it (momentum, then the param update).
**SGDScheduleFree / AdamWScheduleFree** step the whole set: ours eager / foreach / fused or
Triton against schedulefree's class (``foreach=False`` and ``True``), in train mode.

Timing is bench_step.py's: each implementation gets its own params and states (grads shared),
three warm-up steps, then interleaved rounds, the median ms/step. fp32, and bf16 (ours with Kahan
summation; theirs plain, as they have none). The machine line says how loaded the run was.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import (DTYPES, emit, fmt_ms, gpt2_like, machine_line, numel, ours_backends,  # noqa: E402
                        time_implementations, torch_paths)

from optcompile import loader  # noqa: E402

MUON_KW = dict(lr=0.02, weight_decay=0.01)
SCHEDULE_FREE = {"sgdschedulefree": ("SGDScheduleFree", dict(lr=1.0)),
                 "adamwschedulefree": ("AdamWScheduleFree", dict(lr=2.5e-3))}


def hidden_matrices(scale: float) -> list[tuple[int, ...]]:
    """The 2-D tensors of the GPT-2-shaped set but its two embeddings (the first two shapes)."""
    return [s for s in gpt2_like(scale)[2:] if len(s) == 2]


def muon_implementations(device: str):
    ours = ours_backends(loader.builtin_class("muon"), device, MUON_KW)
    return ours + torch_paths(torch.optim.Muon, "Muon", MUON_KW)


def schedulefree_implementations(stem: str, device: str):
    """Ours and schedulefree's class of the same name (in train mode, which ours start in), with
    the same keywords; none of theirs if the package is not installed."""
    name, kw = SCHEDULE_FREE[stem]
    out = ours_backends(loader.builtin_class(stem), device, kw)
    try:
        import schedulefree
    except ImportError:
        print("  schedulefree is not installed: ours only", file=sys.stderr)
        return out
    theirs = getattr(schedulefree, name)

    def make(foreach):
        def build(ps, kahan):
            opt = theirs(ps, foreach=foreach, **kw)
            opt.train()
            return opt
        return build
    return out + [(f"schedulefree {'foreach' if foreach else 'loop'}", make(foreach)) for foreach in (False, True)]


def table(title: str, rows: list[tuple[str, str, dict]]) -> list[str]:
    cols = list(dict.fromkeys(label for _, _, res in rows for label in res))
    ref = [c for c in cols if not c.startswith("ours")]
    out = [f"### {title}", "", "| set | dtype | " + " | ".join(cols) + " | ours best × theirs best |",
           "|" + "---|" * (len(cols) + 3)]
    for set_label, dname, res in rows:
        ours = min((t for c, t in res.items() if c.startswith("ours")), default=None)
        theirs = min((res[c] for c in ref if c in res), default=None)
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "–"
        out.append(f"| {set_label} | {dname} | " + " | ".join(fmt_ms(res.get(c)) for c in cols) + f" | {ratio} |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="scale 0.05, 2 rounds: a smoke run")
    ap.add_argument("--scale", type=float, help="of bench_step.py's gpt2 set (default 1; --quick 0.05)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--steps", type=int, default=1, help="steps per timed round")
    ap.add_argument("--only", default="muon,sgdschedulefree,adamwschedulefree",
                    help="comma-separated, of: muon, sgdschedulefree, adamwschedulefree")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    scale = args.scale if args.scale is not None else 0.05 if args.quick else 1.0
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else 5
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    timing = dict(device=args.device, rounds=rounds, steps=args.steps)
    dtypes = args.dtypes.split(",")
    lines = emit([f"# Muon and Schedule-Free step time (ms/step, median of {rounds} rounds)", "",
                  machine_line(args.device) + (f"; {args.threads} thread(s)" if args.device == "cpu" else ""), ""])
    wanted = args.only.split(",")
    if "muon" in wanted:
        shapes = hidden_matrices(scale)
        rows = [(f"gpt2 hidden matrices ({numel(shapes) / 1e6:.1f}M, {len(shapes)} t)", d,
                 time_implementations(muon_implementations(args.device), shapes, *DTYPES[d], **timing))
                for d in dtypes]
        lines += emit(table("Muon vs torch.optim.Muon", rows))
    shapes = gpt2_like(scale)
    for stem in (s for s in SCHEDULE_FREE if s in wanted):
        rows = [(f"gpt2 ({numel(shapes) / 1e6:.1f}M, {len(shapes)} t)", d,
                 time_implementations(schedulefree_implementations(stem, args.device), shapes, *DTYPES[d], **timing))
                for d in dtypes]
        lines += emit(table(f"{SCHEDULE_FREE[stem][0]} vs schedulefree.{SCHEDULE_FREE[stem][0]}", rows))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
