"""Load ``<stem>_fused.c``: build it with the system C compiler, cache the shared library, call it
with ctypes.

One library per (source, storage) is built on first use of that storage (the param's dtype, each
state's under ``state_precision``, and whether stores round stochastically) (~0.3 s with gcc) and kept
in ``<cache dir>/fused/``, keyed by the source's hash, the compiler's identity (path and
``--version``), the flags and the CPU model: ``-march=native`` code is only valid on the CPU that
built it. Builds follow the cache's pattern: lock, check again, build in a temp folder, atomic
rename. Anything that stops the fused path (no compiler, a failed build, fp64 or non-CPU
tensors, a tensor that is not contiguous) falls back to the generated eager loop, which is the
reference implementation, with one warning per cause. The prebuilt tables' checker
(``templates/table_check.cpp``, ``TableChecker``, against torch's headers) and pointer reader
(``templates/tensor_pointers.cpp``, ``PointerReader``) are built and cached the same way by the
C++ compiler; without the checker the tables are checked by torch's ``TensorGuards``, and without
the reader they read their pointers in Python.
"""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import itertools
import json
import math
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import backends_available, cache
from .. import layouts
from ..layouts import MISSING, LayoutCache
from .. import quantize
from ..paths import templates_dir
from ..runtime import call_decoded, check_buffers


FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-w")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODES = {torch.int8: 3, torch.uint8: 4}  # a state of 8-bit codes (signed, unsigned), with its scales
_LOCK = threading.Lock()
_WARNED: set[str] = set()


class FusedFallbackWarning(UserWarning):
    """The fused C kernel could not run; the eager backend ran instead (same results, slower)."""


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FusedFallbackWarning, stacklevel=4)


