"""SGD whose step size decays geometrically per param and restarts every ``period`` steps, kept
in a scalar state (one fp32 value per param, read and written each step): with s the stored
scale, s' = s·γ (fp32), reset to 1 on steps that are a multiple of ``period``; p ← p − lr·(s + s')/2·g
(the old and the new value both read after the write)."""
from optcompile.spec import Interval, OptimizerSpec, oo

spec = OptimizerSpec("CyclicSGD", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
gamma = spec.hyper("gamma", default=0.7, domain=Interval(0, 1), doc="Decay of the scale per step")
period = spec.hyper("period", default=4, type=int, domain=Interval(1, oo), doc="Steps between restarts")
s = spec.state("scale", init=1, scalar=True)
decayed = spec.assign(s, s * gamma)
s_new = spec.assign(s, 1, when=spec.every(period))
spec.update(spec.grad, lr=lr * spec.let("mid", (s + s_new) / 2))
