"""The on-disk cache of generated modules: content-addressed, atomic, safe across processes.

FlashInfer's JIT pattern: lock → check again → build → write to a temp file → ``os.replace``.
Every text entry carries a ``key:`` and a ``body: sha256`` header line; an entry whose key is not
the one asked for, or whose body no longer matches (truncated by a killed writer, edited,
corrupted), is rebuilt with a warning. Entries live under ``<cache dir>/<compiler version>/``, so
an upgrade never loads an older compiler's output.

The cache holds code that is imported and loaded, so it is trusted like site-packages: folders are
created 0700 and files 0600 whatever the umask, and a cache folder owned by another user is
refused (as pip and torch's Inductor cache do). Reading never writes: a populated read-only cache
is used as is, and only what is missing is built (into a per-process temp folder when the cache
cannot be written, full disk included). Only names optcompile itself creates are ever deleted.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from .stamp import body_hash_ok, parse_key
from .version import __version__

_FALLBACK: dict[Path, Path] = {}  # unusable cache folder → the temp folder used instead (per process)

# The names optcompile creates; nothing else under the root is ever counted or deleted.
VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)+(?:[.+_-]?[A-Za-z0-9]+)*")  # <root>/0.1.0/
ENTRY = re.compile(r"\w+-[0-9a-f]{12}(?:_[a-z]+)?\.(?:py|c)")  # adamw-a71c52e09d4f_triton.py
# fused/adamw-…_fused-<storage tag: 0, 111s …>-<hash>.so, the pointer reader's tensor_pointers-<hash>.so and
# the table checker's table_check-<hash>.so
LIBRARY = re.compile(r"[\w.-]+-(?:[0-9]+s?-)?[0-9a-f]{16}\.so")
FUSED = "fused"
BUILD_DIR = "optcompile-cc-"  # fused/optcompile-cc-<library>.<random>/: a compiler's work folder
_STALE_S = 3600  # an unnamed build folder older than this is a dead build's (builds time out at 300 s)
# errors of a cache that cannot take a write: the process falls back to a temp folder
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class CacheWarning(UserWarning):
    """The cache could not be used as asked (unwritable folder, corrupt entry); it recovered."""


class JITDisabledError(RuntimeError):
    """``OPTCOMPILE_DISABLE_JIT=1`` and the entry is missing or corrupt: nothing may be compiled."""


class UnsafeCacheError(PermissionError):
    """The cache folder belongs to another user: its code could run as ours, so it is refused."""


def root() -> Path:
    """The cache root: ``$OPTCOMPILE_CACHE_DIR`` or ``~/.cache/optcompile``."""
    env = os.environ.get("OPTCOMPILE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "optcompile"


def version_dir() -> Path:
    """This compiler version's folder under the root (whether or not it exists or is writable)."""
    return root() / __version__


def check_owner() -> None:
    """Refuse a root or version folder that exists and is not ours (POSIX; no-op elsewhere)."""
    if not hasattr(os, "geteuid"):
        return
    me = os.geteuid()
    for folder in (root(), version_dir()):
        try:
            owner = folder.stat().st_uid
        except OSError:
            continue  # missing (created as ours later) or unreadable (fails on use)
        if owner != me:
            raise UnsafeCacheError(
                f"optcompile cache folder {folder} is owned by {_user(owner)}, not by you ({_user(me)}); it "
                "holds code optcompile imports, so it must be yours. Remove it, change its owner, or set "
                "OPTCOMPILE_CACHE_DIR to a folder of your own")