@functools.cache
def compiler_identity(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{cc}\n{out.strip()}"


@functools.cache
def cpu_model() -> str:
    """What ``-march=native`` depends on: model name and feature flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        fields = {}
        for line in info.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        return f"{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


@dataclass(frozen=True)
class Storage:
    """What one library is built for: the param's dtype code (grads and kahan_comp share it),
    each state's (``state_precision``), and stochastic rounding."""

    param: int
    states: tuple[tuple[str, int], ...] = ()  # codes 3 and 4: 8-bit codes (CODES)
    stochastic: bool = False

    def flags(self) -> tuple[str, ...]:
        return (f"-DOC_DTYPE={self.param}",) + tuple(f"-DOC_DTYPE_{n}={c}" for n, c in self.states
                                                     if c != self.param) + (("-DOC_SR=1",) if self.stochastic else ())

    def tag(self) -> str:
        return f"{self.param}" + "".join(str(c) for _, c in self.states) + ("s" if self.stochastic else "")


def build(source: Path, dtype_code: "int | Storage") -> Path:
    """The shared library of ``source`` for one dtype, from the cache or freshly compiled."""
    cc = backends_available.c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
    storage = dtype_code if isinstance(dtype_code, Storage) else Storage(dtype_code)
    return _library(source, cc, FLAGS + storage.flags(), f"{source.stem}-{storage.tag()}")


def _library(source: Path, cc: str, flags: tuple[str, ...], stem: str) -> Path:
    """``source`` built by ``cc`` with ``flags`` into ``<cache>/fused/<stem>-<hash>.so``.

    A cached library is used only if its seal (a hash of its bytes and name) holds, so a truncated
    or overwritten file is rebuilt, with a warning naming it, and never reaches ``dlopen`` (which
    dies of SIGBUS on a truncated library). Finding one writes nothing: a read-only cache works."""
    text = source.read_bytes()
    h = hashlib.sha256()
    for part in (text, compiler_identity(cc).encode(), " ".join(flags).encode(), cpu_model().encode()):
        h.update(part + b"\0")
    name = f"{cache.FUSED}/{stem}-{h.hexdigest()[:16]}.so"
    found = cache.find(name)
    if found is not None and cache.seal_problem(found) is None:
        return found

    def write(lib: Path) -> None:
        """The compiler in a work folder beside the library, named after it so that a killed
        build's is found and removed; then a sealed, atomic write."""
        with tempfile.TemporaryDirectory(prefix=f"{cache.BUILD_DIR}{lib.name}.", dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            try:
                proc = subprocess.run([cc, *flags, str(source), "-o", str(out), "-lm"], capture_output=True,
                                      text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:  # the compiler's fault, not the cache's
                raise RuntimeError(f"could not run {cc}: {exc}") from None
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed on {source.name}:\n{proc.stderr[-2000:]}")
            data = out.read_bytes()
        cache.atomic_write(lib, cache.seal(data, lib.name), 0o600)

    return cache.store(name, write, cache.seal_problem)[0]


def read_interface(source: Path) -> dict:
    for line in source.read_text(encoding="utf-8").splitlines()[:20]:
        if line.startswith("// interface: "):
            return json.loads(line[len("// interface: "):])
    raise RuntimeError(f"{source} has no interface line; regenerate it with `optcompile compile`")


class FusedStep:
    """The step function: ``fn(params, grads, *state_lists, kahan_comps, **host)``, one ctypes call
    per (device, dtype) group."""

    def __init__(self, info, source: Path):
        self.info, self.source = info, source
        self.iface = read_interface(source)
        self.fns: dict[Storage, object] = {}
        self.n_states = len(self.iface.get("states", []))
        # a spec with values of a reduced shape: the kernel calls its segments back (codegen/segments.py)
        self.segments = self.iface.get("segments", 0)
        reduced = self.iface.get("reduced", {})
        self.reduced = {k: tuple(reduced[b]) for k, b in enumerate(self.iface["buffers"][1:], 0) if b in reduced}
        # the states whose 8-bit codes the kernel loads and stores itself (runtime.kernel_codes)
        self.codes = tuple(self.iface.get("codes", ()))

    def storage(self, params, lists, sr: bool, scales=None) -> "Storage | None":
        """The library these lists need (each state's dtype from its first tensor; 8-bit codes
        where the state has ``scales``), or None when a dtype is not one the kernel stores."""
        code = DTYPES.get(params[0].dtype)
        if code is None:
            return None
        states = []
        for k, (name, lst) in enumerate(zip(self.iface.get("states", []), lists[1:])):
            t = next((x for x in lst if isinstance(x, torch.Tensor)), None)  # not a tensor: the checks name it
            coded = scales is not None and name in self.codes and any(s is not None for s in scales[k])
            c = code if t is None else (CODES if coded else DTYPES).get(t.dtype)
            if c is None:
                return None
            states.append((name, c))
        return Storage(code, tuple(states), sr)

    def _fn(self, dtype_code: "Storage"):
        fn = self.fns.get(dtype_code)
        if fn is None:
            with _LOCK:
                fn = self.fns.get(dtype_code)
                if fn is None:
                    lib = ctypes.CDLL(str(build(self.source, dtype_code)))
                    fn = getattr(lib, self.iface["function"])
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + (
                        [ctypes.c_void_p, ctypes.c_void_p] if self.segments else [])
                    self.fns[dtype_code] = fn
        return fn

    def eager(self, params, *lists, **host):
        return self.info.backend("eager")(params, *lists, **host)

    checks_buffers = True  # the pointer pass checks every buffer's shape (runtime.check_buffers)

    def __call__(self, params, *lists, **host):
        p0 = params[0]
        sr = host.get("_sr")
        scales = None
        if len(lists) > self.n_states + 2:  # 8-bit codes' scales, one list per state (runtime.run_functional)
            lists, scales = lists[:self.n_states + 2], lists[self.n_states + 2:]
        code = self.storage(params, lists, sr is not None, scales)
        if p0.device.type != "cpu" or code is None:
            warn_once(f"dtype:{p0.device}:{p0.dtype}", f"the fused C kernel runs fp32/bf16/fp16 CPU tensors; "
                      f"{p0.dtype} on {p0.device} uses the eager backend")
            return self._checked_eager(params, lists, host, scales)
        try:
            fn = self._fn(code)
        except Exception as exc:  # no compiler, failed build, unloadable library: never crash a step
            warn_once(f"build:{self.source}", f"optcompile could not build the fused C kernel "
                      f"({type(exc).__name__}: {str(exc).strip()[:500]}); using the eager backend instead")
            return self._checked_eager(params, lists, host, scales)
        buffers = [params, *lists]
        numel = _FITS.get(buffers)  # the numels of a layout that fit the kernel before, or None
        if numel is MISSING:
            shapes = [p.shape for p in params]
            ptrs = self._pointers(params, lists, shapes, self._dtypes(params, lists), self._shapes(shapes))
            if ptrs is None:
                check_buffers(self.info, buffers)  # a grad or state of another shape raises here
            numel = None if ptrs is None else [s.numel() for s in shapes]
            _FITS.put(buffers, numel)
        elif numel is not None:
            ptrs = self._known_pointers(params, lists)
        if numel is None:
            if scales is not None:  # tensors the kernel cannot take (strided, mixed dtypes): decoded, eager
                return self._checked_eager(params, lists, host, scales)
            return self._mixed(params, lists, host)
        spills = self.iface["spills"]  # fp32 scratch buffers, one per tensor each, after the buffers passed in
        scratch = [torch.empty(k, dtype=torch.float32) for _ in range(spills) for k in numel]
        # the pointer table in the plan's buffer order: the lists passed in, the spills, the axis
        # buffers (filled by the segments), the 8-bit codes' block scales
        ptrs = array.array("q", ptrs + [t.data_ptr() for t in scratch])
        c_numel = array.array("q", numel)
        extra = ()
        if self.segments:  # the axis buffers' rows, the broadcast table, the callback
            ptrs.extend([0] * (len(params) * len(self.iface["axis_buffers"])))
            try:
                extra = self._segment_args(params, lists, scratch, ptrs, host)
            except ValueError as exc:  # a reduced shape the broadcast index does not take (three kept runs)
                warn_once(f"broadcast:{self.source}", f"the fused C kernel cannot index this reduced shape ({exc}); "
                          "using the eager backend")
                return self.eager(params, *lists, **host)
        ptrs.extend(self._scale_pointers(params, lists, scales))
        self._launch(fn, len(params), c_numel.buffer_info()[0], ptrs.buffer_info()[0], host, extra)

    def _shapes(self, shapes):
        """The shape each list must have per tensor: the params', or a reduced-shape state's."""
        if not self.reduced:
            return None
        from ..runtime import reduced_shape
        return {k: [torch.Size(reduced_shape(s, axes)) if all(-len(s) <= a < len(s) for a in axes) else None
                    for s in shapes] for k, axes in self.reduced.items()}

    def _segment_args(self, params, lists, scratch, ptrs, host):
        """The kernel's last two arguments for a spec with segments: the broadcast index table and the
        segment callback, which runs the module's ``_segments_<fn>`` on views of the spills and writes
        the data pointers of the axis buffers it returns into ``ptrs`` (kept alive until the call ends)."""
        from ..kernel_plan import broadcast_index
        n = len(params)
        rows = []
        for p in params:
            for axes in self.iface["broadcasts"]:
                ok = all(-p.dim() <= a < p.dim() for a in axes)
                rows += broadcast_index(p.shape, axes) if ok else (1, 1, 0, 1, 1, 0)  # (contiguous: _pointers)
        bc = array.array("q", rows or [0])
        views = [[scratch[s * n + t].view(params[t].shape) for t in range(n)] for s in range(self.iface["spills"])]
        run = self.info.extra["kernel_segments"]
        kw = {k: v for k, v in host.items() if k != "_shards"}
        first_axis = self.iface["buffers"].index(self.iface["axis_buffers"][0]) if self.iface["axis_buffers"] else 0
        kept: list = []
        failed: list = []

        def segment(k):
            try:
                values = run(k, params, *lists, views, **kw)
                kept.append(values)
                names = self.iface["axis_buffers"]
                for name, tensors in zip(self.iface["segment_outputs"][k], values):
                    if tensors is None:
                        continue
                    tensors = [t.contiguous() for t in tensors]  # (fp32: the segment's torch ops on fp32 views)
                    kept.append(tensors)
                    row = (first_axis + names.index(name)) * n
                    ptrs[row:row + n] = array.array("q", [t.data_ptr() for t in tensors])
                return 0
            except BaseException as exc:  # never unwind through C
                failed.append(exc)
                return 1
        callback = SEGMENT_FN(segment)
        return bc, callback, kept, failed

    def _scale_pointers(self, params, lists, scales) -> list[int]:
        """The scale buffers' pointers (after the spills), 0 where a state is not 8-bit codes; the
        kernel writes one fp32 per 256 elements of its tensor, so each must be exactly that."""
        n, out = len(params), []
        for name in self.codes:
            k = self.iface["states"].index(name)
            if scales is None or all(s is None for s in scales[k]):
                out += [0] * n
                continue
            for p, t, s in zip(params, lists[1 + k], scales[k]):
                if s is None or t is None:
                    raise ValueError(f"{self.info.name}: {name} mixes 8-bit codes and other tensors in one call")
                problem = quantize.check(name, t, s, p.shape)
                if problem is None and not (s.is_contiguous() and s.is_cpu):
                    problem = f"{quantize.scale_key(name)} is not a contiguous CPU tensor"
                if problem is not None:
                    raise ValueError(f"{self.info.name}: {problem}")
                out.append(s.data_ptr())
        return out

    def _dtypes(self, params, lists) -> list:
        """The dtype each list must have: the param's, or for a state its first tensor's."""
        dtype = params[0].dtype
        out = [dtype]
        for k, lst in enumerate(lists):
            t = next((x for x in lst if isinstance(x, torch.Tensor)), None) if k <= self.n_states else None
            out.append(dtype if t is None else t.dtype)
        return out

    def _launch(self, fn, n: int, numel_addr: int, ptrs_addr: int, host: dict, extra=()) -> None:
        """One call of the kernel over tables that passed their checks; its return codes as errors.
        ``extra``: a spec with segments: (broadcast table, segment callback, kept values, failures)."""
        # None (max_lr without decouple_lr) is only read under a flag that is off: NaN marks it
        c_host = array.array("d", [math.nan if host[k] is None else float(host[k]) for k in self.iface["host"]]
                             or [0.0])
        flags = sum(1 << i for i, f in enumerate(self.iface["flags"]) if host[f])
        sr, shards = host.get("_sr"), host.get("_shards")
        keys = None if sr is None else array.array("I", sr.tensor_keys())
        sizes = reduce = None
        if shards is not None:  # local shards: the spec's numel is the whole tensor's, partials all-reduced
            sizes = array.array("q", shards.numel)
            reduce, failed = _reduce_callback(shards)
        tail = () if not extra else (extra[0].buffer_info()[0], ctypes.cast(extra[1], ctypes.c_void_p))
        rc = fn(n, numel_addr, ptrs_addr, c_host.buffer_info()[0], flags, torch.get_num_threads(),
                None if keys is None else keys.buffer_info()[0], None if sizes is None else sizes.buffer_info()[0],
                None if reduce is None else ctypes.cast(reduce, ctypes.c_void_p), *tail)  # `reduce` keeps it alive
        if rc == 3:
            raise (extra[3] if extra and extra[3] else failed)[0]
        if rc == 2:
            raise RuntimeError(f"{self.info.name}: a state this step needs is None (was kahan_sum or a "
                               "hyperparameter that allocates state changed after the first step?)")
        if rc != 0:
            raise MemoryError("the fused C kernel could not allocate its scratch memory")

    def table(self, buffers) -> "FusedTable | None":
        """The kernel's tables for ``buffers`` (``[params, grads, *states, kahan_comps]``), to step
        them again and again (``FusedTable``); None unless they are a layout that passed the
        checks and fits the kernel as it is (``_FITS``: recorded the second time it is seen)."""
        params = buffers[0]
        code = self.storage(params, buffers[1:], False)
        if code is None or params[0].device.type != "cpu" or self.segments:
            return None  # (segments take the general call: their callback holds the lists)
        fits = _FITS.get(buffers)
        if fits is MISSING or fits is None:
            return None
        try:
            fn = self._fn(code)
            return FusedTable(self, fn, buffers)
        except Exception:  # the library did not load (the step warned), or the guards cannot record a tensor
            return None

    @staticmethod
    def _pointers(params, lists, shapes, dtypes, reduced=None):
        """Data pointers, buffer-major, with 0 for absent states; None if a tensor does not fit
        (another shape, dtype or device, not contiguous). The kernel takes one numel per param and
        indexes every buffer by it, so a buffer of another shape must never get through. Params
        arrive grouped by (device, dtype). Per tensor this is the hot Python of a fused step: one
        list comprehension per property and buffer, compared in C (a list of ``torch.Size``
        against the params'), is the cheapest form (~0.1–0.15 µs a check at 2,000 tensors)."""
        n = len(params)
        if not all([t.is_contiguous() for t in params]):
            return None
        ptrs = [t.data_ptr() for t in params]
        for k, (lst, dtype) in enumerate(zip(lists, dtypes[1:])):
            if lst[0] is None and lst[-1] is None and lst.count(None) == n:
                ptrs += [0] * n  # an absent state: NULL, never touched (its guard is off)
                continue
            want = shapes if reduced is None or k not in reduced else reduced[k]  # a reduced-shape state's
            try:
                if ([t.shape for t in lst] != want or not all([t.is_contiguous() for t in lst])
                        or {t.dtype for t in lst} != {dtype} or not all([t.is_cpu for t in lst])):
                    return None
                ptrs += [t.data_ptr() for t in lst]
            except AttributeError:  # None among tensors: NULL, the kernel checks what it needs
                for t, s in zip(lst, want):
                    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != s or t.dtype is not dtype
                                          or not t.is_contiguous() or t.device.type != "cpu"):
                        return None  # check_buffers names what does not fit
                ptrs += [0 if t is None else t.data_ptr() for t in lst]
        return ptrs

    @staticmethod
    def _known_pointers(params, lists):
        """The pointers of buffers whose layout fit the kernel before (``_FITS``)."""
        n = len(params)
        ptrs = [t.data_ptr() for t in params]
        for lst in lists:
            if lst[0] is None and lst[-1] is None and lst.count(None) == n:
                ptrs += [0] * n
            else:
                ptrs += [t.data_ptr() for t in lst]
        return ptrs

    def _checked_eager(self, params, lists, host, scales=None):
        check_buffers(self.info, [params, *lists])
        if scales is not None:
            return call_decoded(self.eager, params, lists, scales, **host)
        return self.eager(params, *lists, **host)

    def _mixed(self, params, lists, host):
        """Tensors the kernel cannot take directly (strided, mixed dtypes) take the eager loop.
        Shapes were checked by the caller."""
        dtypes = self._dtypes(params, lists)
        fast = [i for i in range(len(params)) if all(
            lst[i] is None or (lst[i].dtype is dtype and lst[i].is_contiguous() and lst[i].device.type == "cpu")
            for lst, dtype in zip((params, *lists), dtypes))]
        fast_set = set(fast)
        slow = [i for i in range(len(params)) if i not in fast_set]
        sr, shards = host.get("_sr"), host.get("_shards")

        def part(idx):
            out = dict(host)
            if sr is not None:
                out["_sr"] = sr.take(idx)
            if shards is not None:  # the split must be every rank's: FSDP2's shards share one layout
                out["_shards"] = shards.take(idx)
            return out
        if fast:
            self([params[i] for i in fast], *[[lst[i] for i in fast] for lst in lists], **part(fast))
        if slow:
            self.eager([params[i] for i in slow], *[[lst[i] for i in slow] for lst in lists], **part(slow))


# the kernel's reduce callback (fused.c.j2's oc_reduce_fn): a stage's partials, combined across shards
REDUCE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
# the kernel's segment callback (fused.c.j2's oc_segment_fn): torch ops between two stages
SEGMENT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)


def _reduce_callback(shards):
    """The kernel's callback for ``shards`` (``sharding.ShardedReductions``), and the list that
    holds the exception it raised, if any (the kernel then returns 3 and the step re-raises it)."""
    failed: list = []

    def reduce(n_tensors, n_sums, sums, n_maxes, maxes):
        try:
            for addr, count, combine in ((sums, n_sums, shards.all_reduce_sums),
                                         (maxes, n_maxes, shards.all_reduce_maxes)):
                if count and n_tensors:
                    combine(torch.frombuffer((ctypes.c_double * (n_tensors * count)).from_address(addr),
                                             dtype=torch.float64))
            return 0
        except BaseException as exc:  # never unwind through C
            failed.append(exc)
            return 1
    return REDUCE_FN(reduce), failed


CXX_FLAGS = ("-O2", "-shared", "-fPIC", "-w")


def cxx_compiler() -> "str | None":
    """The C++ compiler of the pointer reader ($CXX, else c++/g++/clang++ on PATH)."""
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


class PointerReader:
    """The data pointers of many tensors in one C call.

    ``read`` calls torch's accessor ``void *data_ptr(PyObject *)`` (exposed as a function address
    for Inductor's generated C++) over an array of object addresses (``id``), in
    ``templates/tensor_pointers.cpp``, which catches what it throws. Reading a pointer in Python
    (``t.data_ptr()``: a method call and a new int) costs about 4× as much when the tensors'
    metadata is out of cache, as after a step's kernel: over thousands of small tensors, a
    quarter of a prebuilt table's step (RESULTS.md, session 5). The caller keeps the objects alive.
    """

    def __init__(self, lib, accessor: int):
        self.accessor = accessor
        self._read = lib.oc_data_ptrs
        self._read.restype = ctypes.c_int
        self._read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]

    def read(self, objs: array.array, out: array.array) -> bool:
        """``out[i]``: the data pointer of object ``objs[i]`` (0 stays 0); False if one is not a
        tensor with data (``out`` is then partly written)."""
        return self._read(self.accessor, objs.buffer_info()[0], len(objs), out.buffer_info()[0]) == 0

    def read_tuple(self, objs: tuple, out: array.array, at: int) -> bool:
        """``read`` over a tuple's items, into ``out[at:at + len(objs)]``: the C loop reads the
        tuple's own array of object pointers (CPython's layout, checked by ``works``), so no
        array of ids is built."""
        if not 0 <= at <= len(out) - len(objs):
            raise IndexError(f"{len(objs)} pointers do not fit at {at} in a table of {len(out)}")
        return self._read(self.accessor, id(objs) + _TUPLE_ITEMS, len(objs), out.buffer_info()[0] + 8 * at) == 0

    def works(self) -> bool:
        """The pointers read match ``data_ptr()`` (a Parameter, an offset view, bf16, an empty
        tensor), from an array of ids and from a tuple. (What torch throws is not provoked here:
        tables read the params and states they hold and grads that passed their guard, which
        have data; tests/test_fused_tables.py checks the catch.)"""
        ts = [torch.nn.Parameter(torch.zeros(3)), torch.arange(10.0)[3:], torch.zeros(2, dtype=torch.bfloat16),
              torch.zeros(0)]
        out = array.array("q", bytes(8 * (len(ts) + 1)))
        ok = self.read(array.array("q", list(map(id, ts)) + [0]), out)
        items = tuple(ts)
        layout = tuple.__itemsize__ == 8 and ctypes.c_int64.from_address(id(items) + _TUPLE_ITEMS).value == id(ts[0])
        from_tuple = array.array("q", bytes(8 * (len(ts) + 2)))
        return ok and list(out) == [t.data_ptr() for t in ts] + [0] and layout and \
            self.read_tuple(items, from_tuple, 1) and list(from_tuple) == [0] + list(out)


