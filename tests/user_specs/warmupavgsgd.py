"""SGD with an optional linear warmup over the first ``warmup`` steps (an int, or None for no
warmup) and a running average of the parameters from step ``avg_start`` on (a ``when=`` that
depends on the step): s = 1 if warmup is None else min(t/warmup, 1), p ← p − lr·s·g, and for
t ≥ avg_start: a ← a + (p − a)/(t − avg_start + 1)."""
from optcompile.spec import Ge, Interval, Min, OptimizerSpec, Piecewise, oo

spec = OptimizerSpec("WarmupAvgSGD")
lr = spec.hyper("lr", domain=Interval(0, oo))
warmup = spec.hyper("warmup", default=None, type=int, domain=Interval(1, oo), doc="Warmup steps (None: no warmup)")
avg_start = spec.hyper("avg_start", default=3, type=int, domain=Interval(1, oo))
spec.weight_decay_hyper(0.0)
g, t = spec.grad, spec.step
scale = spec.let("scale", Piecewise((1, spec.is_none(warmup)), (Min(t / warmup, 1), True)))
p = spec.update(g, lr=lr * scale)
avg = spec.state("avg", init=spec.param)
spec.assign(avg, avg + (p - avg) / (t - avg_start + 1), when=Ge(t, avg_start))
