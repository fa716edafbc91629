"""Load generated modules as Python modules (by file path, never ``exec``: Triton needs
``inspect.getsource``), from the checked-in ``generated/`` when fresh, else from the cache."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

from . import cache
from .codegen.header import body_hash_ok, parse_key
from .fingerprint import cache_key
from .paths import builtin_specs, generated_dir

_BACKEND_SUFFIX = {"triton": "_triton.py", "fused": "_fused.c"}
_BACKEND_LOADERS: dict = {}  # name → callable(info, path) -> step function (registered by backends)
_MODULE_KEYS: dict[str, str] = {}  # generated module name → the key all its files are stamped with


class CompileReport:
    """What the last ``compile_spec`` did, for the CLI: files, cache hits, seconds."""

    def __init__(self):
        self.files: list[tuple[str, bool]] = []
        self.seconds = 0.0


def import_path(module_name: str, path: Path):
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def compile_to_cache(spec_or_path, report: CompileReport | None = None) -> Path:
    """Generate every backend's file for a spec into the cache; returns the Python module's path."""
    return _compile_to_cache(spec_or_path, report)[1]


def _compile_to_cache(spec_or_path, report: CompileReport | None = None) -> tuple[str, Path]:
    """``(key, module path)``. Every file of one compile is stamped with the one key its cache
    name starts with, so an entry holding another spec's (or compiler's) output is caught."""
    from .compiler import as_spec, generate_sources
    t0 = time.perf_counter()
    spec = as_spec(spec_or_path)
    key = cache_key(spec.functional, spec.source, "py")
    sources: dict | None = None

    def build(suffix):
        def _b():
            nonlocal sources
            if sources is None:
                sources = generate_sources(spec)
            return sources[suffix]
        return _b

    from .compiler import GENERATORS, _register_builtin_generators
    _register_builtin_generators()
    main = None
    for suffix in GENERATORS:
        path, hit = cache.get_or_build(f"{key}{suffix}", build(suffix), key=key)
        if report is not None:
            report.files.append((str(path), hit))
        main = main or path
    if report is not None:
        report.seconds = time.perf_counter() - t0
    return key, main


def compile_spec(spec_or_path, report: CompileReport | None = None):
    """Compile a spec (path or OptimizerSpec) and return its Optimizer class."""
    key, path = _compile_to_cache(spec_or_path, report)
    module = _import_keyed(f"optcompile.generated.{path.stem.replace('-', '_')}", path, key)
    return getattr(module, module._INFO.name)


def _import_keyed(module_name: str, path: Path, key: str):
    """Import a generated module whose key is known, so its backend files can be checked against it."""
    module = import_path(module_name, path)
    _MODULE_KEYS[module_name] = key
    return module


def builtin_module(functional: str):
    """The generated module of a built-in spec: ``generated/`` if fresh, else compiled into the cache."""
    name = f"optcompile.generated.{functional}"
    if name in sys.modules:
        return sys.modules[name]
    spec_path = next((p for p in builtin_specs() if p.stem == functional), None)
    if spec_path is None:
        raise AttributeError(f"no built-in optimizer spec {functional!r}")
    checked_in = generated_dir() / f"{functional}.py"
    key = cache_key(functional, spec_path.read_bytes(), "py")
    try:
        text = checked_in.read_text(encoding="utf-8") if checked_in.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None  # unreadable: never imported, compiled into the cache instead
    if text is not None:
        if parse_key(text) == key:
            if body_hash_ok(text):
                return _import_keyed(name, checked_in, key)
            import warnings  # same key, different body: hand-edited or corrupt, never imported
            warnings.warn(f"{checked_in} was edited or is corrupt (content hash mismatch); using a fresh "
                          "compile from the cache instead", cache.CacheWarning, stacklevel=2)
    if os.environ.get("OPTCOMPILE_DISABLE_JIT") == "1":
        raise cache.JITDisabledError(f"generated/{functional}.py is missing or stale and OPTCOMPILE_DISABLE_JIT=1; run "
                           f"`optcompile compile {spec_path}` or unset OPTCOMPILE_DISABLE_JIT")
    key, path = _compile_to_cache(spec_path)
    return _import_keyed(name, path, key)


def builtin_class(functional: str):
    """The Optimizer class of a built-in spec, by file stem (``"adamw"`` → AdamW)."""
    module = builtin_module(functional)
    return getattr(module, module._INFO.name)


def register_backend_loader(name: str, fn) -> None:
    _BACKEND_LOADERS[name] = fn


def has_backend(name: str) -> bool:
    _import_backend_runtime(name)
    return name in _BACKEND_LOADERS


@functools.cache
def _import_backend_runtime(name: str) -> None:
    """Import the module that registers backend ``name`` (once; a missing one stays missing)."""
    try:
        importlib.import_module(f"optcompile.backends.{name}_runtime")
    except ImportError:
        pass


def load_backend(info, name: str):
    """The step function of backend ``name`` for a loaded module (files beside the module)."""
    _import_backend_runtime(name)
    if name not in _BACKEND_LOADERS:
        raise RuntimeError(f"backend {name!r} is not available in this build of optcompile")
    module_file = Path(sys.modules[info.module].__file__)
    key = _MODULE_KEYS.get(info.module)
    suffix = _BACKEND_SUFFIX[name]
    path = module_file.with_name(module_file.stem + suffix)
    if cache.problem(path, key) is not None:
        # missing, torn or another compile's: the cache may hold it (a read-only cache's missing
        # files are built into this process's fallback folder); a built-in is regenerated there
        path = cache.lookup(module_file.stem + suffix, key) if key is not None else None
    if path is None:
        spec_path = next((p for p in builtin_specs() if p.stem == info.functional), None)
        if spec_path is None:
            raise RuntimeError(f"{module_file.with_name(module_file.stem + suffix)} is missing or corrupt; "
                               "recompile the spec with optcompile.compile_spec")
        key, _ = _compile_to_cache(spec_path)
        path = cache.lookup(key + suffix, key)
        if path is None:
            raise RuntimeError(f"optcompile could not build the {name} file of {spec_path}")
    return _BACKEND_LOADERS[name](info, path)
