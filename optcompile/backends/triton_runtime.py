"""Runtime of the generated Triton kernels: the device tables of a multi-tensor launch, and the
``"triton"`` backend loader.

A step over N tensors is one launch per stage. Program ``i`` reads ``program_tensor[i]`` and
``program_start[i]`` and finds that tensor's buffers in per-buffer tables of ``data_ptr`` values
(``pointers[b][t]``; 0 for an absent state, which constexpr guards never touch). The tables are
built once and cached while the same buffers (same data pointers and sizes) come back, so a
steady training loop pays one dictionary lookup per step; the layout part (which depends only on
the sizes) and the pointer part are cached separately, because fresh gradients from
``zero_grad(set_to_none=True)`` change pointers but not sizes.

Triton is imported only when a generated kernel module is loaded: ``TRITON_INTERPRET`` must be set
before that import to run kernels on CPU tensors.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .. import loader
from ..kernel_plan import broadcast_index
from ..layouts import MISSING, LayoutCache
from ..runtime import reduced_shape

_CACHE_SIZE = 64  # tables kept per kind (gradient release builds one per parameter)
_LAYOUTS: OrderedDict = OrderedDict()
_POINTERS: OrderedDict = OrderedDict()
_BROADCASTS: OrderedDict = OrderedDict()
_CHECKED = LayoutCache()  # layouts that passed _check
_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TL_CODES = {torch.int8: "int8", torch.uint8: "uint8"}  # a state of 8-bit codes, beside its block scales


class UnsupportedTensors(TypeError):
    """These tensors cannot run in the Triton kernels (dtype, layout, device)."""


@dataclass
class Layout:
    """Device tables that depend only on the tensors' sizes (and the block size)."""

    n_tensors: int
    n_programs: int
    numels: torch.Tensor  # int64 [n_tensors]
    program_tensor: torch.Tensor  # int64 [n_programs]
    program_start: torch.Tensor  # int64 [n_programs]
    tensor_first_program: torch.Tensor  # int64 [n_tensors + 1]
    tensor_offsets: torch.Tensor  # int64 [n_tensors]: where each tensor starts in a scratch row
    total: int  # elements over all tensors
    partials: torch.Tensor  # fp32 [n_reductions, n_programs]
    totals: torch.Tensor  # fp32 [n_reductions, n_tensors]
    host_offsets: tuple[int, ...] = ()  # tensor_offsets on the host (the segments' views of the spills)

    @property
    def grid(self) -> tuple[int]:
        return (self.n_programs,)


@dataclass
class Pointers:
    table: torch.Tensor  # int64 [n_buffers, n_tensors]: data_ptr, 0 for an absent state
    aligned: bool  # all 16-byte aligned and every numel a multiple of 16: kernels may use vector loads


@dataclass
class LaunchPlan:
    layout: Layout
    pointers: torch.Tensor  # int64 [n_buffers, n_tensors]
    aligned: bool
    dtype: object  # tl dtype of param and kahan_comp
    grad_dtype: object
    spills: torch.Tensor | None  # fp32 [n_spills, total]: values a later stage reads, for this step only
    state_dtypes: tuple = ()  # tl dtype of each state (state_precision)
    tensor_keys: torch.Tensor | None = None  # int64 [n_tensors]: stochastic rounding's keys, or None
    broadcast: torch.Tensor | None = None  # int64 [n_tensors, n_shapes, 6]: kernel_plan.broadcast_index
    held: list = field(default_factory=list)  # the segments' axis buffers, alive while kernels read them

    def __getattr__(self, name):  # grid, numels, program_tensor, … come from the layout
        return getattr(self.__dict__["layout"], name)

    def spill_views(self, i: int, params) -> list[torch.Tensor]:
        """Spill row ``i`` as one fp32 view per tensor, laid out like its param (the kernels write a
        dense param's elements in memory order): the values a segment reduces."""
        row = self.spills[i]
        at = row.storage_offset()
        return [torch.as_strided(row, p.shape, p.stride(), at + o) for o, p in zip(self.layout.host_offsets, params)]

    def pointer_rows(self, lists, like=None) -> torch.Tensor:
        """The pointer table of a segment's axis buffers: int64 [len(lists), n_tensors], 0 where a
        value was not computed (its readers' guard is off). Each is made a contiguous fp32 tensor
        (a reduction of a permuted layout keeps it), held by the plan until the step ends; where
        ``like`` names the params (a tensor function's result, of the param's shape), it is laid
        out like its param instead, since the kernels read it at the element's memory position."""
        rows = []
        for k, values in enumerate(lists):
            if values is None:
                rows.append([0] * self.layout.n_tensors)
                continue
            params = like[k] if like is not None else None
            if params is None:
                values = [t.contiguous().float() for t in values]
            else:
                values = [t.float() if t.stride() == p.stride() else
                          torch.empty_like(p, dtype=torch.float32).copy_(t) for t, p in zip(values, params)]
            self.held.append(values)
            rows.append([t.data_ptr() for t in values])
        return torch.tensor(rows, dtype=torch.int64).to(self.layout.numels.device)


