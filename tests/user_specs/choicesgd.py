"""Momentum SGD whose direction is a string choice (``spec.hyper(..., choices=)``): the momentum
itself (``rule=None``), Nesterov's look-ahead g + μ·m (``"nesterov"``) or the momentum clipped to
[-1, 1] (``"clip"``). m ← μ·m + g, p ← p − lr·d."""
from optcompile.spec import Interval, OptimizerSpec, Piecewise, clamp, oo

spec = OptimizerSpec("ChoiceSGD")
lr = spec.hyper("lr", domain=Interval(0, oo))
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
rule = spec.hyper("rule", None, choices=(None, "nesterov", "clip"), doc="The step direction from the momentum")
spec.weight_decay_hyper(0.0)
g = spec.grad
m = spec.state("exp_avg")
m = spec.assign(m, momentum * m + g)
spec.update(Piecewise((g + momentum * m, rule["nesterov"]), (clamp(m, -1, 1), rule["clip"]), (m, True)), lr=lr)
