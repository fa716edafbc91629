"""AdaGrad with an accumulator initialised from a hyperparameter, and an optional update clip whose
tensor condition mixes a flag with a negated conjunction of comparisons."""
from optcompile.spec import Abs, Interval, Max, Min, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("AdaGrad", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo))
v0 = spec.hyper("initial_accumulator_value", default=0.1, domain=Interval(0, oo))
eps = spec.hyper("eps", default=1e-10, domain=Interval.open(0, oo))
spec.weight_decay_hyper(0.0)
clip_updates = spec.flag("clip_updates", default=False)
g = spec.grad
v = spec.state("sum", init=v0)
v = spec.assign(v, v + g * g)
u = spec.let("u", g / (sqrt(v) + eps))
spec.update(Piecewise((Max(Min(u, 1), -1), clip_updates | ~((Abs(u) < 0.8) & (Abs(g) < 2))), (u, True)), lr=lr)
