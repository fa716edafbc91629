r"""Rprop: resilient backpropagation (Riedmiller & Braun, 1993, ICNN), as torch.optim.Rprop.

Per element, with $s = \mathrm{sign}(g_t\, g_{t-1})$: the step size $\Delta_t = \mathrm{clamp}(\Delta_{t-1}\,\eta,
\Delta_{\min}, \Delta_{\max})$ with $\eta = \eta_+$ if $s > 0$, $\eta_-$ if $s < 0$, else 1 ($\Delta_0 = \gamma$);
where $\eta = \eta_-$ the gradient is forgotten ($g_t \leftarrow 0$); $p_t = p_{t-1} - \mathrm{sign}(g_t)\,\Delta_t$,
and ``prev`` keeps $g_t$. The learning rate only sets $\Delta_0$ (as in torch, a scheduler has no effect).
"""
from optcompile.spec import Eq, Interval, Max, Min, OptimizerSpec, Piecewise, oo, sign

spec = OptimizerSpec("Rprop", weight_decay=None, state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 1e-2, Interval(0, oo), doc="Learning rate: the initial step size",
                error="Invalid learning rate: {lr}")
etaminus, etaplus = spec.hyper("etas", (0.5, 1.2), (Interval.open(0, 1), Interval.open(1, oo)),
                               names=("etaminus", "etaplus"), doc="Multiplicative decrease and increase factors",
                               error="Invalid eta values: {etas[0]}, {etas[1]}")
step_min, step_max = spec.hyper("step_sizes", (1e-6, 50), names=("step_size_min", "step_size_max"),
                                doc="Minimal and maximal allowed step sizes")
spec.signature("lr", "etas", "step_sizes", "*", "capturable", "foreach", "maximize", "differentiable")
g = spec.grad

prev, size = spec.state("prev"), spec.state("step_size", init=lr)
s = spec.let("s", sign(g * prev))
eta = spec.let("eta", Piecewise((etaplus, s > 0), (etaminus, s < 0), (1, True)))
size = spec.assign(size, Max(Min(size * eta, step_max), step_min))  # clamp
g_t = spec.let("g_t", Piecewise((0, Eq(eta, etaminus)), (g, True)))
spec.assign(prev, g_t)
spec.update(sign(g_t) * size, lr=1)
