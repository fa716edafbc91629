"""StableAdamW (Wortsman et al., 2023) as optimi computes it, but with eps² in float32: every
buffer is loaded as float32, computed in float32 and rounded once on store (optcompile's
low-precision contract). optimi keeps eps² as a param-dtype tensor, which is 0 in float16."""
import torch


def stableadamw_step(p, g, state, *, lr, beta1, beta2, eps, weight_decay, t):
    """``p``, ``g`` and ``state['m']``, ``state['v']`` in any float dtype; updated in place."""
    dt = p.dtype
    p32, g32, m, v = p.float(), g.float(), state["m"].float(), state["v"].float()
    b1 = (beta1**t - beta1) / (beta1**t - 1)
    b2 = (beta2**t - beta2) / (beta2**t - 1)
    m = torch.lerp(m, g32, 1 - b1)
    v = torch.addcmul(v * b2, g32, g32, value=1 - b2)
    state["m"].copy_(m.to(dt))
    state["v"].copy_(v.to(dt))
    m, v = state["m"].float(), state["v"].float()  # later reads see the stored (rounded) values
    rms = (g32 * g32 / v.clamp_min(eps * eps)).mean().sqrt().item()
    lr_t = lr / max(1.0, rms)
    p32 = torch.addcdiv(p32 * (1 - lr_t * weight_decay), m, v.sqrt() + eps, value=-lr_t)
    p.copy_(p32.to(dt))