_TUPLE_ITEMS = tuple.__basicsize__  # where a tuple's array of item pointers starts in CPython


@functools.cache
def pointer_reader() -> "PointerReader | None":
    """The pointer reader, built and checked once per process; None without torch's accessor, a
    C++ compiler or a working build (tables then read pointers in Python: same results, slower)."""
    try:
        from torch._C._dynamo.guards import _torchinductor_pyobject_tensor_data_ptr as accessor
    except ImportError:
        return None
    cxx = cxx_compiler()
    if not isinstance(accessor, int) or not accessor or cxx is None:
        return None
    try:
        reader = PointerReader(ctypes.PyDLL(str(_library(templates_dir() / "tensor_pointers.cpp", cxx, CXX_FLAGS,
                                                          "tensor_pointers"))), accessor)
        return reader if reader.works() else None
    except Exception:  # no working build: the Python reads
        return None


def _torch_cxx_flags() -> "tuple[str, ...] | None":
    """The flags that build C++ against this torch's c10 and ATen headers and link its libc10
    (the torch version among them, so that another torch builds another library), or None
    where they are missing."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "c10" / "core" / "TensorImpl.h").is_file() or not lib.is_dir():
        return None
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return ("-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DOC_TORCH_VERSION={torch.__version__}", f"-I{include}",
            f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{lib}", "-Wl,--no-as-needed", "-lc10",
            f"-Wl,-rpath,{lib}")


class TableChecker:
    """A prebuilt table's per-step check and pointer reads in one C++ call
    (``templates/table_check.cpp``, built against torch's headers): every param's and state's
    layout against its record, the params' grads read from their autograd metadata and checked
    against theirs, every data pointer written into the kernel's table. It reads the
    ``TensorImpl``s directly, prefetching a few tensors ahead, so over thousands of small tensors
    whose metadata the kernel has pushed out of the caches it costs about a fifth of
    ``TensorGuards`` and the ``PointerReader`` (benchmarks/bench_tables.py). The tensors are
    passed as their Python objects (held by the caller), whose TensorImpl is read afresh every
    step (``torch.utils.swap_tensors`` replaces it), at the offset ``_impl_offset`` found."""

    def __init__(self, lib, impl_at: int):
        self.impl_at = impl_at  # where a tensor's Python object holds its TensorImpl pointer (_impl_offset)
        self._new, self._check, self._release, self.free = (lib.oc_table_new, lib.oc_table_check,
                                                             lib.oc_table_release, lib.oc_table_free)
        self._new.restype = ctypes.c_void_p
        self._new.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_void_p]
        self._check.restype = ctypes.c_int
        self._check.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._release.restype = None
        self._release.argtypes = [ctypes.c_void_p]
        self.free.restype = None
        self.free.argtypes = [ctypes.c_void_p]

    def new(self, params, kept, slots) -> "_Checked | None":
        """A record of ``params`` (and their grads now) and ``kept`` (the caller holds them all),
        ``kept[k]``'s pointer going to row ``slots[k]``; None where a grad is missing."""
        pc = array.array("q", map(id, params))
        kc = array.array("q", map(id, kept))
        sc = array.array("q", slots)
        handle = self._new(self.impl_at, len(pc), pc.buffer_info()[0], len(kc), kc.buffer_info()[0],
                           sc.buffer_info()[0])
        return _Checked(self, handle) if handle else None

    def works(self) -> bool:
        """Pointers match ``data_ptr()`` (a Parameter, an offset view, bf16); a resized param, a
        grad of other strides and a missing grad are refused."""
        ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.arange(10.0)[3:]),
              torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))]
        for p in ps:
            p.grad = torch.ones_like(p)
        state = [torch.zeros(3), torch.zeros(7), torch.zeros(2, 2, dtype=torch.bfloat16)]
        table = self.new(ps, ps + state, [0, 1, 2, 6, 7, 8])
        if table is None:
            return False
        out = array.array("q", bytes(8 * 9))
        ok = table.check(out) == 0 and list(out) == [t.data_ptr() for t in ps + [p.grad for p in ps] + state]
        table.release()
        ps[2].grad = torch.ones(2, 2, dtype=torch.bfloat16).t()
        ok = ok and table.check(out) == 2
        ps[2].grad = None
        ok = ok and table.check(out) == 2
        ps[2].grad = torch.ones(2, 2, dtype=torch.bfloat16)
        ok = ok and table.check(out) == 0
        table.release()
        ps[0].data = torch.zeros(4)
        ok = ok and table.check(out) == 1
        ps[0].data = torch.zeros(3)
        with torch.no_grad():  # another TensorImpl in the same object: read afresh
            torch.utils.swap_tensors(ps[0], torch.nn.Parameter(torch.ones(3)))
        ps[0].grad = torch.ones(3)
        ok = ok and table.check(out) == 0 and out[0] == ps[0].data_ptr() and out[3] == ps[0].grad.data_ptr()
        table.release()
        return ok


