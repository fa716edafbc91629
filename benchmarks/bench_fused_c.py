"""Two generated fused C files of one spec, timed in one process on the same machine state.

    .venv/bin/python benchmarks/bench_fused_c.py --old OLD_DIR [--new generated] [--optimizers adamw,sgd]

For a change to the C generator: ``OLD_DIR`` holds the ``<spec>_fused.c`` files of the old
compiler (e.g. ``git show main:generated/adamw_fused.c > old/adamw_fused.c``). Each file is built
with the runtime's flags and stepped through the same optimizer API on its own copy of a
GPT-2-shaped parameter set (grads shared), the two interleaved round by round, one thread;
the table gives the median ms per step and new/old. Both files must take the interface the
current runtime passes (buffers and host values by name).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optcompile  # noqa: E402
from optcompile.backends.fused_runtime import FusedStep  # noqa: E402

from bench_step import OURS_EXTRA, gpt2_like  # noqa: E402


def _optimizer(name: str, shapes, dtype, grads):
    cls = getattr(optcompile, next(n for n in optcompile.OPTIMIZERS if n.lower() == name))
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    return cls(params, lr=1e-4, fused=True, **OURS_EXTRA.get(name, {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, required=True, help="folder with the old <spec>_fused.c files")
    ap.add_argument("--new", type=Path, default=ROOT / "generated")
    ap.add_argument("--optimizers", default="adamw,sgd,lion,stableadamw,ranger")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = gpt2_like(args.scale)
    print(f"{sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M params in {len(shapes)} tensors, 1 thread")
    print("| optimizer | dtype | old ms | new ms | new/old |\n|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        for dt in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
            grads = [torch.randn(s, dtype=dtype) * 1e-2 for s in shapes]
            opts = {side: _optimizer(name, shapes, dtype, grads) for side in ("old", "new")}
            info = opts["old"]._info  # one class: swap its fused step around each call
            steps = {side: FusedStep(info, folder / f"{name}_fused.c") for side, folder in
                     (("old", args.old), ("new", args.new))}
            times: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(args.rounds + 2):  # two warm-up rounds (build, first touch)
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    info.backends["fused"] = steps[side]
                    t = time.perf_counter()
                    opts[side].step()
                    if r >= 2:
                        times[side].append(time.perf_counter() - t)
            old, new = (statistics.median(times[s]) * 1e3 for s in ("old", "new"))
            print(f"| {name} | {dt} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
            info.backends.pop("fused", None)


if __name__ == "__main__":
    main()
