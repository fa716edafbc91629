r"""RAdam: Adam with variance rectification (Liu et al., 2020, arXiv:1908.03265).

Moments as optimi's Adam (debiased betas, stored bias-corrected). With
$\rho_\infty = 2/(1-\beta_2) - 1$ and $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$:
if $\rho_t > 5$, $r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}$ and
$p_t = p_{t-1} - \gamma r_t m_t/(\sqrt{v_t}+\epsilon)$; otherwise $p_t = p_{t-1} - \gamma m_t$ (SGD with momentum).
L2 or decoupled weight decay is added by the compiler's weight-decay pass.
"""
from optcompile.spec import Interval, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("RAdam", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.99), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1),
                          doc="Coefficients for gradient and squared gradient moving averages")
spec.weight_decay_hyper(0)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Added to denominator to improve numerical stability")
g, t = spec.grad, spec.step

beta1_t = spec.let("beta1_t", (beta1**t - beta1) / (beta1**t - 1))  # debiased: 0 at t = 1
beta2_t = spec.let("beta2_t", (beta2**t - beta2) / (beta2**t - 1))
rho_inf = spec.let("rho_inf", 2 / (1 - beta2) - 1)
rho_t = spec.let("rho_t", rho_inf - 2 * t * beta2**t / (1 - beta2**t))
num = spec.let("rect_num", (rho_t - 4) * (rho_t - 2))  # two-factor products: rounds as optimi does
den = spec.let("rect_den", (rho_inf - 4) * (rho_inf - 2))
rect = spec.let("rect", sqrt(num * rho_inf / (den * rho_t)))
m = spec.state("exp_avg")
v = spec.state("exp_avg_sq")
m = spec.assign(m, beta1_t * m + (1 - beta1_t) * g)
v = spec.assign(v, beta2_t * v + (1 - beta2_t) * g**2)
spec.update(Piecewise((rect * m / (sqrt(v) + eps), rho_t > 5), (m, True)), lr=lr)
