"""LAMB (You et al., 2019): Adam direction scaled per tensor by the trust ratio ||p|| / ||u||."""
from optcompile.spec import Interval, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("Lamb", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.999), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1))
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo))
wd = spec.hyper("weight_decay", default=0.01, domain=Interval(0, oo))
g, p, t = spec.grad, spec.param, spec.step
m0 = spec.state("exp_avg")
v0 = spec.state("exp_avg_sq")
m = spec.assign(m0, beta1 * m0 + (1 - beta1) * g)
v = spec.assign(v0, beta2 * v0 + (1 - beta2) * g**2)
u = spec.let("u", (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps) + wd * p)
p_norm = spec.let("p_norm", sqrt(spec.sum(p**2)))
u_norm = spec.let("u_norm", sqrt(spec.sum(u**2)))
trust = spec.let("trust", Piecewise((p_norm / u_norm, (p_norm > 0) & (u_norm > 0)), (1, True)))
spec.update(u, lr=lr * trust)