def _lru(cache: OrderedDict, key, build):
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


def _layout(device: torch.device, numels: tuple[int, ...], block: int, n_reductions: int) -> Layout:
    n = torch.tensor(numels, dtype=torch.int64)
    blocks = (n + block - 1) // block
    first = torch.zeros(len(numels) + 1, dtype=torch.int64)
    torch.cumsum(blocks, 0, out=first[1:])
    n_programs = int(first[-1])
    program_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), blocks)
    program_start = (torch.arange(n_programs, dtype=torch.int64) - first[program_tensor]) * block
    offsets = torch.cumsum(n, 0) - n
    table = torch.cat([n, program_tensor, program_start, first, offsets]).to(device)  # one host → device copy
    numels_d, program_tensor_d, program_start_d, first_d, offsets_d = table.split(
        [len(numels), n_programs, n_programs, len(numels) + 1, len(numels)])
    partials = torch.zeros(n_reductions, max(n_programs, 1), dtype=torch.float32, device=device)
    totals = torch.zeros(n_reductions, len(numels), dtype=torch.float32, device=device)
    return Layout(len(numels), n_programs, numels_d, program_tensor_d, program_start_d, first_d, offsets_d,
                  sum(numels), partials, totals, tuple(offsets.tolist()))


def _check(buffers, dtypes, reduced=None) -> None:
    """Every present tensor must be dense, shaped and strided like its param, on its device, and of
    its buffer's dtype (the param's; a state's own under state_precision). ``reduced``: buffer
    index → dims of a reduced-shape state, which must be contiguous in its reduced shape (the
    kernels index it from an element's memory position: kernel_plan.broadcast_index)."""
    params = buffers[0]
    reduced = reduced or {}
    for b, tensors in enumerate(buffers[1:], 1):
        dtype = dtypes[b]
        for p, t in zip(params, tensors):
            if t is None:
                continue
            if b in reduced:
                if t.device != p.device or t.shape != reduced_shape(p.shape, reduced[b]) or not t.is_contiguous():
                    raise UnsupportedTensors("a reduced-shape state does not match its param's device and reduced "
                                             "shape, or is not contiguous")
            elif t.device != p.device or t.shape != p.shape or t.stride() != p.stride():
                raise UnsupportedTensors("a gradient or state does not match its param's device, shape or strides")
            if b > 1 and t.dtype != dtype:
                raise UnsupportedTensors(f"a state or kahan_comp is {t.dtype} but its list's dtype is {dtype}")
            if b == 1 and t.dtype != tensors[0].dtype:  # the kernel reads every grad as the first one's dtype
                raise UnsupportedTensors(f"the gradients mix {tensors[0].dtype} and {t.dtype}")
    for p in params:
        if not _dense(p):
            raise UnsupportedTensors("a param is not dense (a strided or overlapping view)")


