r"""Adagrad (Duchi, Hazan & Singer, 2011, JMLR 12), as torch.optim.Adagrad.

$g \leftarrow g + \lambda p$ (L2), $\tilde\gamma_t = \gamma / (1 + (t-1)\eta)$ (``lr_decay`` $\eta$),
$s_t = s_{t-1} + g^2$ from $s_0 = $ ``initial_accumulator_value``,
$p_t = p_{t-1} - \tilde\gamma_t g/(\sqrt{s_t}+\epsilon)$.
"""
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("Adagrad", weight_decay="l2", state_dict="torch",
                     group_constants={"differentiable": False})
lr = spec.hyper("lr", 1e-2, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
lr_decay = spec.hyper("lr_decay", 0, Interval(0, oo), doc="Learning rate decay",
                      error="Invalid lr_decay value: {lr_decay}")
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
s0 = spec.hyper("initial_accumulator_value", 0, Interval(0, oo), doc="Initial value of the sum of squares",
                error="Invalid initial_accumulator_value value: {initial_accumulator_value}")
eps = spec.hyper("eps", 1e-10, Interval(0, oo), doc="Added to the denominator to improve numerical stability",
                 error="Invalid epsilon value: {eps}")
spec.signature("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach", "*", "maximize",
               "differentiable", "fused")
g, t = spec.grad, spec.step

s = spec.state("sum", init=s0)
s = spec.assign(s, s + g**2)
clr = spec.let("clr", lr / (1 + (t - 1) * lr_decay))
spec.update(g / (sqrt(s) + eps), lr=clr)
