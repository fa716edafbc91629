r"""Lion: EvoLved Sign Momentum (Chen et al., 2023, arXiv:2302.06675), with decoupled weight decay.

$u_t = \mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t)$, $m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t$,
$p_t = p_{t-1} - \gamma u_t$. Betas are used raw (no step counter, no debiasing); decay
$p \leftarrow p(1-\gamma\lambda)$ is applied by the compiler's weight-decay pass.
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sign

spec = OptimizerSpec("Lion", weight_decay="decoupled")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.99), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1),
                          doc="Coefficients for update moving average and gradient moving average")
spec.weight_decay_hyper(0)
g = spec.grad

m = spec.state("exp_avg")
u = spec.let("update", sign(beta1 * m + (1 - beta1) * g))  # interpolation of the *old* m
m = spec.assign(m, beta2 * m + (1 - beta2) * g)
spec.update(u, lr=lr)
