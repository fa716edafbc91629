"""Momentum SGD with torch.clamp-style clipping (NaN propagates, unlike Max/Min): the gradient is
clipped to ±clip, the momentum to |g|·max_ratio (a per-element bound), the update from below at −1
(one-sided), and the step size is warmed up on the host, lr·clamp(t/warmup, 0.1, 1), and scaled per
tensor by clamp(‖p‖/‖m‖, 0, 10) (LARS-like)."""
from optcompile.spec import Abs, Interval, OptimizerSpec, Piecewise, clamp, oo, sqrt

spec = OptimizerSpec("ClampSGD")
lr = spec.hyper("lr", domain=Interval(0, oo))
clip = spec.hyper("clip", default=1.0, domain=Interval(0, oo))
ratio = spec.hyper("max_ratio", default=2.0, domain=Interval(0, oo))
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
warmup = spec.hyper("warmup", default=4.0, domain=Interval.open(0, oo))
spec.weight_decay_hyper(0.0)
g, p, t = spec.grad, spec.param, spec.step
m = spec.state("exp_avg")
m = spec.assign(m, clamp(momentum * m + clamp(g, -clip, clip), hi=ratio * Abs(g) + 1))
warm = spec.let("warm", clamp(t / warmup, 0.1, 1))
p_sq, m_sq = spec.sum(p**2), spec.sum(m**2)
trust = spec.let("trust", Piecewise((clamp(sqrt(p_sq / m_sq), 0, 10), m_sq > 0), (1, True)))
spec.update(clamp(m, lo=-1), lr=lr * warm * trust)
