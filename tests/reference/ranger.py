"""Ranger = RAdam (Liu et al., 2020) + Lookahead (Zhang et al., 2019), paper math with optimi's
debiased moments and decoupled decay. Run it in float64 as the "true" trajectory."""
import math



def ranger_step(p, g, state, *, lr, beta1, beta2, eps, weight_decay, k, alpha, t):
    """One step on tensors of any dtype; ``state`` holds m, v, slow (same dtype as p)."""
    m, v, slow = state["m"], state["v"], state["slow"]
    p = p * (1 - lr * weight_decay)
    m = m + (1 - beta1) / (1 - beta1**t) * (g - m)  # = bias-corrected EMA
    v = v + (1 - beta2) / (1 - beta2**t) * (g * g - v)
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho > 5:
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        p = p - lr * rect * m / (v.sqrt() + eps)
    else:
        p = p - lr * m
    if t % k == 0:
        slow = slow + alpha * (p - slow)
        p = slow
    state.update(m=m, v=v, slow=slow)
    return p
