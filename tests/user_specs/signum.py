"""Signum: sign of momentum, with clipping via Min/Max and Abs in the update."""
from optcompile.spec import Abs, Interval, Max, Min, OptimizerSpec, oo, sign, exp, log

spec = OptimizerSpec("Signum")
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", default=0.9, domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.0)
g = spec.grad
m = spec.state("exp_avg", init=g)
m = spec.assign(m, beta * m + (1 - beta) * g)
spec.update(sign(m) * Min(1, Max(Abs(m), 0.5)) + 0 * exp(log(1 + Abs(g))), lr=lr)
