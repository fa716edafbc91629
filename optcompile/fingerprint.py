"""Cache keys without importing the compiler: a key hashes the spec's bytes, the compiler's own
source and the templates, so any change to any of them is a new key."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .paths import templates_dir
from .version import __version__

_PKG = Path(__file__).resolve().parent
_COMPILER_FILES = ("spec.py", "ir.py", "lower.py", "verify.py", "compiler.py", "passes/*.py", "kernel_plan.py",
                   "codegen/*.py", "stamp.py", "rounding.py",
                   "backends/registry.py", "step_flags.py")


@functools.cache
def compiler_hash() -> str:
    h = hashlib.sha256(__version__.encode())
    for pattern in _COMPILER_FILES:
        for p in sorted(_PKG.glob(pattern)):
            h.update(p.relative_to(_PKG).as_posix().encode() + b"\0" + p.read_bytes().replace(b"\r\n", b"\n"))
    return h.hexdigest()


@functools.cache
def templates_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(templates_dir().glob("*.j2")):
        h.update(p.name.encode() + b"\0" + p.read_bytes().replace(b"\r\n", b"\n"))
    return h.hexdigest()


def cache_key(functional: str, spec_source: bytes) -> str:
    """``adamw-a71c52e09d4f``: readable name plus a short hash (FlashInfer URI, Inductor hash). One
    key names every file of one compile (``<key><suffix>``, ``optcompile.backends.registry``)."""
    h = hashlib.sha256()
    for part in (spec_source.replace(b"\r\n", b"\n"), compiler_hash().encode(), templates_hash().encode()):
        h.update(part + b"\0")
    return f"{functional}-{h.hexdigest()[:12]}"
