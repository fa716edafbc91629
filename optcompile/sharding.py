"""Per-tensor reductions over sharded DTensors (FSDP2): partial results, all-reduced.

A spec's ``spec.sum``/``spec.mean``/``spec.max`` and ``spec.numel`` are per-tensor values: of the
whole tensor, also when a rank holds only a shard of it. Every backend computes a reduction as
partials over the elements it has, so under sharding each rank computes its shard's partial and
the runtime combines them across the shard group (the process groups of the mesh dims a DTensor
is sharded over) at the reduction boundary: the later stages then run on the local shard, and no
rank gathers a full tensor. The object passed to a backend as ``_shards`` holds, for the tensors
of one call, what that takes:

* ``numel``: each tensor's global element count (a DTensor's ``numel()``), which ``spec.numel``
  reads and a mean divides by;
* the all-reduce of partials: a sum or a mean (each rank's part: its local sum divided by the
  global numel) is all-reduced with SUM, a max with MAX. An empty shard (uneven sharding) adds 0
  to a sum and -inf to a max. NaN propagates through a max as in ``torch.max`` (a rank's NaN is
  sent as a flag beside the value: the collectives' MAX need not propagate it).

Where a backend calls it: the eager loop once per reduction per tensor, the foreach backend once
per reduction per call (all the call's tensors in one collective), the fused C kernel and the
Triton kernels once per stage that reduces (the stage's sums in one collective, its maxes in
another). Collectives pair up by order, so every rank must make the same calls: the runtime splits
a step into calls by what is the same on every rank (param order, placements, dtype, global
sizes), never by a rank's local sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ShardedReductions:
    """``_shards`` of one backend call: the global numel of each of its tensors and the process
    groups a reduction over one of them spans (one per sharded mesh dim)."""

    numel: tuple[int, ...]
    groups: tuple  # torch.distributed ProcessGroups

    def take(self, index: Sequence[int]) -> "ShardedReductions":
        """The same for a subset of the call's tensors (a CPU batch, a fallback split)."""
        return ShardedReductions(tuple(self.numel[i] for i in index), self.groups)

    def sizes(self, device) -> torch.Tensor:
        """The global numels as an int64 tensor on ``device`` (the kernels' ``numel`` table)."""
        return torch.tensor(self.numel, dtype=torch.int64).to(device)

    # ── the collectives ────────────────────────────────────────────────────────────────────────
    def all_reduce_sums(self, x: torch.Tensor) -> None:
        """Sum ``x`` (partials: sums, or means' parts) over the shards, in place."""
        import torch.distributed as dist
        if x.numel():
            for group in self.groups:
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)

    def all_reduce_maxes(self, x: torch.Tensor) -> None:
        """The max of ``x`` over the shards, in place; NaN on any shard gives NaN."""
        import torch.distributed as dist
        if not x.numel():
            return
        flat = x.reshape(-1)
        nan = torch.isnan(flat)
        both = torch.cat([torch.where(nan, torch.full_like(flat, -math.inf), flat), nan.to(flat.dtype)])
        for group in self.groups:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        value, any_nan = both.split(flat.numel())
        x.copy_(torch.where(any_nan > 0, torch.full_like(value, math.nan), value).view_as(x))

    # ── the eager and foreach backends: one tensor (``i``) or the call's list ──────────────────
    def sum(self, x, i: int | None = None):
        return self._reduce("sum", x, i)

    def mean(self, x, i: int | None = None):
        return self._reduce("mean", x, i)

    def max(self, x, i: int | None = None):
        return self._reduce("max", x, i)

    def _reduce(self, op: str, x, i: int | None):
        """A 0-dim tensor (eager: ``x`` a tensor, ``i`` its index in the call) or a list of them
        (foreach: ``x`` the call's list), in ``x``'s dtype and on its device."""
        xs = [x] if i is not None else list(x)
        numel = [self.numel[i]] if i is not None else self.numel
        if not xs:
            return []
        if op == "max":
            parts = torch.stack([t.max() if t.numel() else t.new_full((), -math.inf) for t in xs])
            self.all_reduce_maxes(parts)
        else:
            parts = torch.stack([t.sum() for t in xs])
            if op == "mean":
                parts /= torch.tensor(numel, dtype=parts.dtype).to(parts.device)
            self.all_reduce_sums(parts)
        return parts[0] if i is not None else list(parts.unbind())

    # ── the kernels: a stage's totals ───────────────────────────────────────────────────────────
    def all_reduce_totals(self, totals: torch.Tensor, sums: Sequence[int], maxes: Sequence[int]) -> None:
        """Rows of ``totals`` (``[reductions, tensors]``, the Triton launch's) that one stage
        reduced: ``sums`` (sums and means' parts) summed, ``maxes`` maxed, in place."""
        for rows, reduce in ((sums, self.all_reduce_sums), (maxes, self.all_reduce_maxes)):
            if rows:
                part = totals[list(rows)]
                reduce(part)
                totals[list(rows)] = part


def reduction_groups(x) -> tuple | None:
    """The process groups a reduction over DTensor ``x`` spans: one per mesh dim it is sharded
    over, () if it is replicated; None if a placement is ``Partial`` (its elements are pending
    sums, which a local reduction cannot use: the runtime steps the full tensor)."""
    groups = []
    for dim, placement in enumerate(x.placements):
        if placement.is_replicate():
            continue
        if placement.is_partial():
            return None
        groups.append(x.device_mesh.get_group(dim))
    return tuple(groups)
