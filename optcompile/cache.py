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

_FALLBACK: dict[Path, Path] = {}  # unusable cache folder → the temp folder used instead (per process)


class CacheWarning(UserWarning):
    """The cache could not be used as asked (unwritable folder, corrupt entry); it recovered."""


class JITDisabledError(RuntimeError):
    """``OPTCOMPILE_DISABLE_JIT=1`` and the entry is missing or corrupt: nothing may be compiled."""


def root() -> Path:
    """The cache root: ``$OPTCOMPILE_CACHE_DIR`` or ``~/.cache/optcompile``."""
    env = os.environ.get("OPTCOMPILE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optcompile"


def cache_dir() -> Path:
    """This compiler version's folder; a temp folder (with a warning) if the root is unusable."""
    path = root() / __version__
    if path in _FALLBACK:
        return _FALLBACK[path]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return path
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="optcompile-cache-")) / __version__
        fallback.mkdir(parents=True, exist_ok=True)
        _FALLBACK[path] = fallback
        warnings.warn(f"optcompile cache dir {path} is not usable ({exc.strerror or exc}); using "
                      f"{fallback} for this process. Set OPTCOMPILE_CACHE_DIR to a writable folder.",
                      CacheWarning, stacklevel=3)
        return fallback


def _lookup_dir() -> Path:
    """Where an entry would be, without creating anything (a failing build leaves no trace)."""
    path = root() / __version__
    return _FALLBACK.get(path, path)


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
    """The cache entry ``name``, building it if missing or invalid.

    Returns ``(path, hit)``. ``build`` runs before anything is created on disk, so a spec error
    leaves the cache exactly as it was; the write happens under a per-entry lock, re-checking
    first, so concurrent processes leave one valid entry (a few may build the text in parallel;
    building is pure). Temp files of writers killed mid-write are removed under the lock.
    """
    check = valid or (lambda p: body_hash_ok(p.read_text(encoding="utf-8")))
    path = _lookup_dir() / name
    exists = path.exists()
    if exists and _safe(check, path):
        return path, True
    if os.environ.get("OPTCOMPILE_DISABLE_JIT") == "1":
        raise JITDisabledError(f"optcompile cache entry {path} is {'corrupt' if exists else 'missing'} and "
                               "OPTCOMPILE_DISABLE_JIT=1 forbids compiling it; compile it beforehand "
                               "(`optcompile compile SPEC`) or unset OPTCOMPILE_DISABLE_JIT")
    text = build()
    folder = cache_dir()
    path = folder / name
    with FileLock(str(folder / f"{name}.lock"), timeout=600):
        for stale in folder.glob(f".{name}.*.tmp"):  # only lock holders write these: a dead writer's
            stale.unlink(missing_ok=True)
        if path.exists():
            if _safe(check, path):
                return path, True
            warnings.warn(f"optcompile cache entry {path} is corrupt (content hash mismatch); rebuilding it",
                          CacheWarning, stacklevel=3)
        atomic_write(path, text.encode("utf-8"))
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
    files = [p for p in r.rglob("*") if p.is_file() and not p.name.endswith(".lock") and not p.name.startswith(".")] \
        if r.exists() else []  # entries only: not locks, temp files of writers or probes
    return {"root": str(r), "version_dir": str(r / __version__), "entries": len(files),
            "bytes": sum(p.stat().st_size for p in files)}
