"""Which 8-bit code for blockwise-quantized optimizer states: measured on real Adam moments.

Trains a small model (a Zipf-token bag-of-words classifier, 300 steps of AdamW) and quantizes the moments of its
weight matrices (every tensor of ≥ 4096 elements) in blocks of ``--block`` elements, one absmax
scale each, with each candidate code, and prints a markdown table of the errors (the one in
docs/eightbit.md and benchmarks/RESULTS.md):

* ``linear``: ``q = round(127·x/s)`` (``255·x/s`` unsigned);
* ``dynamic``: a dynamic-exponent map of 256 values (sign, a run of zeros giving a power of ten,
  linear fraction bits; Dettmers 2016), nearest value by binary search;
* ``power p``: companding, ``q = round(127·sign(x)·|x/s|^p)``, decoded ``s·sign(q)·|q/127|^(1/p)``.

Errors: ``nrmse`` = ‖x̂ − x‖/‖x‖ per state; ``rel`` = median |x̂ − x|/|x| over nonzero elements;
``zero`` = fraction of nonzero elements decoded as 0; ``update`` = ‖û − u‖/‖u‖ for Adam's update
direction ``u = m/(√v + ε)`` with both moments quantized by the code in question.

Usage: python benchmarks/quant_codes.py [--steps 300] [--block 256]
"""
from __future__ import annotations

import argparse

import torch

from optcompile import quantize as Q


def dynamic_map(signed: bool) -> torch.Tensor:
    """The sorted values of a dynamic-exponent map: after the sign bit, ``e`` zeros then a one select
    the magnitude ``10**-e``, the remaining bits a linear fraction in (0.1, 1]."""
    bits = 7 if signed else 8
    mags = [1.0]
    for e in range(bits):
        n = 2 ** (bits - 1 - e)
        frac = 0.1 + 0.9 * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        mags += (frac * 10.0 ** -e).tolist()
    mags = sorted(set(mags))[-(2 ** bits - 1):]
    values = [0.0] + mags + ([-m for m in mags] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


def blocks(x: torch.Tensor, block: int):
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    b = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    return b, b.abs().amax(dim=1, keepdim=True), flat.numel()


def code_linear(x, signed, block):
    b, s, n = blocks(x, block)
    top = 127 if signed else 255
    y = torch.where(s > 0, b / s, torch.zeros_like(b))
    q = torch.round(y * top).clamp(-top if signed else 0, top)
    return (q / top * s).reshape(-1)[:n].view_as(x)


def code_dynamic(x, signed, block):
    b, s, n = blocks(x, block)
    table = dynamic_map(signed)
    y = torch.where(s > 0, b / s, torch.zeros_like(b))
    mid = (table[1:] + table[:-1]) / 2
    idx = torch.bucketize(y.contiguous(), mid)
    return (table[idx] * s).reshape(-1)[:n].view_as(x)


def code_power(p):
    def code(x, signed, block):
        b, s, n = blocks(x, block)
        top = 127 if signed else 255
        y = torch.where(s > 0, b.abs() / s, torch.zeros_like(b))
        q = torch.round(top * y ** p)
        return (torch.sign(b) * (q / top) ** (1 / p) * s).reshape(-1)[:n].view_as(x)
    return code


CODES = {"linear": code_linear, "dynamic": code_dynamic, "power 1/2": code_power(0.5),
         "power 1/3": code_power(1 / 3), "power 1/4": code_power(0.25)}


def train(steps: int, seed: int = 0):
    """AdamW on a bag-of-words classifier: Zipf-distributed tokens (rare rows of the embedding get
    rare, large gradients, the heavy tails of real moments) into an MLP."""
    torch.manual_seed(seed)
    vocab, dim, n = 2048, 64, 8192
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    tokens = torch.multinomial(zipf / zipf.sum(), n * 16, replacement=True).view(n, 16)
    topic = torch.randn(vocab, 10)
    y = (topic[tokens].sum(1) + 0.5 * torch.randn(n, 10)).argmax(1)
    emb = torch.nn.EmbeddingBag(vocab, dim, mode="mean")
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, 10))
    params = list(emb.parameters()) + list(mlp.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, n, (128,))
        loss = torch.nn.functional.cross_entropy(mlp(emb(tokens[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params if p.numel() >= Q.MIN_NUMEL]


def errors(x: torch.Tensor, xq: torch.Tensor) -> tuple[float, float, float]:
    nz = x != 0
    rel = ((xq - x).abs()[nz] / x.abs()[nz]).median().item()
    zero = (xq[nz] == 0).float().mean().item()
    return ((xq - x).norm() / x.norm()).item(), rel, zero


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=Q.BLOCK)
    args = ap.parse_args()
    moments = train(args.steps)
    eps = 1e-8
    print(f"AdamW moments after {args.steps} steps, {len(moments)} tensors of "
          f"{sum(m.numel() for m, _ in moments)} elements, blocks of {args.block}\n")
    print("| code | exp_avg nrmse | exp_avg rel | exp_avg zero | exp_avg_sq nrmse | exp_avg_sq rel | "
          "exp_avg_sq zero | update nrmse |")
    print("|---|---|---|---|---|---|---|---|")
    for name, code in CODES.items():
        rows = {"m": [], "v": [], "u": []}
        for m, v in moments:
            mq, vq = code(m, True, args.block), code(v, False, args.block)
            rows["m"].append(errors(m, mq))
            rows["v"].append(errors(v, vq))
            u, uq = m / (v.sqrt() + eps), mq / (vq.sqrt() + eps)
            rows["u"].append(((uq - u).norm() / u.norm()).item())
        avg = {k: [sum(c) / len(c) for c in zip(*r)] if k != "u" else [sum(r) / len(r)] for k, r in rows.items()}
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in avg["m"] + avg["v"] + avg["u"]) + " |")


if __name__ == "__main__":
    main()
