"""The example transformer trained three ways: AdamW; Muon on the hidden matrices with AdamW on
the rest (two optimizers stepping in one loop); AdamWScheduleFree.

The model and data are examples/transformer.py's (a byte-level GPT on this repository's text).
Muon (torch.optim.Muon's algorithm) takes only 2-D params and is meant for hidden layers: the
attention and MLP weights; the embedding, position table, head and every 1-D param (biases,
LayerNorm gains) go to AdamW, as Keller Jordan's Muon post advises. Muon's
``adjust_lr_fn="match_rms_adamw"`` scales its update to AdamW's RMS, so it runs at AdamW's lr
and weight decay. Schedule-Free's params hold its training sequence y; it is evaluated after
``optimizer.eval()`` (the average x), as the method prescribes. Each run is scored by its loss on
held-out windows (the last 10% of the corpus), printed side by side.

    python examples/muon_adamw.py --steps 400
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import optcompile
import transformer


def split(model: nn.Module) -> tuple[list, list]:
    """The hidden 2-D weights (Muon) and everything else (AdamW)."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    return hidden, [p for p in model.parameters() if all(p is not q for q in hidden)]


SETUPS = {
    "AdamW": lambda m, lr: [optcompile.AdamW(m.parameters(), lr=lr, weight_decay=1e-2)],
    # fused=False: no C kernels around a matrix function yet (the fused backend would warn and run foreach)
    "Muon + AdamW": lambda m, lr: [
        optcompile.Muon(split(m)[0], lr=lr, weight_decay=1e-2, adjust_lr_fn="match_rms_adamw", fused=False),
        optcompile.AdamW(split(m)[1], lr=lr, weight_decay=1e-2)],
    "AdamWScheduleFree": lambda m, lr: [optcompile.AdamWScheduleFree(m.parameters(), lr=lr, weight_decay=1e-2,
                                                                     warmup_steps=20)],
}


@torch.no_grad()
def held_out_loss(model: nn.Module, data: torch.Tensor, batches: int = 20) -> float:
    losses = [nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
              for x, y in transformer.batches(data, batches, seed=1)]
    return sum(losses) / len(losses)


def run(name: str, steps: int, lr: float) -> float:
    data = transformer.corpus()
    cut = len(data) * 9 // 10
    made = []

    def factory(model):
        made.append((model, SETUPS[name](model, lr)))
        return made[-1][1]

    losses = transformer.train(factory, steps, data=data[:cut])
    if not losses[-1] < losses[0]:
        raise SystemExit(f"{name}: training did not reduce the loss")
    model, opts = made[0]
    for opt in opts:
        if hasattr(opt, "eval"):
            opt.eval()  # Schedule-Free: evaluate at x
    return held_out_loss(model, data[cut:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in SETUPS:
        print(f"{name:>18}: held-out loss {run(name, args.steps, args.lr):.4f}")


if __name__ == "__main__":
    main()
