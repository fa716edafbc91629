"""The on-disk cache of generated modules: content-addressed, atomic, safe across processes.

FlashInfer's JIT pattern: lock → check again → build → write to a temp file → ``os.replace``.
Every text entry carries a ``body: sha256`` header line; an entry whose body no longer matches
(truncated by a killed writer, edited, corrupted) is rebuilt with a warning. Entries live under
``<cache dir>/<compiler version>/``, so an upgrade never loads an older compiler's output.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from filelock import FileLock

from .codegen.header import body_hash_ok
from .version import __version__

_FALLBACK: Path | None = None


class CacheWarning(UserWarning):
    """The cache could not be used as asked (unwritable folder, corrupt entry); it recovered."""


def root() -> Path:
    """The cache root: ``$OPTCOMPILE_CACHE_DIR`` or ``~/.cache/optcompile``."""
    env = os.environ.get("OPTCOMPILE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optcompile"


def cache_dir() -> Path:
    """This compiler version's folder; a temp folder (with a warning) if the root is unusable."""
    global _FALLBACK
    path = root() / __version__
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return path
    except OSError as exc:
        if _FALLBACK is None:
            _FALLBACK = Path(tempfile.mkdtemp(prefix="optcompile-cache-")) / __version__
            _FALLBACK.mkdir(parents=True, exist_ok=True)
            warnings.warn(f"optcompile cache dir {path} is not usable ({exc.strerror or exc}); using "
                          f"{_FALLBACK} for this process. Set OPTCOMPILE_CACHE_DIR to a writable folder.",
                          CacheWarning, stacklevel=3)
        return _FALLBACK


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target, fsync, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def get_or_build(name: str, build: Callable[[], str], *, valid: Callable[[Path], bool] | None = None) -> tuple[Path, bool]:
    """The cache entry ``name``, building it under a lock if missing or invalid.

    Returns ``(path, hit)``. ``build`` returns the file's text; it runs at most once per key across
    processes, and never leaves a partial file behind if it raises.
    """
    folder = cache_dir()
    path = folder / name
    check = valid or (lambda p: body_hash_ok(p.read_text(encoding="utf-8")))
    if path.exists() and _safe(check, path):
        return path, True
    with FileLock(str(folder / f"{name}.lock"), timeout=600):
        if path.exists():
            if _safe(check, path):
                return path, True
            warnings.warn(f"optcompile cache entry {path} is corrupt (content hash mismatch); rebuilding it",
                          CacheWarning, stacklevel=3)
        atomic_write(path, build().encode("utf-8"))
    return path, False


def _safe(check: Callable[[Path], bool], path: Path) -> bool:
    try:
        return check(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def clear() -> int:
    """Remove every entry of every compiler version; returns the number of files removed."""
    r = root()
    if not r.exists():
        return 0
    count = sum(1 for p in r.rglob("*") if p.is_file())
    shutil.rmtree(r, ignore_errors=True)
    return count


def info() -> dict:
    r = root()
    files = [p for p in r.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if r.exists() else []
    return {"root": str(r), "version_dir": str(r / __version__), "entries": len(files),
            "bytes": sum(p.stat().st_size for p in files)}
