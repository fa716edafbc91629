"""Momentum SGD on the gradient normalised per row (the last dim): s ← β·s + (1 − β)·mean(g², axis=-1)
(one value per row, a state of the param's shape with its last dim 1), m ← μ·m + g/(√s + ε),
p ← p − lr·m. A vector is one row; the axis reduction makes the spec step whole tensors."""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("RowNormSGD")
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", default=0.9, domain=Interval.Ropen(0, 1))
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.0)
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
g = spec.grad
s = spec.state("row_sq", axis=-1)
m = spec.state("exp_avg")
s = spec.assign(s, beta * s + (1 - beta) * spec.mean(g**2, axis=-1))
m = spec.assign(m, momentum * m + g / (sqrt(s) + eps))
spec.update(m, lr=lr)