def _user(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents 0700 (exactly: the umask neither widens nor locks us out)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another process made it
        os.chmod(folder, 0o700)


def cache_dir() -> Path:
    """Where this process writes entries: the version folder, or a temp folder (one warning) if
    that cannot be created or written."""
    check_owner()
    path = version_dir()
    if path in _FALLBACK:
        return _FALLBACK[path]
    try:
        _make_dirs(path)
        with tempfile.TemporaryFile(dir=path):  # O_TMPFILE where supported: nothing to clean up
            pass
        return path
    except OSError as exc:
        return _fall_back(path, exc)


def _fall_back(path: Path, exc: OSError) -> Path:
    """Switch this process to a private temp folder, removed at exit, with one warning."""
    if path in _FALLBACK:
        return _FALLBACK[path]
    tmp = Path(tempfile.mkdtemp(prefix="optcompile-cache-"))
    atexit.register(_remove_fallback, tmp, os.getpid())
    fallback = tmp / __version__
    _make_dirs(fallback)
    _FALLBACK[path] = fallback
    warnings.warn(f"optcompile cache dir {path} is not usable ({exc.strerror or exc}); using "
                  f"{fallback} for this process. Set OPTCOMPILE_CACHE_DIR to a writable folder.",
                  CacheWarning, stacklevel=4)
    return fallback


def _remove_fallback(tmp: Path, pid: int) -> None:
    if os.getpid() == pid:  # never a forked child's exit: the parent still uses it
        shutil.rmtree(tmp, ignore_errors=True)


def _candidates(name: str) -> list[Path]:
    """Where entry ``name`` (relative to the version folder) may be, best first: the cache, then
    this process's fallback. Creates nothing."""
    check_owner()
    path = version_dir()
    return [path / name] + ([_FALLBACK[path] / name] if path in _FALLBACK else [])


def find(name: str) -> Path | None:
    """The first regular file named ``name`` in the cache or this process's fallback."""
    return next((p for p in _candidates(name) if p.is_file()), None)


def problem(path: Path, key: str | None = None) -> str | None:
    """Why the text entry at ``path`` must not be used (``None``: it is sound). ``key`` is the key
    it was asked for under; its header must say the same."""
    try:
        if path.is_dir():
            return "is a directory, not a file"
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "is missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"is unreadable ({type(exc).__name__}: {exc})"
    if not body_hash_ok(text):
        return "is corrupt (content hash mismatch)"
    if key is not None and parse_key(text) != key:
        return f"belongs to another spec or compiler (its header says key {parse_key(text)}, not {key})"
    return None


_SEAL = b"\0optcompile-seal sha256:"  # + 64 hex digits, appended to a binary entry (ELF ignores it)


def seal(data: bytes, name: str) -> bytes:
    """``data`` with a trailer hashing it and its entry name: a binary entry's ``body:`` line."""
    return data + _SEAL + hashlib.sha256(name.encode() + b"\0" + data).hexdigest().encode()


def seal_problem(path: Path) -> str | None:
    """Why the sealed binary entry at ``path`` must not be used (``None``: it is sound)."""
    try:
        if path.is_dir():
            return "is a directory, not a file"
        data = path.read_bytes()
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"is unreadable ({type(exc).__name__}: {exc})"
    n = len(_SEAL) + 64
    body, tag, digest = data[:-n], data[-n:-64], data[-64:]
    if tag != _SEAL:
        return "is damaged: truncated, or not written by this optcompile (no seal)"
    if hashlib.sha256(path.name.encode() + b"\0" + body).hexdigest().encode() != digest:
        return "is damaged: its content does not match its seal (corrupt, or another entry's file)"
    return None


def lookup(name: str, key: str | None = None) -> Path | None:
    """The first sound text entry ``name`` in the cache or the fallback; ``None`` if there is none."""
    return next((p for p in _candidates(name) if problem(p, key) is None), None)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write beside the target, fsync, then rename: readers see the old file or the new one.
    ``mode``: the file's permissions exactly; ``None`` keeps the target's, else the umask's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def get_or_build(name: str, build: Callable[[], str], *, key: str | None = None) -> tuple[Path, bool]:
    """The text entry ``name`` (whose header must say ``key``), building it if missing or unsound.

    Returns ``(path, hit)``. A sound entry is used without writing anything (a read-only cache
    works). ``build`` runs before anything is created on disk, so a spec error leaves the cache
    exactly as it was; the write happens under a per-entry lock, re-checking first, so concurrent
    processes leave one valid entry (a few may build the text in parallel; building is pure).
    """
    found = lookup(name, key)
    if found is not None:
        return found, True
    if os.environ.get("OPTCOMPILE_DISABLE_JIT") == "1":
        path = _candidates(name)[0]
        raise JITDisabledError(f"optcompile cache entry {path} {problem(path, key)} and OPTCOMPILE_DISABLE_JIT=1 "
                               "forbids compiling it; compile it beforehand (`optcompile compile SPEC`) or unset "
                               "OPTCOMPILE_DISABLE_JIT")
    data = build().encode("utf-8")

    def write(target: Path) -> None:
        if target.suffix == ".py":  # where Python puts the entry's bytecode when imported: ours, 0700
            _make_dirs(target.parent / "__pycache__")
        atomic_write(target, data, 0o600)
    return store(name, write, lambda p: problem(p, key))


def store(name: str, write: Callable[[Path], None], check: Callable[[Path], str | None]) -> tuple[Path, bool]:
    """Write entry ``name`` with ``write(target)`` (atomically, as the lock holder) unless a sound one
    appeared meanwhile; ``check`` says why an existing one is not (``None``: sound). Returns
    ``(path, hit)``; an unsound entry is replaced, with a warning that names it and says why. A
    cache that cannot take the write (full disk, file-size limit, read-only) sends this process to
    a temp folder, with one warning. Dead writers' leftovers are removed."""
    folder = cache_dir()
    try:
        return _store_in(folder, name, write, check)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS or folder != version_dir():
            raise
        first = exc
    fallback = _fall_back(version_dir(), first)
    try:
        return _store_in(fallback, name, write, check)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write optcompile cache entry {name} to {folder} ({first.strerror}) "
                                 f"nor to {fallback} ({exc.strerror})") from exc


