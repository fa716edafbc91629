"""The example transformer: a small byte-level GPT trained on this repository's own text.

Used where a benchmark or example needs a real training run rather than a regression toy
(benchmarks/train_quality.py: fp32 against low-precision states; the Muon + AdamW example). The
corpus is the repository's Markdown and Python files, read in sorted order, so every run on every
machine sees the same bytes; batches are drawn by a seeded generator.

    python examples/transformer.py --steps 300             # AdamW, fp32, prints the loss curve
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    vocab: int = 256  # bytes
    context: int = 32
    width: int = 64
    heads: int = 4
    layers: int = 2


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))
        mask = torch.triu(torch.full((cfg.context, cfg.context), -math.inf), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        h = self.norm1(x)
        n = x.shape[1]
        x = x + self.attn(h, h, h, attn_mask=self.mask[:n, :n], need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def corpus() -> torch.Tensor:
    """The repository's Markdown and Python files as one byte tensor (sorted paths: deterministic)."""
    files = sorted(p for pattern in ("*.md", "optcompile/**/*.py", "specs/*.py")
                   for p in ROOT.glob(pattern) if p.is_file())
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, cfg: Config = Config()) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).to(dtype)


def batches(data: torch.Tensor, steps: int, batch: int = 16, context: int = Config.context, seed: int = 0):
    """``steps`` (inputs, targets) pairs of ``batch`` random windows, the same for every run."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + context + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(opt_factory, steps: int, *, dtype: torch.dtype = torch.float32, seed: int = 0, data=None) -> list[float]:
    """Train a fresh model for ``steps`` steps with ``opt_factory(model)``; the loss per step
    (computed in fp32 from the model's logits, whatever its dtype)."""
    model = make_model(seed, dtype)
    opts = opt_factory(model)
    opts = opts if isinstance(opts, (list, tuple)) else [opts]
    losses = []
    for x, y in batches(corpus() if data is None else data, steps, seed=seed):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    import optcompile
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    losses = train(lambda m: optcompile.AdamW(m.parameters(), lr=args.lr, weight_decay=1e-2), args.steps)
    for step in sorted({0, 9, 49, 99, 199, args.steps - 1}):
        if step < args.steps:
            print(f"step {step + 1:>5}  loss {losses[step]:.4f}")


if __name__ == "__main__":
    main()
