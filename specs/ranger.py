r"""Ranger: RAdam with Lookahead (Wright, 2019; Liu et al., 2020; Zhang et al., 2019, arXiv:1907.08610).

The RAdam step (see RAdam: debiased moments, rectification $r_t$ when $\rho_t > 5$, else SGD with
momentum), then every $k$ steps the slow weights $\phi$ move toward the fast ones and replace them:
$\phi \leftarrow \phi + \alpha(p - \phi)$, $p \leftarrow \phi$. Lookahead runs only on updating steps.
Decoupled weight decay by default (``decouple_wd=True``), added by the compiler's weight-decay pass.
"""
from optcompile.spec import Interval, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("Ranger", weight_decay="l2", decouple_wd=True)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.99), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1),
                          doc="Coefficients for gradient and squared gradient moving averages")
spec.weight_decay_hyper(0)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Added to denominator to improve numerical stability")
k = spec.hyper("k", default=6, type=int, doc="Lookahead synchronization period")
alpha = spec.hyper("alpha", default=0.5, doc="Lookahead slow weights step size")
g, t, p = spec.grad, spec.step, spec.param

beta1_t = spec.let("beta1_t", (beta1**t - beta1) / (beta1**t - 1))  # debiased: 0 at t = 1
beta2_t = spec.let("beta2_t", (beta2**t - beta2) / (beta2**t - 1))
rho_inf = spec.let("rho_inf", 2 / (1 - beta2) - 1)
rho_t = spec.let("rho_t", rho_inf - 2 * t * beta2**t / (1 - beta2**t))
num = spec.let("rect_num", (rho_t - 4) * (rho_t - 2))  # two-factor products: rounds as optimi does
den = spec.let("rect_den", (rho_inf - 4) * (rho_inf - 2))
rect = spec.let("rect", sqrt(num * rho_inf / (den * rho_t)))
m, v, slow = spec.state("exp_avg"), spec.state("exp_avg_sq"), spec.state("la_param", init=p)
m = spec.assign(m, beta1_t * m + (1 - beta1_t) * g)
v = spec.assign(v, beta2_t * v + (1 - beta2_t) * g**2)
p = spec.update(Piecewise((rect * m / (sqrt(v) + eps), rho_t > 5), (m, True)), lr=lr)
slow_t = spec.let("slow_t", slow + alpha * (p - slow))  # unrounded: the param takes it exactly
spec.assign(slow, slow_t, when=spec.every(k))
spec.set_param(slow_t, when=spec.every(k))
