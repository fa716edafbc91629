"""The kernel backends' segments as torch code: the statements of a reduced shape (axis reductions,
updates of reduced-shape states) and the tensor functions (``spec.matrix_fn``) that run between two
kernel stages (kernel_plan.Segment).

A segment is printed by the foreach backend's printer (tensor_code.py) over the lists of one
(device, dtype) group, so its math, grouping and rounding are the foreach step's: reduced-shape
states are read from their storage into fp32 views, updated, and written back rounded to their
storage (to nearest, or stochastically with the foreach backend's bits); the full-shape values it
reduces come from the kernels' fp32 spills, as views shaped like the params; the values later
stages read are fp32 tensors of a reduced shape (the axis buffers), or of the param's shape (a
tensor function's result, over the fp32 spill of its input: per tensor, or once over the stack
of same-shaped params where the function is batched). The Triton launcher runs these
lines between its launches; the fused C kernel calls them back between its stages.
"""
from __future__ import annotations

import itertools

from ..ir import TRUE, Program, TensorFunction
from ..kernel_plan import KernelPlan, Segment, target_of
from .tensor_code import ForeachDialect, buffer_slot, emit_body


def lines(prog: Program, plan: KernelPlan, seg: Segment, spill: str) -> list[str]:
    """``seg`` as Python lines over ``params`` and the state lists (``<state>s``); ``spill``: the
    expression (with ``{i}``, the spill's row) of a spill's per-tensor views."""
    fns = [s.fn for s in seg.body if isinstance(s, TensorFunction)]
    what = " and ".join((["on values of a reduced shape"] if len(fns) < len(seg.body) else []) +
                        [f"of the tensor function {f}" for f in dict.fromkeys(fns)])
    out = [f"# segment {seg.index}: torch ops {what} (the foreach backend's)",
           "param = params  # the foreach printer's list (its length, for host scalars zipped with it)"]
    for n in seg.states:
        out.append(f"_{n}_s = {n}s")
        out.append(f"{n} = fp32(_{n}_s)")
    spills = [b.name for b in plan.spills]
    for name in seg.spills:
        out.append(f"{plan.buffer(name).value} = {spill.format(i=spills.index(name))}")
    out += [f"{n} = None  # computed only where its readers run" for n in seg.outputs
            if any(target_of(s) == n and s.guard != TRUE for s in seg.body)]
    body, written = emit_body(prog, ForeachDialect(), seg.body, itertools.count())
    out += body
    for n in written:
        out += ForeachDialect().writeback(n, buffer_slot(prog, n))
    return out


def function(prog: Program, plan: KernelPlan) -> list[str]:
    """``_segments_<fn>(k, params, grads, *state lists, kahan_comps, spills, **host)``: segment ``k``,
    returning its axis buffers (the fused C kernel's callback runs it; ``spills[i]``: the views of
    spill row ``i``)."""
    states = [f"{s.name}s" for s in prog.states if s.name != "kahan_comp"]
    head = (f"def _segments_{prog.functional}(_k, params, grads, {', '.join(states)}, kahan_comps, spills, *, "
            f"{', '.join(plan.host_inputs)}, _sr=None):")
    out = [head, '    """The fused C kernel\'s segments (codegen/segments.py): torch ops between its stages; returns',
           '    the segment\'s axis buffers, fp32 tensors of a reduced shape, per tensor."""']
    for seg in plan.segments:
        out.append(f"    if _k == {seg.index}:")
        out += ["        " + line for line in lines(prog, plan, seg, "spills[{i}]")]
        out.append(f"        return [{', '.join(seg.outputs)}]")
    out.append(f'    raise IndexError(f"no segment {{_k}}")')
    return out
