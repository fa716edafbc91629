r"""SGDScheduleFree: Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682), as schedulefree's.

Two sequences per param: $z$ (the SGD iterate, state ``z``) and $x$ (their weighted average); the
model holds $y = (1-\beta) z + \beta x$ while training and $x$ for evaluation (``eval()``/``train()``).
With $t$ the step, $\gamma_t = \gamma \min(1, t / T_{warmup})$, $\gamma_{max} = \max_{s \le t} \gamma_s$
(``lr_max``), the weight $w_t = t^r \gamma_{max}^{p}$ and $W_t = W_{t-1} + w_t$ (``weight_sum``, a
running sum under any schedule), $c_t = w_t / W_t$ ($0$ while $W_t = 0$):
$g \leftarrow g + \lambda y$; $y \leftarrow \mathrm{lerp}(y, z, c_t) + \gamma_t(\beta(1 - c_t) - 1)\, g$; $z \leftarrow z - \gamma_t g$.
Views: $x = \mathrm{lerp}(y, z, 1 - 1/\beta)$, $y = \mathrm{lerp}(x, z, 1 - \beta)$.
"""
from optcompile.spec import Eq, Interval, Max, Ne, OptimizerSpec, Piecewise, oo

spec = OptimizerSpec("SGDScheduleFree", weight_decay=None)
lr = spec.hyper("lr", 1.0, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
beta = spec.hyper("momentum", 0.9, Interval.open(0, 1), doc="Momentum factor: the interpolation between z and x",
                  error="Momentum must be between 0 and 1 exclusive: {momentum}")
wd = spec.hyper("weight_decay", 0, Interval(0, oo), doc="Weight decay, an L2 penalty computed at y",
                error="Invalid weight_decay value: {weight_decay}")
warmup = spec.hyper("warmup_steps", 0, Interval(0, oo), type=int, doc="Steps of linear learning rate warmup",
                    error="Invalid warmup_steps value: {warmup_steps}")
r = spec.hyper("r", 0.0, doc="Polynomial weighting of the average: weights grow as step**r")
power = spec.hyper("weight_lr_power", 2, doc="The average's weights are the maximum lr so far to this power")
g, t, p = spec.grad, spec.step, spec.param

sched = spec.let("sched", Piecewise((t / warmup, t <= warmup), (1, True)))
lr_t = spec.let("scheduled_lr", lr * sched)
lr_max = spec.state("lr_max", init=-1, scalar=True, precision="fp64")  # as schedulefree's Python floats
lr_max = spec.assign(lr_max, Max(lr_t, lr_max))
weight = spec.let("weight", t**r * lr_max**power)
weight_sum = spec.state("weight_sum", init=0, scalar=True, precision="fp64")
weight_sum = spec.assign(weight_sum, weight_sum + weight)
ckp1 = spec.let("ckp1", Piecewise((0, Eq(weight_sum, 0)), (weight / weight_sum, True)))
y_step = spec.let("y_step", lr_t * (beta * (1 - ckp1) - 1))

z = spec.state("z", init=p)
spec.eval_view(eval=p + (1 - 1 / beta) * (z - p), train=p + (1 - beta) * (z - p))
g = spec.let("g_wd", Piecewise((g + wd * p, Ne(wd, 0)), (g, True)))  # at y, before y moves
y = spec.set_param(p + ckp1 * (z - p))  # y.lerp_(z, ckp1)
spec.set_param(y + y_step * g)
spec.assign(z, z - lr_t * g)