def _impl_offset() -> "int | None":
    """Where a tensor's Python object holds its TensorImpl pointer (``Tensor._cdata``; torch's
    ``THPVariable``: after the object header), the same for a tensor, a Parameter and a view;
    None where it is not found."""
    ts = [torch.zeros(3), torch.nn.Parameter(torch.zeros(2)), torch.arange(6.0)[2:]]
    for at in range(8, 64, 8):
        if all(ctypes.c_int64.from_address(id(t) + at).value == t._cdata for t in ts):
            return at
    return None


class _Checked:
    """One table's record in the C++ checker, freed with this object."""

    def __init__(self, checker: TableChecker, handle: int):
        self.checker, self.handle = checker, handle

    def check(self, ptrs: array.array) -> int:
        """0: every tensor has its recorded layout, its pointer is in ``ptrs`` and the grads are
        held until ``release``; else nothing to run (1 a param or state changed, 2 a grad, 3
        torch refused a tensor)."""
        return self.checker._check(self.handle, ptrs.buffer_info()[0])

    def release(self) -> None:
        self.checker._release(self.handle)

    def __del__(self):
        handle, self.handle = self.handle, None
        if handle:
            self.checker.free(handle)


@functools.cache
def table_checker() -> "TableChecker | None":
    """The C++ table checker, built and checked once per process; None without torch's headers,
    a C++ compiler or a working build (tables then use ``TensorGuards`` and the pointer reader)."""
    flags, cxx, impl_at = _torch_cxx_flags(), cxx_compiler(), _impl_offset()
    if flags is None or cxx is None or impl_at is None:
        return None
    try:
        checker = TableChecker(ctypes.PyDLL(str(_library(templates_dir() / "table_check.cpp", cxx, flags,
                                                         "table_check"))), impl_at)
        return checker if checker.works() else None
    except Exception:  # no working build: the guards and the pointer reader
        return None


