"""RMSprop with an optional centered variant and momentum."""
from optcompile.spec import Interval, Ne, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("RMSprop", weight_decay="l2")
lr = spec.hyper("lr", default=1e-2, domain=Interval(0, oo))
alpha = spec.hyper("alpha", default=0.99, domain=Interval(0, 1))
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
spec.weight_decay_hyper(0)
momentum = spec.hyper("momentum", default=0.0, domain=Interval.Ropen(0, 1))
centered = spec.flag("centered", False)
g = spec.grad
sq = spec.state("square_avg")
sq = spec.assign(sq, alpha * sq + (1 - alpha) * g**2)
ga = spec.state("grad_avg", when=centered)
ga = spec.assign(ga, alpha * ga + (1 - alpha) * g)
avg = spec.let("avg", Piecewise((sqrt(sq - ga**2) + eps, centered), (sqrt(sq) + eps, True)))
use_mom = spec.let("use_mom", Ne(momentum, 0))
buf = spec.state("momentum_buffer", when=use_mom)
buf = spec.assign(buf, momentum * buf + g / avg)
spec.update(Piecewise((buf, use_mom), (g / avg, True)), lr=lr)
