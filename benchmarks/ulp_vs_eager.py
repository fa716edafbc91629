"""How far the kernels (fused C, Triton) drift from the eager backend in fp32, in ulps.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/ulp_vs_eager.py [--steps 20] [--optimizers adamw,sgd]

Every built-in with its defaults (plus weight decay, and momentum for SGD) steps the same params
with the same gradients for ``--steps`` steps on each backend; the table gives, per backend, the
largest difference from eager over params and states after the last step, in units of the eager
value's ulp (0: bit-identical). Eager is bit-exact with optimi in fp32 (tests/test_differential.py),
so this is the kernels' distance from the reference. Triton runs in the interpreter on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import optcompile  # noqa: E402
from optcompile.paths import builtin_specs  # noqa: E402

EXTRA = {"sgd": {"momentum": 0.9}}
BACKENDS = {"fused": {"fused": True}, "triton": {"triton": True}}
SIZES = [(37, 29), (257,), (4096,), (64,)]


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got − want| in ulps of ``want`` (NaN positions must agree; they count 0)."""
    both_nan = got.isnan() & want.isnan()
    spacing = (torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    diff = torch.where(both_nan | (got == want), 0.0, (got - want).abs() / spacing)
    return float(diff.max())


def run(name: str, flags: dict, steps: int) -> list[torch.Tensor]:
    cls = getattr(optcompile, next(n for n in optcompile.OPTIMIZERS if n.lower() == name))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SIZES]
    kw = {"lr": 1e-3, **EXTRA.get(name, {})}
    if "weight_decay" in cls.__init__.__code__.co_varnames:
        kw["weight_decay"] = 1e-2
    opt = cls(params, **kw, **{"foreach": False, "triton": False, "fused": False, **flags})
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()
                                                   if torch.is_tensor(v) and v.shape == p.shape]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optimizers", default=",".join(p.stem for p in builtin_specs()))
    args = ap.parse_args()
    print("| optimizer | " + " | ".join(f"{b} vs eager (max ulp)" for b in BACKENDS) + " |")
    print("|---|" + "---|" * len(BACKENDS))
    for name in args.optimizers.split(","):
        want = run(name, {}, args.steps)
        cells = []
        for flags in BACKENDS.values():
            got = run(name, flags, args.steps)
            cells.append(f"{max(ulps(g, w) for g, w in zip(got, want)):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
