"""Training quality of low-precision storage: the example transformer (examples/transformer.py)
trained with AdamW in fp32 and with bf16 params under each way optcompile keeps them.

Every run starts from the same weights (cast to the run's dtype) and sees the same batches; one
thread, so runs are reproducible. The table gives the final loss (mean of the last 10% of steps)
and its gap to fp32; `--plot FILE.png` draws the loss curves (matplotlib, an optional
dependency: without it the curves are written as JSON, `--json`, and can be plotted elsewhere
with `--plot-from FILE.json`). State bytes per parameter are measured from the live tensors
after the run (params, states, block scales; gradients excluded).

    python benchmarks/train_quality.py --steps 400 --json benchmarks/train_quality.json
    python benchmarks/train_quality.py --plot-from benchmarks/train_quality.json --plot benchmarks/train_quality.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name → (param dtype, AdamW keywords): what each run changes against fp32
RUNS = {
    "fp32": ("float32", {}),
    "bf16 + Kahan": ("bfloat16", {"kahan_sum": True}),
    "bf16 + SR": ("bfloat16", {"stochastic_rounding": True}),
    "bf16 nearest": ("bfloat16", {"kahan_sum": False}),
    "bf16 + SR + 8-bit states": ("bfloat16", {"stochastic_rounding": True, "state_precision": "8bit"}),
    "bf16 + Kahan + 8-bit states": ("bfloat16", {"kahan_sum": True, "state_precision": "8bit"}),
    "fp32 + 8-bit states": ("float32", {"state_precision": "8bit"}),
}


def state_bytes(opt, params) -> float:
    """Persistent bytes per parameter element: params and every tensor in their optimizer state
    (moments, codes and scales, Kahan compensation; a 0-dim step counter counts too)."""
    import torch
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        total += sum(t.numel() * t.element_size() for t in opt.state[p].values() if isinstance(t, torch.Tensor))
    return total / sum(p.numel() for p in params)


def run(name: str, steps: int, lr: float) -> dict:
    import torch
    sys.path.insert(0, str(ROOT / "examples"))
    import transformer
    import optcompile
    dtype, kw = RUNS[name]
    made = []

    def factory(model):
        made.append((optcompile.AdamW(model.parameters(), lr=lr, weight_decay=1e-2, **kw), list(model.parameters())))
        return made[-1][0]

    start = time.perf_counter()
    losses = transformer.train(factory, steps, dtype=getattr(torch, dtype))
    opt, params = made[0]
    return {"losses": losses, "seconds": time.perf_counter() - start, "bytes_per_param": state_bytes(opt, params)}


def final(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def table(results: dict) -> list[str]:
    ref = final(results["fp32"]["losses"]) if "fp32" in results else None
    lines = ["| run | final loss | vs fp32 | bytes/param | s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        f = final(r["losses"])
        gap = "–" if ref is None or name == "fp32" else f"{100 * (f - ref) / ref:+.2f}%"
        lines.append(f"| {name} | {f:.4f} | {gap} | {r['bytes_per_param']:.2f} | {r['seconds']:.1f} |")
    return lines


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        losses = r["losses"]
        k = max(1, len(losses) // 50)  # a running mean over 2% of the run
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=f"{name} ({final(losses):.3f})", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (running mean)")
    ax.set_title("AdamW on the example transformer: fp32 vs bf16 params and 8-bit states")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated names from RUNS")
    ap.add_argument("--json", help="write the loss curves and measurements here")
    ap.add_argument("--plot", help="draw the loss curves into this PNG (needs matplotlib)")
    ap.add_argument("--plot-from", help="plot (and tabulate) a --json file instead of training")
    args = ap.parse_args(argv)
    if args.plot_from:
        results = json.loads(Path(args.plot_from).read_text())["results"]
    else:
        import torch
        torch.set_num_threads(1)
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            ap.error(f"--runs: unknown {unknown}; known: {list(RUNS)}")
        results = {name: run(name, args.steps, args.lr) for name in names}
        if args.json:
            meta = {"steps": args.steps, "lr": args.lr, "torch": torch.__version__}
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}))
    print("\n".join(table(results)))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
