r"""Adadelta (Zeiler, 2012, arXiv:1212.5701), as torch.optim.Adadelta.

$g \leftarrow g + \lambda p$ (L2), $v_t = \rho v_{t-1} + (1-\rho) g^2$,
$\Delta_t = \sqrt{u_{t-1}+\epsilon}\,/\sqrt{v_t+\epsilon}\; g$, $u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2$,
$p_t = p_{t-1} - \gamma \Delta_t$ ($\gamma$ = 1 in the paper).
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("Adadelta", weight_decay="l2", state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 1.0, Interval(0, oo), doc="Coefficient that scales delta before it is applied to the "
                "parameters", error="Invalid learning rate: {lr}")
rho = spec.hyper("rho", 0.9, Interval(0, 1), doc="Coefficient for the running averages of squared gradients and "
                 "squared updates", error="Invalid rho value: {rho}")
eps = spec.hyper("eps", 1e-6, Interval(0, oo), doc="Added to the denominator to improve numerical stability",
                 error="Invalid epsilon value: {eps}")
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
spec.signature("lr", "rho", "eps", "weight_decay", "foreach", "*", "capturable", "maximize", "differentiable")
g = spec.grad

v, u = spec.state("square_avg"), spec.state("acc_delta")
v = spec.assign(v, rho * v + (1 - rho) * g**2)
std = spec.let("std", sqrt(v + eps))  # named: a division, as torch, not a multiply by rsqrt
ratio = spec.let("ratio", sqrt(u + eps) / std)  # then times g: torch's rounding
delta = spec.let("delta", ratio * g)
u = spec.assign(u, rho * u + (1 - rho) * delta**2)
spec.update(delta, lr=lr)
