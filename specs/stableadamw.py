r"""StableAdamW: AdamW with update clipping (Wortsman et al., 2023, arXiv:2304.13013).

Moments as optimi's Adam (debiased betas, stored bias-corrected). Per tensor,
$\mathrm{RMS}_t = \sqrt{\mathrm{mean}(g_t^2 / \max(v_t, \epsilon^2))}$ and $\gamma_t = \gamma / \max(1, \mathrm{RMS}_t)$;
$p_t = p_{t-1}(1-\gamma_t\lambda) - \gamma_t m_t/(\sqrt{v_t}+\epsilon)$: decoupled decay uses the clipped lr.
``eps_sq`` ($\epsilon^2$ in the param dtype) is kept in the state for optimi's state_dict layout, but the
math uses $\epsilon^2$ in fp32 (in fp16 optimi's ``eps_sq`` underflows to 0).
"""
from optcompile.spec import Interval, Max, OptimizerSpec, oo, sqrt

spec = OptimizerSpec("StableAdamW", weight_decay="decoupled")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
beta1, beta2 = spec.hyper("betas", default=(0.9, 0.99), names=("beta1", "beta2"), domain=Interval.Ropen(0, 1),
                          doc="Coefficients for gradient and squared gradient moving averages")
spec.weight_decay_hyper(1e-2)
eps = spec.hyper("eps", default=1e-6, domain=Interval(0, oo), doc="Added to denominator to improve numerical stability")
g, t = spec.grad, spec.step

beta1_t = spec.let("beta1_t", (beta1**t - beta1) / (beta1**t - 1))  # debiased: 0 at t = 1
beta2_t = spec.let("beta2_t", (beta2**t - beta2) / (beta2**t - 1))
m, v = spec.state("exp_avg"), spec.state("exp_avg_sq")
spec.state("eps_sq", init=eps**2, scalar=True)
m = spec.assign(m, beta1_t * m + (1 - beta1_t) * g)
v = spec.assign(v, beta2_t * v + (1 - beta2_t) * g**2)
rms = spec.let("rms", sqrt(spec.mean(g**2 / Max(v, eps**2))))
lr_t = spec.let("lr_t", lr / Max(1, rms))
spec.update(m / (sqrt(v) + eps), lr=lr_t)
