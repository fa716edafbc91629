"""Momentum with each row of the matrix update scaled to unit length, through a batched host
matrix function (``spec.matrix_fn(..., batched=True)``: one call per shape on a stack of the
same-shaped params): m ← μ·m + g, D = rownorm(m), D_i = m_i / (‖m_i‖ + ε), p ← p − lr·D."""
import torch

from optcompile.spec import Interval, OptimizerSpec, oo


def row_normalize(x, eps):
    """Each row of each matrix in the stack ``x`` divided by its L2 norm plus ``eps``."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


spec = OptimizerSpec("RowNormMomentum")
lr = spec.hyper("lr", domain=Interval(0, oo))
momentum = spec.hyper("momentum", default=0.9, domain=Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.0)
eps = spec.hyper("eps", default=1e-8, domain=Interval(0, oo))
spec.param_ndim(2)
m = spec.state("exp_avg")
m = spec.assign(m, momentum * m + spec.grad)
spec.update(spec.matrix_fn(row_normalize, m, eps, batched=True), lr=lr)
