"""SGD with momentum, dampening and Nesterov: the momentum buffer exists only when momentum > 0,
and the update reads it under a combined guard (`(momentum > 0) & nesterov`)."""
from optcompile.spec import Eq, Interval, OptimizerSpec, Piecewise, oo

spec = OptimizerSpec("NesterovSGD", weight_decay="l2", decouple_wd=False)
lr = spec.hyper("lr", domain=Interval(0, oo))
mom = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
damp = spec.hyper("dampening", default=0.0, domain=Interval(0, 1))
spec.weight_decay_hyper(0.0)
nesterov = spec.flag("nesterov", default=True)
g, t = spec.grad, spec.step
buf = spec.state("momentum_buffer", init=g, when=mom > 0)
buf = spec.assign(buf, Piecewise((buf, Eq(t, 1)), (mom * buf + (1 - damp) * g, True)), when=mom > 0)
spec.update(Piecewise((g + mom * buf, (mom > 0) & nesterov), (buf, mom > 0), (g, True)), lr=lr)
