r"""RMSprop (Hinton, 2012, Lecture 6e; centered: Graves, 2013, arXiv:1308.0850), as torch.optim.RMSprop.

$g \leftarrow g + \lambda p$ (L2), $v_t = \alpha v_{t-1} + (1-\alpha) g^2$; centered:
$\bar g_t = \bar g_{t-1} + (1-\alpha)(g - \bar g_{t-1})$ and $\tilde v_t = v_t - \bar g_t^2$, else $\tilde v_t = v_t$;
with momentum $\mu > 0$: $b_t = \mu b_{t-1} + g/(\sqrt{\tilde v_t}+\epsilon)$, $p_t = p_{t-1} - \gamma b_t$;
else $p_t = p_{t-1} - \gamma g/(\sqrt{\tilde v_t}+\epsilon)$. No step count, no bias correction.
"""
from optcompile.spec import Gt, Interval, OptimizerSpec, Piecewise, oo, sqrt

spec = OptimizerSpec("RMSprop", weight_decay="l2", state_dict="torch",
                     group_constants={"capturable": False, "differentiable": False})
lr = spec.hyper("lr", 1e-2, Interval(0, oo), doc="Learning rate", error="Invalid learning rate: {lr}")
alpha = spec.hyper("alpha", 0.99, Interval(0, oo), doc="Smoothing constant", error="Invalid alpha value: {alpha}")
eps = spec.hyper("eps", 1e-8, Interval(0, oo), doc="Added to the denominator to improve numerical stability",
                 error="Invalid epsilon value: {eps}")
spec.weight_decay_hyper(0, error="Invalid weight_decay value: {weight_decay}")
momentum = spec.hyper("momentum", 0, Interval(0, oo), doc="Momentum factor", error="Invalid momentum value: {momentum}")
centered = spec.flag("centered", False, doc="Normalize by an estimate of the gradient's variance")
spec.signature("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable", "foreach", "maximize",
               "differentiable")
g, use_momentum = spec.grad, Gt(momentum, 0)

v, ga = spec.state("square_avg"), spec.state("grad_avg", when=centered)
b = spec.state("momentum_buffer", when=use_momentum)
v = spec.assign(v, alpha * v + (1 - alpha) * g**2)
ga = spec.assign(ga, ga + (1 - alpha) * (g - ga), when=centered)  # torch's lerp
avg = spec.let("avg", Piecewise((sqrt(v - ga**2), centered), (sqrt(v), True)) + eps)
b = spec.assign(b, momentum * b + g / avg, when=use_momentum)
spec.update(Piecewise((b, use_momentum), (g / avg, True)), lr=lr)
