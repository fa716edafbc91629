r"""Adan: Adaptive Nesterov Momentum (Xie et al., 2024, arXiv:2208.06677), optimi's formulation.

With debiased betas $\hat\beta_{i,t}$ (as optimi's Adam) and $d_t = g_t - g_{t-1}$ ($d_1 = 0$):
$m_t = \hat\beta_{1,t} m_{t-1} + (1-\hat\beta_{1,t}) g_t$, $n_t = \hat\beta_{2,t} n_{t-1} + (1-\hat\beta_{2,t}) d_t$,
$v_t = \hat\beta_{3,t} v_{t-1} + (1-\hat\beta_{3,t}) (g_t + \beta_2 d_t)^2$,
$p_t = \big(p_{t-1} - \gamma (m_t + \beta_2 n_t)/(\sqrt{v_t}+\epsilon)\big) / (1 + \gamma\lambda)$ (proximal decay),
or with ``adam_wd=True`` decoupled decay $p \leftarrow p(1-\gamma\lambda)$ before the step. ``prev_grad``
stores $-g_{t-1}$ (optimi's layout). Unlike optimi 0.3.3, the class honours ``adam_wd``.
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("Adan", weight_decay="proximal", decoupled_flag="adam_wd", kahan_sum=False)
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2, beta3 = spec.hyper("betas", default=(0.98, 0.92, 0.99), names=("beta1", "beta2", "beta3"),
                                 domain=Interval.Ropen(0, 1), doc="Coefficients for gradient, gradient difference, "
                                 "and squared gradient moving averages")
spec.weight_decay_hyper(2e-2)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Added to denominator to improve numerical stability")
spec.flag("adam_wd", False, after="max_lr", doc="Apply Adam-style decoupled weight decay instead of Adan weight decay")
g, t = spec.grad, spec.step

beta1_t = spec.let("beta1_t", (beta1**t - beta1) / (beta1**t - 1))  # debiased: 0 at t = 1
beta2_t = spec.let("beta2_t", (beta2**t - beta2) / (beta2**t - 1))
beta3_t = spec.let("beta3_t", (beta3**t - beta3) / (beta3**t - 1))
m, n, v, prev = (spec.state("exp_avg"), spec.state("exp_avg_diff"), spec.state("exp_avg_sq"),
                 spec.state("prev_grad", init=-g))
d = spec.assign(prev, prev + g)  # g_t - g_{t-1}, kept in the prev_grad buffer
m = spec.assign(m, beta1_t * m + (1 - beta1_t) * g)
n = spec.assign(n, beta2_t * n + (1 - beta2_t) * d)
u = spec.assign(prev, beta2 * d + g)  # raw beta2
v = spec.assign(v, beta3_t * v + (1 - beta3_t) * u**2)
spec.assign(prev, -g)
denom = spec.let("denom", sqrt(v) + eps)
spec.update(m / denom + beta2 * n / denom, lr=lr)
