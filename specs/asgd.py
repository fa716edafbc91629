r"""ASGD: averaged stochastic gradient descent (Polyak & Juditsky, 1992, SIAM J. Control Optim. 30(4)), as torch.optim.ASGD.

$g \leftarrow g + \lambda_{wd} p$ (L2); with the previous step's $\eta$ and $\mu$ (one fp32 value each per param):
$p_t = p_{t-1}(1 - \lambda\eta) - \eta g$; $\bar p_t = p_t$ if $\mu = 1$, else $\bar p_t = \bar p_{t-1} + \mu(p_t - \bar p_{t-1})$
(``ax``); then $\eta \leftarrow \gamma / (1 + \lambda\gamma t)^\alpha$ and $\mu \leftarrow 1/\max(1, t - t_0)$.
"""
from optcompile.spec import Eq, Interval, Max, OptimizerSpec, Piecewise, oo

spec = OptimizerSpec("ASGD", weight_decay="l2", state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 1e-2, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
lambd = spec.hyper("lambd", 1e-4, doc="Decay term")
alpha = spec.hyper("alpha", 0.75, doc="Power of the eta update")
t0 = spec.hyper("t0", 1e6, doc="Step at which averaging starts")
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
spec.signature("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize", "differentiable", "capturable")
g, t = spec.grad, spec.step

eta = spec.state("eta", init=lr, scalar=True)
mu = spec.state("mu", init=1, scalar=True)
ax = spec.state("ax")
p = spec.update(g + lambd * spec.param, lr=eta)  # printed p·(1 - eta·lambd) - eta·g, torch's for-loop
ax = spec.assign(ax, Piecewise((p, Eq(mu, 1)), (ax + mu * (p - ax), True)))
eta = spec.assign(eta, spec.let("eta_t", lr / (1 + lambd * lr * t)**alpha))  # computed in double, stored fp32
mu = spec.assign(mu, spec.let("mu_t", 1 / Max(1, t - t0)))