def _dense(t: torch.Tensor) -> bool:
    """Elements fill ``data_ptr .. data_ptr + numel`` exactly (contiguous, channels_last, …)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _list_dtypes(buffers) -> list:
    """The dtype of each buffer list: a state's from its first tensor, else the param's."""
    dtype = buffers[0][0].dtype
    out = [dtype, buffers[1][0].dtype]
    for k, tensors in enumerate(buffers[2:], 2):
        t = next((x for x in tensors if isinstance(x, torch.Tensor)), None) if k < len(buffers) - 1 else None
        out.append(dtype if t is None else t.dtype)
    return out


def _scale_rows(buffers, dtypes, scales, codes) -> list:
    """The pointer-table rows of the block scales (one per state in ``codes``, its index among
    the states): a state of int8/uint8 codes must come with its scales, one fp32 per 256 elements
    of each tensor (optcompile/quantize.py); other states get a row of None (never read)."""
    from .. import quantize
    params, rows = buffers[0], []
    for k, dtype in enumerate(dtypes[2:-1]):
        if dtype in _TL_CODES and (not scales or k not in codes or any(s is None for s in scales[k])):
            raise UnsupportedTensors(f"a state of 8-bit codes ({dtype}) without its block scales")
    for k in codes:
        if not scales or dtypes[2 + k] not in _TL_CODES:
            rows.append([None] * len(params))
            continue
        for p, t, s in zip(params, buffers[2 + k], scales[k]):
            problem = quantize.check(f"state {k}", t, s, p.shape)
            if problem is None and (s.device != p.device or not s.is_contiguous()):
                problem = "block scales not contiguous on their param's device"
            if problem is not None:
                raise ValueError(f"8-bit state: {problem}")
        rows.append(list(scales[k]))
    return rows


def launch_plan(buffers, block_size: int, n_reductions: int = 0, n_spills: int = 0, sr=None, scales=(),
                codes: tuple[int, ...] = (), broadcasts=(), reduced=None) -> LaunchPlan:
    """The tables for one launch over ``buffers`` = (params, grads, *states, kahan_comps), and
    ``n_spills`` fp32 scratch rows (allocated per step: they would pin memory the size of the model
    if the layout cache kept them). ``codes``: the states (indices among them) whose kernels take
    8-bit codes; ``scales``: one list per state of its codes' block scales (None: not codes), as
    runtime.run_functional passes them; their rows follow the buffers' in the pointer table.
    ``broadcasts``: the reduced shapes (dims set to 1) the kernels read by a broadcast index,
    ``reduced``: buffer index → dims of each reduced-shape state."""
    params = buffers[0]
    p0 = params[0]
    if p0.dtype not in _TL_DTYPES:
        raise UnsupportedTensors(f"the Triton kernels compute in fp32 and store fp32/bf16/fp16, not {p0.dtype}")
    grads = buffers[1]
    if grads[0].dtype not in _TL_DTYPES:
        raise UnsupportedTensors(f"gradients of dtype {grads[0].dtype} are not supported")
    import triton.language as tl
    dtypes = _list_dtypes(buffers)
    if any(d not in _TL_DTYPES and not (2 <= k < len(dtypes) - 1 and d in _TL_CODES) for k, d in enumerate(dtypes)):
        raise UnsupportedTensors(f"the Triton kernels store fp32/bf16/fp16, not {[str(d) for d in dtypes]}")
    checked = buffers
    buffers = tuple(buffers) + tuple(_scale_rows(buffers, dtypes, scales, codes))
    numels = tuple(p.numel() for p in params)
    key = (p0.device, tuple(dtypes), block_size) + tuple(
        0 if t is None else t.data_ptr() for tensors in buffers for t in tensors) + numels
    layout = _lru(_LAYOUTS, (p0.device, block_size, n_reductions, numels),
                  lambda: _layout(p0.device, numels, block_size, n_reductions))

    def pointers():
        rows = [[0 if t is None else t.data_ptr() for t in tensors] for tensors in buffers]
        aligned = all(x % 16 == 0 for row in rows for x in row) and all(n % 16 == 0 for n in numels)
        return Pointers(torch.tensor(rows, dtype=torch.int64).to(p0.device), aligned)

    ptrs = _lru(_POINTERS, key, pointers)
    if _CHECKED.get(checked) is MISSING:
        # the pointer key holds addresses, not what lies there: a state replaced by another dtype or
        # strides at a freed tensor's address hits it; the layout record (or the check) does not
        _check(checked, dtypes, reduced)
        _CHECKED.put(checked, True)
    broadcast = None
    if broadcasts:
        shapes = tuple((tuple(p.shape), p.stride()) for p in params)  # dense (_check): memory order by strides
        broadcast = _lru(_BROADCASTS, (p0.device, shapes, broadcasts),
                         lambda: _broadcast(p0.device, shapes, broadcasts))
    spills = torch.empty(n_spills, layout.total, dtype=torch.float32, device=p0.device) if n_spills else None
    keys = None if sr is None else torch.tensor(sr.tensor_keys(), dtype=torch.int64).to(p0.device)
    return LaunchPlan(layout, ptrs.table, ptrs.aligned, getattr(tl, _TL_DTYPES[p0.dtype]),
                      getattr(tl, _TL_DTYPES[grads[0].dtype]), spills,
                      tuple(getattr(tl, _TL_DTYPES.get(d) or _TL_CODES[d]) for d in dtypes[2:-1]), keys, broadcast)


def _broadcast(device, shapes, broadcasts) -> torch.Tensor:
    """The broadcast index table (kernel_plan.broadcast_index) of each tensor and reduced shape; a
    shape the param's rank cannot have (a factored state of a 1-D param) gets a harmless row, read
    by no load (its guard is off)."""
    rows = []
    for shape, strides in shapes:
        for axes in broadcasts:
            if all(-len(shape) <= a < len(shape) for a in axes):
                try:
                    rows += broadcast_index(shape, axes, strides)
                except ValueError as exc:
                    raise UnsupportedTensors(str(exc)) from None
            else:
                rows += (1, 1, 0, 1, 1, 0)
    return torch.tensor(rows, dtype=torch.int64).to(device)


def clear_tables() -> None:
    """Forget cached device tables (tests; freeing memory after a model is dropped)."""
    _LAYOUTS.clear()
    _POINTERS.clear()
    _BROADCASTS.clear()


# ── the backend loader ─────────────────────────────────────────────────────────────────────────
CPU_HINT = ("Triton kernels need a GPU. To run them on CPU (slowly, for testing) set TRITON_INTERPRET=1 "
            "in the environment before triton is imported; otherwise use triton=False (foreach=True or "
            "fused=True, or leave them None to choose automatically)")


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def load(info, path):
    """Import ``<stem>_triton.py`` and return its launcher, wrapped with the device check and a
    fallback to the eager backend (one warning per cause) for tensors the kernels cannot take:
    fp64, non-dense ones."""
    module = loader.import_path(f"optcompile.generated.{path.stem.replace('-', '_')}", path)
    launcher = getattr(module, f"_triton_{info.functional}")
    kernel = next((v for k, v in vars(module).items() if k.endswith("_kernel")), None)
    interpreted = kernel is not None and _interpreted(kernel)

    def step(params, *lists, **host):
        if kernel is not None and params[0].device.type == "cpu" and not interpreted:
            raise RuntimeError(f"{info.name}(triton=True) got CPU tensors. {CPU_HINT}")
        try:
            launcher(params, *lists, **host)
        except UnsupportedTensors as exc:
            message = f"{info.name}: Triton kernels skipped ({exc}); using the for-loop backend"
            if message not in _WARNED:
                _WARNED.add(message)
                warnings.warn(message, UserWarning, stacklevel=3)
            n = len(info.states) + 2  # grads, states, kahan_comps; then 8-bit codes' scales, if any
            if len(lists) > n:
                from ..runtime import call_decoded
                return call_decoded(info.backend("eager"), params, lists[:n], lists[n:], **host)
            info.backend("eager")(params, *lists, **host)

    step.launcher = launcher
    step.module = module
    step.codes = getattr(module, "CODES", ())  # the states whose 8-bit codes the kernels take
    return step


_WARNED: set[str] = set()
