"""Muon on the hidden layers' matrices, AdamW on the rest: two optimizers stepping in one loop.

The model and data are examples/train.py's. Muon (torch.optim.Muon's algorithm) takes only 2-D
params and is meant for hidden layers: here the 128×128 hidden weight; the input and output
layers' weights and every bias (1-D) go to AdamW, as Keller Jordan's Muon post advises. Muon's
``adjust_lr_fn="match_rms_adamw"`` scales its update to AdamW's RMS, so it runs at AdamW's lr and
weight decay. The final losses are printed next to AdamW alone on every param.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import optcompile
from train import make_data, make_model


def split(model: nn.Module) -> tuple[list, list]:
    """The hidden 2-D weights (Muon) and everything else (AdamW): the first and last Linear's
    weights (input projection and head) and the 1-D params."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = {id(m.weight) for m in linears[1:-1]}
    muon = [p for p in model.parameters() if id(p) in hidden and p.ndim == 2]
    return muon, [p for p in model.parameters() if id(p) not in hidden]


def run(steps: int, lr: float, muon: bool, seed: int = 0) -> list[float]:
    model = make_model(seed)
    x, y = make_data(seed)
    if muon:
        hidden, rest = split(model)
        # fused=False: no C kernels around a matrix function yet (the fused backend would warn and run foreach)
        opts = [optcompile.Muon(hidden, lr=lr, weight_decay=1e-2, adjust_lr_fn="match_rms_adamw", fused=False),
                optcompile.AdamW(rest, lr=lr, weight_decay=1e-2)]
    else:
        opts = [optcompile.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)]
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        for opt in opts:  # one backward, then each optimizer steps its own params
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    both, adamw = run(args.steps, args.lr, muon=True), run(args.steps, args.lr, muon=False)
    tail = min(20, args.steps)  # the mean of the last batches: one batch's loss is noisy
    print(f"final loss (mean of the last {tail} steps): Muon + AdamW {sum(both[-tail:]) / tail:.4f}  "
          f"AdamW alone {sum(adamw[-tail:]) / tail:.4f}")
    if not both[-1] < both[0]:
        raise SystemExit("training did not reduce the loss")


if __name__ == "__main__":
    main()
