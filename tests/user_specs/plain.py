"""Plain gradient descent: no state at all."""
from optcompile.spec import Interval, OptimizerSpec, oo

spec = OptimizerSpec("Plain", weight_decay=None)
lr = spec.hyper("lr", default=0.1, domain=Interval(0, oo))
spec.update(spec.grad, lr=lr)
