r"""NAdam: Adam with Nesterov momentum (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), as torch.optim.NAdam.

$g \leftarrow g + \lambda p$ (L2), or $p \leftarrow p(1-\gamma\lambda)$ with ``decoupled_weight_decay`` (NAdamW);
$\mu_t = \beta_1(1 - \tfrac12\, 0.96^{t\psi})$, $\mu_{t+1} = \beta_1(1 - \tfrac12\, 0.96^{(t+1)\psi})$,
$\Pi_t = \Pi_{t-1}\,\mu_t$ (``mu_product``: one fp32 value per param, $\Pi_0 = 1$);
$m_t = \beta_1 m_{t-1} + (1-\beta_1) g$, $v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2$,
$d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon$,
$p_t = p_{t-1} - \gamma\frac{1-\mu_t}{1-\Pi_t}\, g/d_t - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\, m_t/d_t$.
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("NAdam", weight_decay="l2", decoupled_flag="decoupled_weight_decay", state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 2e-3, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
eps = spec.hyper("eps", 1e-8, Interval(0, oo), doc="Added to the denominator to improve numerical stability",
                 error="Invalid epsilon value: {eps}")
beta1, beta2 = spec.hyper("betas", (0.9, 0.999), Interval.Ropen(0, 1), names=("beta1", "beta2"),
                          doc="Coefficients for the running averages of the gradient and its square",
                          error=("Invalid beta parameter at index 0: {betas[0]}",
                                 "Invalid beta parameter at index 1: {betas[1]}"))
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
psi = spec.hyper("momentum_decay", 4e-3, Interval(0, oo), doc="Momentum decay",
                 error="Invalid momentum_decay value: {momentum_decay}")
spec.flag("decoupled_weight_decay", False, doc="Decay the weights as AdamW does (NAdamW), not by an L2 penalty")
spec.signature("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "*", "foreach",
               "maximize", "capturable", "differentiable")
g, t = spec.grad, spec.step

mu = spec.let("mu", beta1 * (1 - 0.5 * 0.96**(t * psi)))
mu_next = spec.let("mu_next", beta1 * (1 - 0.5 * 0.96**((t + 1) * psi)))
mu_product = spec.state("mu_product", init=1, scalar=True)
mu_product = spec.assign(mu_product, mu_product * mu)  # fp32, as torch's mu_product *= mu
m, v = spec.state("exp_avg"), spec.state("exp_avg_sq")
m = spec.assign(m, m + (1 - beta1) * (g - m))  # torch's lerp
v = spec.assign(v, beta2 * v + (1 - beta2) * g**2)
denom = spec.let("denom", sqrt(v / (1 - beta2**t)) + eps)
c_grad = spec.let("c_grad", (1 - mu) / (1 - mu_product))
c_avg = spec.let("c_avg", mu_next / (1 - mu_product * mu_next))
spec.update(c_grad * g / denom + c_avg * m / denom, lr=lr)
