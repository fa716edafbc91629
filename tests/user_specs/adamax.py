"""Adamax (Kingma & Ba, 2015): Adam with the infinity norm."""
from optcompile.spec import Abs, Interval, Max, OptimizerSpec, oo

spec = OptimizerSpec("Adamax", weight_decay="l2")
lr = spec.hyper("lr", default=2e-3, domain=Interval(0, oo))
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.999), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1))
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
spec.weight_decay_hyper(0)
scale = spec.hyper("init_scale", default=0.0, domain=Interval(0, oo))
g, t = spec.grad, spec.step
m = spec.state("exp_avg")
u = spec.state("exp_inf", init=scale * Abs(spec.param))
m = spec.assign(m, beta1 * m + (1 - beta1) * g)
u = spec.assign(u, Max(beta2 * u, Abs(g) + eps))
big = spec.let("big", spec.max(Abs(g)))
clip = spec.let("clip", 1 / Max(1, big))
spec.update(clip * m / ((1 - beta1**t) * u), lr=lr)
