"""Momentum SGD on elementwise-clipped gradients: tensor Piecewise branches that compare with a
hyperparameter and return a hyperparameter or a literal, and one whose condition ands a flag
with a comparison."""
from optcompile.spec import Abs, Interval, OptimizerSpec, Piecewise, oo, sign

spec = OptimizerSpec("ClipSGD", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo))
clip = spec.hyper("clip", default=1.0, domain=Interval.Lopen(0, oo), doc="Largest |gradient| element kept")
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.0)
sign_only = spec.flag("sign_only", default=False, doc="Step by sign(m) where |m| exceeds clip")
g = spec.grad
g_clipped = spec.let("g_clipped", Piecewise((clip * sign(g), Abs(g) > clip), (g, True)))
m = spec.state("exp_avg")
m = spec.assign(m, momentum * m + Piecewise((0, Abs(g) > 100 * clip), (g_clipped, True)))
spec.update(Piecewise((clip * sign(m), sign_only & (Abs(m) > clip)), (m, True)), lr=lr)
