"""A Nesterov-flavoured Adam with a periodic reset every k steps via spec.every and set_param."""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("NAdamK")
lr = spec.hyper("lr", domain=Interval(0, oo))
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.999), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(1e-2)
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
k = spec.hyper("k", default=5, type=int)
g, p, t = spec.grad, spec.param, spec.step
anchor = spec.state("anchor", init=p)
m = spec.state("exp_avg")
v = spec.state("exp_avg_sq")
m = spec.assign(m, beta1 * m + (1 - beta1) * g)
v = spec.assign(v, beta2 * v + (1 - beta2) * g * g)
m_hat = (beta1 * m + (1 - beta1) * g) / (1 - beta1**(t + 1))
p1 = spec.update(m_hat / (sqrt(v / (1 - beta2**t)) + eps), lr=lr)
a = spec.assign(anchor, 0.5 * (anchor + p1), when=spec.every(k))
spec.set_param(a, when=spec.every(k))
