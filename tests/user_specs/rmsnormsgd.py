"""Momentum SGD on the RMS-normalised gradient, with a per-tensor step size lr/√n (n = numel):
g̃ = g / (√(Σg²/n) + ε), m ← μ·m + g̃, p ← p − lr/√n · m. ``n`` is read as ``spec.numel`` and as
``spec.sum(1)``; both are per-tensor, so the spec steps whole tensors."""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("RmsNormSGD")
lr = spec.hyper("lr", domain=Interval(0, oo))
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.0)
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
g, n = spec.grad, spec.numel
rms = spec.let("rms", sqrt(spec.sum(g**2) / spec.sum(1)))
m = spec.state("exp_avg")
m = spec.assign(m, momentum * m + g / (rms + eps))
spec.update(m, lr=lr / sqrt(n))
