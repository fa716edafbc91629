r"""Muon (Jordan et al., 2024, kellerjordan.github.io/posts/muon), as torch.optim.Muon: momentum
orthogonalized by a Newton–Schulz iteration, for the 2-D weights of hidden layers.

$B_t = \mu B_{t-1} + (1-\mu) g_t$ (torch's lerp); $\tilde B_t = (1-\mu) g_t + \mu B_t$ if nesterov, else $B_t$;
$O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t; \varepsilon)$ (in bf16, on the wide orientation: $X \leftarrow X/\max(\lVert X\rVert_F, \varepsilon)$,
then $k$ times $A = XX^\top$, $X \leftarrow aX + (bA + cA^2)X$);
$p_t = p_{t-1}(1 - \gamma\lambda) - \gamma' O_t$ for an $A \times B$ param, with $\gamma' = \gamma\sqrt{\max(1, A/B)}$
(``adjust_lr_fn`` None or "original", Keller Jordan's) or $\gamma' = 0.2\gamma\sqrt{\max(A, B)}$ ("match_rms_adamw",
Moonshot's: the update's RMS matches AdamW's, so AdamW's lr and weight decay carry over).
"""
import torch

from optcompile.spec import Interval, Max, OptimizerSpec, Piecewise, oo, sqrt


def newton_schulz(x, a, b, c, ns_steps, eps):
    """torch.optim.Muon's zeroth power of one matrix: ``ns_steps`` quintic Newton–Schulz steps in bf16."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    tall = x.size(0) > x.size(1)
    y = x.bfloat16()
    if tall:
        y = y.T
    y = y / y.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = y @ y.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, update, y, beta=a)
    return y.T if tall else y


spec = OptimizerSpec("Muon", weight_decay="decoupled", state_dict="torch", torch_step=False)
lr = spec.hyper("lr", 1e-3, Interval(0, oo), doc="Learning rate", error="Learning rate should be >= 0 but is: {lr}")
spec.weight_decay_hyper(0.1, error="weight decay should be >= 0 but is: {weight_decay}")
momentum = spec.hyper("momentum", 0.95, Interval(0, oo), doc="Momentum factor",
                      error="momentum should be >= 0 but is: {momentum}")
nesterov = spec.flag("nesterov", True, doc="Nesterov momentum")
a, b, c = spec.hyper("ns_coefficients", (3.4445, -4.775, 2.0315), names=("ns_a", "ns_b", "ns_c"),
                     doc="Coefficients (a, b, c) of the Newton–Schulz polynomial")
eps = spec.hyper("eps", 1e-7, doc="Lower bound of the Frobenius norm the iteration starts from")
ns_steps = spec.hyper("ns_steps", 5, type=int, doc="Number of Newton–Schulz steps")
adjust = spec.hyper("adjust_lr_fn", None, choices=(None, "original", "match_rms_adamw"),
                    doc="How the lr scales with the param's shape (None: 'original')",
                    error="Adjust learning rate function {adjust_lr_fn} is not supported")
spec.signature("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")
spec.param_ndim(2, error="Muon only supports 2D parameters whereas we found a parameter with size: {size}")
g = spec.grad

buf = spec.state("momentum_buffer")
buf = spec.assign(buf, momentum * buf + (1 - momentum) * g)
# torch's grad.lerp(buf, momentum): the end point of a lerp is the term weighted 1 - …
damp = spec.let("damp", 1 - momentum)
direction = Piecewise((damp * g + (1 - damp) * buf, nesterov), (buf, True))
ortho = spec.matrix_fn(newton_schulz, direction, a, b, c, ns_steps, eps)
A, B = spec.size(0), spec.size(1)
ratio = spec.let("ratio", Piecewise((sqrt(Max(1, A / B)), adjust[None] | adjust["original"]),
                                   (0.2 * sqrt(Max(A, B)), adjust["match_rms_adamw"]), (1, True)))
adjusted_lr = spec.let("adjusted_lr", lr * ratio)
spec.update(ortho, lr=adjusted_lr, decay_lr=lr)
