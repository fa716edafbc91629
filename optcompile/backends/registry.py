"""The backends, in one table: each one's name, the generated file that holds its step, the
generator that writes that file and the loader that turns it into a step function.

The compiler, loader, CLI and runtime all read this table. Generators and loaders are named by
``"module:function"`` and imported on first use, so importing the table imports neither sympy nor
the compiler (a warm ``from optcompile import AdamW`` needs neither).

Every file of one compile is stamped with that compile's cache key and stored as
``<key><suffix>`` (``adamw-a71c52e09d4f_triton.py``); the loader checks the stamp of whichever
backend's file it loads against the key of the module beside it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

MODULE_SUFFIX = ".py"  # the Python module: the Optimizer class, host scalars, the eager and foreach steps


@dataclass(frozen=True)
class Backend:
    """One way to run a step. ``loader`` is ``None`` for a step that is a function of the Python
    module itself (eager, foreach); the others live in their own file beside it."""

    name: str  # what users and the runtime call it: ``fused=True`` picks "fused"
    suffix: str  # its generated file: ``<key><suffix>``
    generator: str  # ``"module:function"``: ``(program, spec_source, key) -> text`` of that file
    loader: str | None = None  # ``"module:function"``: ``(info, path) -> step function``
    requires: str | None = None  # a package the loader imports (looked for, not imported, to say if it can run)
    disabled_by: str | None = None  # an environment variable that switches the backend off when ``1``
    aliases: tuple[str, ...] = ()  # other names ``optcompile show --backend`` accepts

    @property
    def in_module(self) -> bool:
        return self.loader is None

    def entry(self, key: str) -> str:
        """The name of its file in the cache (and, with the spec's stem for ``key``, beside a module)."""
        return key + self.suffix

    def generate(self, program, spec_source: bytes, key: str) -> str:
        """Its file's text, stamped with ``key``: the key the file is stored under."""
        return _resolve(self.generator)(program, spec_source, key)

    def available(self) -> bool:
        """True if this build and environment can load it (the compiler always generates it)."""
        if self.disabled_by is not None and os.environ.get(self.disabled_by) == "1":
            return False
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            return False
        if self.loader is not None:
            try:
                _resolve(self.loader)
            except ImportError:
                return False
        return True

    def load(self, info, path) -> Callable:
        """The step function from its file at ``path``, for the module described by ``info``."""
        if self.loader is None:
            return info.backends[self.name]
        return _resolve(self.loader)(info, path)


BACKENDS: tuple[Backend, ...] = (
    Backend("eager", MODULE_SUFFIX, "optcompile.codegen.render:render_module"),
    Backend("foreach", MODULE_SUFFIX, "optcompile.codegen.render:render_module"),
    Backend("triton", "_triton.py", "optcompile.codegen.triton:render", "optcompile.backends.triton_runtime:load",
            requires="triton"),
    Backend("fused", "_fused.c", "optcompile.codegen.c:render", "optcompile.backends.fused_runtime:load",
            disabled_by="OPTCOMPILE_DISABLE_FUSED", aliases=("c",)),
)
NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
_BY_NAME = {n: b for b in BACKENDS for n in (b.name, *b.aliases)}


def get(name: str) -> Backend:
    """The backend called ``name`` (or one of its aliases)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no backend {name!r}; the backends are {', '.join(NAMES)}") from None


def files() -> dict[str, Backend]:
    """One backend per generated file, by suffix, the Python module first: what one compile writes."""
    out: dict[str, Backend] = {}
    for b in BACKENDS:
        out.setdefault(b.suffix, b)
    return out


def _resolve(ref: str) -> Any:
    """``"package.module:attr"`` → the attribute, imported now (looked up on every call, so a
    patched module attribute is seen)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
