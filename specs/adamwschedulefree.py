r"""AdamWScheduleFree: Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682), as schedulefree's.

Schedule-Free SGD's interpolation (specs/sgdschedulefree.py) with Adam's normalised gradient: with
$t$ the step, $\gamma_t = \gamma \min(1, t / T_{warmup})$, $\gamma_{max} = \max_{s \le t} \gamma_s$
(``lr_max``), $w_t = t^r \gamma_{max}^{p}$, $W_t = W_{t-1} + w_t$ (``weight_sum``), $c_t = w_t / W_t$:
$v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2$, $d = g / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon) + \lambda y$ (decay at $y$);
$y \leftarrow \mathrm{lerp}(y, z, c_t) + \gamma_t(\beta_1(1 - c_t) - 1)\, d$; $z \leftarrow z - \gamma_t d$.
Views: $x = \mathrm{lerp}(y, z, 1 - 1/\beta_1)$, $y = \mathrm{lerp}(x, z, 1 - \beta_1)$.
"""
from optcompile.spec import Eq, Interval, Max, Ne, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("AdamWScheduleFree", weight_decay=None)
lr = spec.hyper("lr", 0.0025, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
beta1, beta2 = spec.hyper("betas", (0.9, 0.999), (Interval.Lopen(0, 1), Interval.Ropen(0, 1)),
                          names=("beta1", "beta2"),
                          doc="beta1 interpolates between z and x; beta2 is the squared gradient's average",
                          error=("Invalid beta parameter at index 0: {betas[0]}",
                                 "Invalid beta parameter at index 1: {betas[1]}"))
eps = spec.hyper("eps", 1e-8, Interval(0, oo), doc="Added to the denominator outside the square root",
                 error="Invalid epsilon value: {eps}")
wd = spec.hyper("weight_decay", 0, Interval(0, oo), doc="Weight decay, computed at y",
                error="Invalid weight_decay value: {weight_decay}")
warmup = spec.hyper("warmup_steps", 0, Interval(0, oo), type=int, doc="Steps of linear learning rate warmup",
                    error="Invalid warmup_steps value: {warmup_steps}")
r = spec.hyper("r", 0.0, doc="Polynomial weighting of the average: weights grow as step**r")
power = spec.hyper("weight_lr_power", 2.0, doc="The average's weights are the maximum lr so far to this power")
g, t, p = spec.grad, spec.step, spec.param

sched = spec.let("sched", Piecewise((t / warmup, t <= warmup), (1, True)))
lr_t = spec.let("scheduled_lr", lr * sched)
bias_correction2 = spec.let("bias_correction2", 1 - beta2**t)
lr_max = spec.state("lr_max", init=-1, scalar=True, precision="fp64")  # as schedulefree's Python floats
lr_max = spec.assign(lr_max, Max(lr_t, lr_max))
weight = spec.let("weight", t**r * lr_max**power)
weight_sum = spec.state("weight_sum", init=0, scalar=True, precision="fp64")
weight_sum = spec.assign(weight_sum, weight_sum + weight)
ckp1 = spec.let("ckp1", Piecewise((0, Eq(weight_sum, 0)), (weight / weight_sum, True)))
y_step = spec.let("y_step", lr_t * (beta1 * (1 - ckp1) - 1))

z = spec.state("z", init=p)
v = spec.state("exp_avg_sq")
spec.eval_view(eval=p + (1 - 1 / beta1) * (z - p), train=p + (1 - beta1) * (z - p))
v = spec.assign(v, beta2 * v + (1 - beta2) * g**2)
d = spec.let("d", g / (sqrt(v / bias_correction2) + eps))
d = spec.let("d_wd", Piecewise((d + wd * p, Ne(wd, 0)), (d, True)))  # at y, before y moves
y = spec.set_param(p + ckp1 * (z - p))  # y.lerp_(z, ckp1)
spec.set_param(y + y_step * d)
spec.assign(z, z - lr_t * d)
