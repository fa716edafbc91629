r"""Adamax: Adam with the infinity norm (Kingma & Ba, 2015, arXiv:1412.6980, §7.1), as torch.optim.Adamax.

$g \leftarrow g + \lambda p$ (L2), $m_t = m_{t-1} + (1-\beta_1)(g - m_{t-1})$ (torch's lerp),
$u_t = \max(\beta_2 u_{t-1}, |g| + \epsilon)$, $p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t}\, m_t/u_t$.
The max is torch.maximum's, which propagates NaN (the DSL's ``Max`` ignores a NaN operand, ``clamp``
propagates it): a NaN gradient element poisons ``exp_inf`` as in torch.optim.Adamax.
"""
from optcompile.spec import Abs, Interval, OptimizerSpec, clamp, oo

spec = OptimizerSpec("Adamax", weight_decay="l2", state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 2e-3, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
beta1, beta2 = spec.hyper("betas", (0.9, 0.999), Interval.Ropen(0, 1), names=("beta1", "beta2"),
                          doc="Coefficients for the running average of the gradient and the infinity norm",
                          error=("Invalid beta parameter at index 0: {betas[0]}",
                                 "Invalid beta parameter at index 1: {betas[1]}"))
eps = spec.hyper("eps", 1e-8, Interval(0, oo), doc="Added to the denominator to improve numerical stability",
                 error="Invalid epsilon value: {eps}")
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
spec.signature("lr", "betas", "eps", "weight_decay", "foreach", "*", "maximize", "differentiable", "capturable")
g, t = spec.grad, spec.step

m, u = spec.state("exp_avg"), spec.state("exp_inf")
m = spec.assign(m, m + (1 - beta1) * (g - m))
u = spec.assign(u, clamp(beta2 * u, lo=Abs(g) + eps))  # torch.maximum, NaN-propagating as clamp is
clr = spec.let("clr", lr / (1 - beta1**t))
spec.update(m / u, lr=clr)