def _store_in(folder: Path, name: str, write, check) -> tuple[Path, bool]:
    path = folder / name
    _make_dirs(path.parent)
    for f in {folder, folder / FUSED}:
        _sweep(f)
    with FileLock(str(path) + ".lock", timeout=600, mode=0o600):
        _remove_leftovers_of(path)  # only lock holders write these: a dead writer's
        if os.path.lexists(path):
            reason = check(path)
            if reason is None:
                return path, True
            warnings.warn(f"optcompile cache entry {path} {reason}; rebuilding it", CacheWarning, stacklevel=4)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # an entry's name inside the version folder: ours
        write(path)
    return path, False


def _remove_leftovers_of(path: Path) -> None:
    """The temp file and compiler work folders of a writer of ``path`` (call holding its lock)."""
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    for stale in path.parent.glob(f"{BUILD_DIR}{glob_escape(path.name)}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _sweep(folder: Path) -> None:
    """Before a write (a miss: rare): remove leftovers of writers that are gone (their entry's lock
    is free), unnamed build folders older than an hour, and probes of dead processes."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for n in names:
        p = folder / n
        owner = _leftover_owner(n)
        if owner is not None:
            lock = FileLock(str(folder / owner) + ".lock", timeout=0, mode=0o600)
            try:
                with lock:
                    _remove_leftovers_of(folder / owner)
            except (Timeout, OSError):
                pass  # a live writer holds it
        elif n.startswith(BUILD_DIR) and p.is_dir() and not p.is_symlink():
            try:
                if time.time() - p.stat().st_mtime > _STALE_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
        elif n.startswith(".probe-") and n[7:].isdigit() and not _alive(int(n[7:])):
            p.unlink(missing_ok=True)


def _leftover_owner(name: str) -> str | None:
    """The entry a temp file (``.<entry>.<random>.tmp``) or build folder belongs to, if it is one."""
    if name.startswith(".") and name.endswith(".tmp"):
        entry = name[1:].rsplit(".", 2)[0]
    elif name.startswith(BUILD_DIR):
        entry = name[len(BUILD_DIR):].rsplit(".", 1)[0]
    else:
        return None
    return entry if ENTRY.fullmatch(entry) or LIBRARY.fullmatch(entry) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def discard(path: Path) -> None:
    """Remove a cache file (or a directory squatting on its name); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ── what optcompile owns under the root: `cache info` counts it, `cache clear` removes it ────────
def _owned(r: Path):
    """``(path, is_entry)`` for every file optcompile created under root ``r``; symlinks are
    yielded as themselves (removing one never touches its target) and never descended into."""
    for v in _scan(r):
        if not (VERSION.fullmatch(v.name) and v.is_dir(follow_symlinks=False)):
            continue
        for e in _scan(Path(v.path)):
            if e.name == "__pycache__" and e.is_dir(follow_symlinks=False):
                for c in _scan(Path(e.path)):  # Python's bytecode of our entries
                    if ENTRY.fullmatch(c.name.split(".", 1)[0] + ".py") and not c.is_dir(follow_symlinks=False):
                        yield Path(c.path), False
                yield Path(e.path), None
            elif e.name == FUSED and e.is_dir(follow_symlinks=False):
                yield from _owned_in(Path(e.path), LIBRARY)
                yield Path(e.path), None
            else:
                yield from _owned_in(Path(v.path), ENTRY, [e])
        yield Path(v.path), None


def _owned_in(folder: Path, pattern: re.Pattern, entries=None):
    for e in entries if entries is not None else _scan(folder):
        n = e.name
        if e.is_dir(follow_symlinks=False):
            if n.startswith(BUILD_DIR):
                yield Path(e.path), "tree"
        elif pattern.fullmatch(n):
            yield Path(e.path), True
        elif (n.endswith(".lock") and pattern.fullmatch(n[:-5])) or _leftover_owner(n) is not None \
                or (n.startswith(".probe-") and n[7:].isdigit()):
            yield Path(e.path), False


def _scan(folder: Path) -> list:
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def clear() -> int:
    """Remove what optcompile created under the root (entries, locks, leftovers, their folders once
    empty) and nothing else: a root shared with other files keeps them. Returns the entries removed."""
    check_owner()
    count = 0
    for path, kind in list(_owned(root())):
        if kind is None:
            try:
                path.rmdir()  # only if empty: a folder holding anything else stays
            except OSError:
                pass
        elif kind == "tree":
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
                count += kind is True
            except FileNotFoundError:
                pass
    return count


def info() -> dict:
    """The root, this version's folder, and the entries (text modules and libraries) under the root."""
    check_owner()
    r = root()
    entries = [p for p, kind in _owned(r) if kind is True]
    size = 0
    for p in entries:
        try:
            size += p.lstat().st_size
        except OSError:
            pass
    return {"root": str(r), "version_dir": str(version_dir()), "entries": len(entries), "bytes": size}
