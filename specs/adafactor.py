r"""Adafactor (Shazeer & Stern, 2018, arXiv:1804.04235), as torch.optim.Adafactor.

The paper keeps the second moment of a matrix gradient $G_t \in \mathbb{R}^{n \times m}$ factored:
$R_t = \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,(G_t^2) 1_m$ (rows), $C_t = \hat\beta_{2t} C_{t-1} +
(1-\hat\beta_{2t})\,1_n^\top (G_t^2)$ (columns), $\hat V_t = R_t C_t / 1_n^\top R_t$, with $\hat\beta_{2t} =
1 - t^{\tau}$; the step is $\alpha_t = \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\,\rho_t$, $\rho_t = \min(\gamma,
1/\sqrt t)$, and the update $U_t = G_t/\sqrt{\hat V_t}$ is clipped: $\hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d)$.
torch's variant: row and column *means* of $G_t^2$ (the last two dims; leading dims are batch dims),
$\hat V_t = R_t C_t / \max(\mathrm{mean}(R_t), \epsilon_1)$, then $U_t = G_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}$;
params with fewer than 2 dims keep a full $V_t$; $\epsilon_1 = $ None is the dtype's machine epsilon;
decoupled weight decay $X_t \leftarrow X_{t-1}(1 - \gamma\lambda)$ uses the lr $\gamma$, not $\alpha_t$.
"""
from optcompile.spec import Interval, Max, Min, OptimizerSpec, Piecewise, clamp, oo, sqrt

spec = OptimizerSpec("Adafactor", weight_decay="decoupled", state_dict="torch")
lr = spec.hyper("lr", 1e-2, Interval(0, oo), doc="Learning rate (caps the relative step size)",
                error="Learning rate should be >= 0 but is: {lr}")
tau = spec.hyper("beta2_decay", -0.8, Interval(-oo, 0), doc="Decay rate of beta2: 1 - beta2_t = step**beta2_decay",
                 error="beta2_decay should be <= 0 but is: {beta2_decay}")
eps1, eps2 = spec.hyper("eps", (None, 1e-3), Interval(0, oo), names=("eps1", "eps2"),
                        doc="Floor of the second moment (None: the dtype's eps) and of the param RMS",
                        error=("epsilon1 should be >= 0 but is: {eps[0]}", "epsilon2 should be >= 0 but is: {eps[1]}"))
d = spec.hyper("d", 1.0, Interval(1, oo), doc="Clipping threshold of the update RMS",
               error="Clipping threshold d should be >= 1 but is: {d}")
spec.weight_decay_hyper(0.0, error="weight_decay should be >= 0 but is: {weight_decay}")
spec.signature("lr", "beta2_decay", "eps", "d", "weight_decay", "*", "foreach", "maximize")
g, t, n = spec.grad, spec.step, spec.numel

factored = spec.let("factored", spec.ndim > 1)  # per tensor: row and column factors, or a full variance
w = spec.let("one_minus_beta2_t", t**tau)
rho = spec.let("rho", Min(lr, 1 / sqrt(t)))
eps1_t = spec.let("eps1_t", Piecewise((spec.dtype_eps, spec.is_none(eps1)), (eps1, True)))
alpha = spec.let("alpha", Max(eps2, sqrt(spec.sum(spec.param**2)) / sqrt(n)) * rho)
r = spec.state("row_var", axis=-1, when=factored)
c = spec.state("col_var", axis=-2, when=factored)
v = spec.state("variance", when=~factored)
g2 = spec.let("g2", g**2)
r = spec.assign(r, (1 - w) * r + w * spec.mean(g2, axis=-1), when=factored)  # torch's lerp
c = spec.assign(c, (1 - w) * c + w * spec.mean(g2, axis=-2), when=factored)
v = spec.assign(v, (1 - w) * v + w * g2, when=~factored)
v_hat = Piecewise((r * c / clamp(spec.mean(r, axis=-2), lo=eps1_t), factored), (v, True))
u = spec.let("u", g / sqrt(clamp(v_hat, lo=eps1_t**2)))
denom = spec.let("denom", Max(1, sqrt(spec.sum(u**2)) / (sqrt(n) * d)))
spec.update(u, lr=alpha / denom, decay_lr=lr)
