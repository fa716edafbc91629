"""Load generated modules as Python modules (by file path, never ``exec``: Triton needs
``inspect.getsource``), from the checked-in ``generated/`` when fresh, else from the cache."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from . import cache
from .backends import registry
from .stamp import body_hash_ok, parse_key
from .fingerprint import cache_key
from .paths import builtin_specs, generated_dir



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
    key = cache_key(spec.functional, spec.source)
    sources: dict | None = None

    def build(suffix):
        def _b():
            nonlocal sources
            if sources is None:
                sources = generate_sources(spec, key)
            return sources[suffix]
        return _b

    main = None
    for suffix, backend in registry.files().items():
        path, hit = cache.get_or_build(backend.entry(key), build(suffix), key=key)
        if report is not None:
            report.files.append((str(path), hit))
        main = main or path
    if report is not None:
        report.seconds = time.perf_counter() - t0
    return key, main


def compile_spec(spec_or_path, report: CompileReport | None = None):
    """Compile a spec (path or OptimizerSpec) and return its Optimizer class."""
    _, path = _compile_to_cache(spec_or_path, report)
    module = import_path(f"optcompile.generated.{path.stem.replace('-', '_')}", path)
    return getattr(module, module._INFO.name)


def builtin_module(functional: str):
    """The generated module of a built-in spec: ``generated/`` if fresh, else compiled into the cache."""
    name = f"optcompile.generated.{functional}"
    if name in sys.modules:
        return sys.modules[name]
    spec_path = next((p for p in builtin_specs() if p.stem == functional), None)
    if spec_path is None:
        raise AttributeError(f"no built-in optimizer spec {functional!r}")
    checked_in = generated_dir() / f"{functional}.py"
    key = cache_key(functional, spec_path.read_bytes())
    try:
        text = checked_in.read_text(encoding="utf-8") if checked_in.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None  # unreadable: never imported, compiled into the cache instead
    if text is not None:
        if parse_key(text) == key:
            if body_hash_ok(text):
                return import_path(name, checked_in)
            import warnings  # same key, different body: hand-edited or corrupt, never imported
            warnings.warn(f"{checked_in} was edited or is corrupt (content hash mismatch); using a fresh "
                          "compile from the cache instead", cache.CacheWarning, stacklevel=2)
    if os.environ.get("OPTCOMPILE_DISABLE_JIT") == "1":
        raise cache.JITDisabledError(f"generated/{functional}.py is missing or stale and OPTCOMPILE_DISABLE_JIT=1; run "
                           f"`optcompile compile {spec_path}` or unset OPTCOMPILE_DISABLE_JIT")
    _, path = _compile_to_cache(spec_path)
    return import_path(name, path)


def builtin_class(functional: str):
    """The Optimizer class of a built-in spec, by file stem (``"adamw"`` → AdamW)."""
    module = builtin_module(functional)
    return getattr(module, module._INFO.name)


def has_backend(name: str) -> bool:
    """True if backend ``name`` can be loaded in this build and environment."""
    return registry.get(name).available()


def load_backend(info, name: str):
    """The step function of backend ``name`` for a loaded module, from its file beside the module
    (or in the cache), which must be stamped with the module's own key (``info.key``)."""
    backend = registry.get(name)
    if backend.in_module:
        return backend.load(info, None)
    if not backend.available():
        raise RuntimeError(f"backend {name!r} is not available in this build of optcompile")
    module_file = Path(sys.modules[info.module].__file__)
    beside = module_file.with_name(backend.entry(module_file.stem))
    path = beside if cache.problem(beside, info.key) is None else \
        cache.lookup(backend.entry(info.key), info.key)  # missing, torn or another compile's: the cache may hold it
    if path is None:  # a read-only cache's missing files are built into this process's fallback folder
        spec_path = next((p for p in builtin_specs() if p.stem == info.functional), None)
        if spec_path is None:
            raise RuntimeError(f"{beside} is missing, corrupt or another compile's (not stamped with key "
                               f"{info.key}); recompile the spec with optcompile.compile_spec")
        key, _ = _compile_to_cache(spec_path)
        path = cache.lookup(backend.entry(key), key)
        if path is None:
            raise RuntimeError(f"optcompile could not build the {name} file of {spec_path}")
    return backend.load(info, path)
