r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019, arXiv:1711.05101).

Moments use optimi's debiased betas, so ``exp_avg`` and ``exp_avg_sq`` are stored bias-corrected:
$\hat\beta_t = \beta(1-\beta^{t-1})/(1-\beta^t)$, $m_t = \hat\beta_{1,t} m_{t-1} + (1-\hat\beta_{1,t}) g_t$,
$v_t = \hat\beta_{2,t} v_{t-1} + (1-\hat\beta_{2,t}) g_t^2$, $p_t = p_{t-1} - \gamma m_t/(\sqrt{v_t}+\epsilon)$,
with decay $p \leftarrow p(1-\gamma\lambda)$ applied by the compiler's weight-decay pass.
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("AdamW", weight_decay="decoupled", group_constants={"decouple_wd": True})  # optimi's groups
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.99), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1),
                          doc="Coefficients for gradient and squared gradient moving averages")
spec.weight_decay_hyper(1e-2)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Added to denominator to improve numerical stability")
g, t = spec.grad, spec.step

beta1_t = spec.let("beta1_t", (beta1**t - beta1) / (beta1**t - 1))  # debiased: 0 at t = 1
beta2_t = spec.let("beta2_t", (beta2**t - beta2) / (beta2**t - 1))
m = spec.state("exp_avg")
v = spec.state("exp_avg_sq")
m = spec.assign(m, beta1_t * m + (1 - beta1_t) * g)
v = spec.assign(v, beta2_t * v + (1 - beta2_t) * g**2)
spec.update(m / (sqrt(v) + eps), lr=lr)