_DATA_PTR = torch.Tensor.data_ptr
_ALIGN = 16  # fp32 elements: each tensor's scratch starts on a 64-byte line, as torch.empty's would


class FusedTable:
    """The pointer and size tables of one list of buffers, built once, for a training loop that
    steps the same tensors (and fresh gradients of the same layout) every step.

    The table holds the params and states it was built over (``[params, grads, *states,
    kahan_comps]``); which of them the optimizer steps is the caller's to keep equal (runtime's
    ``_FusedGroup``: the group's params and ``optimizer.state``). Each ``step`` reads every
    param's ``.grad`` and tells, before anything is written, whether every tensor still has the
    layout that passed ``check_buffers`` and ``FusedStep._pointers`` when the table was built
    (two C++ ``TensorGuards`` passes, over the grads and over the rest: they fail on None,
    another shape, stride, dtype, device or requires_grad); then it reads every data pointer
    afresh (``p.data = other`` and ``set_()`` keep the layout and move the memory) and calls the
    kernel. False means nothing ran: the caller takes the general path, which checks and names
    what does not fit.

    Over thousands of small tensors the step's cost beside the kernel is reading the tensors'
    metadata, which the previous step's kernel (or a forward and backward) has pushed out of the
    caches. With the ``TableChecker`` all of the above is one C++ call that prefetches ahead (the
    grads read from the params' autograd metadata, held until the kernel returns); else with the
    ``PointerReader`` the pointers are read in one C call (the params' and states' ids are the
    table's, the grads' their tuple's own); without either they are read in Python and only the
    rows that moved are rewritten.
    """

    def __init__(self, step: FusedStep, fn, buffers):
        params = buffers[0]
        self.fused, self.fn, self.n = step, fn, len(params)
        n = self.n
        absent = [lst[0] is None and lst[-1] is None and lst.count(None) == n for lst in buffers]
        if absent[0] or absent[1]:
            raise ValueError("a fused table needs every param and grad")
        self.params = list(params)
        self.kept_rows = [i for i, none in enumerate(absent) if i != 1 and not none]
        self.kept = tuple(itertools.chain.from_iterable(buffers[i] for i in self.kept_rows))  # params, states
        numels = [p.numel() for p in params]
        self.numel = array.array("q", numels)
        self.spills = step.iface["spills"]
        self.ptrs = array.array("q", bytes(8 * n * (len(buffers) + self.spills)))  # absent buffers: NULL
        checker = table_checker()
        self.checked = None if checker is None or any(g is not p.grad for p, g in zip(params, buffers[1])) else \
            checker.new(self.params, self.kept, [i * n + k for i in self.kept_rows for k in range(n)])
        self.reader = None
        if self.checked is None:  # without the C++ checker: torch's guards, the pointers read apart
            self.kept_guard = layouts.guard(list(self.kept))
            self.grad_guard = layouts.guard(list(buffers[1]))
            self.reader = pointer_reader()
            if self.reader is not None:
                self.objs = array.array("q", bytes(8 * n * len(buffers)))  # each pointer's tensor (its id); 0: none
                for i in self.kept_rows:
                    self.objs[i * n:(i + 1) * n] = array.array("q", map(id, buffers[i]))
            else:
                self.last: dict[int, list] = {i: [] for i in (1, *self.kept_rows)}  # the pointers in the table
        self.scratch_at = len(buffers) * n
        offsets, at = [], 0
        for k in numels:
            offsets.append(at * 4)
            at += -(-k // _ALIGN) * _ALIGN
        self.offsets, self.scratch_numel = offsets, at

    def step(self, host: dict) -> bool:
        """One kernel call over the table's tensors and their params' grads now, if every one of
        them has its recorded layout; False, nothing stepped, otherwise."""
        reader, n, ptrs = self.reader, self.n, self.ptrs
        if self.checked is not None:
            if self.checked.check(ptrs) != 0:
                return False
            try:
                self._run(host)
            finally:
                self.checked.release()  # the grads, held while the kernel ran
            return True
        grads = tuple(map(_GRAD, self.params))
        if not self.grad_guard.check(*grads):
            return False
        if reader is not None:
            # the params and states are tensors (the table holds them), so their pointers are read
            # first: that pulls their metadata into the cache for the guard, which then costs about
            # 60% of what it does cold; a grad's is read once its guard proved it a tensor
            if not (reader.read(self.objs, ptrs) and self.kept_guard.check(*self.kept)
                    and reader.read_tuple(grads, ptrs, n)):
                return False  # a tensor without data (the read's False): the general path names it
        elif self.kept_guard.check(*self.kept):
            last = self.last
            for i, lst in ((1, grads), *((i, self.kept[k * n:(k + 1) * n]) for k, i in enumerate(self.kept_rows))):
                now = list(map(_DATA_PTR, lst))
                if now != last[i]:
                    ptrs[i * n:(i + 1) * n] = array.array("q", now)
                    last[i] = now
        else:
            return False
        self._run(host)
        return True

    def _run(self, host: dict) -> None:
        """The kernel over the table, whose pointers were just read (and the spills' scratch)."""
        n, ptrs = self.n, self.ptrs
        scratch = None
        if self.spills:  # one fp32 buffer per spill for all tensors, freed after the step as before
            scratch = torch.empty(self.spills * self.scratch_numel, dtype=torch.float32)
            base = scratch.data_ptr()
            for s in range(self.spills):
                at = self.scratch_at + s * n
                ptrs[at:at + n] = array.array("q", [base + o for o in self.offsets])
                base += self.scratch_numel * 4
        self.fused._launch(self.fn, n, self.numel.buffer_info()[0], ptrs.buffer_info()[0], host)
        del scratch


_GRAD = operator.attrgetter("grad")


# layouts (optcompile/layouts.py) whose buffers passed _pointers: their numels, or None where a
# tensor does not fit the kernel (strided, another dtype) and the step takes _mixed
_FITS = LayoutCache()


def load(info, path: Path):
    return FusedStep(info, path)
