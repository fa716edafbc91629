"""The cache survives what happens to real caches: torn, edited, corrupted and foreign entries,
damaged libraries, writers and compilers killed mid-write, unusable, read-only, full and shared
folders, other users' folders, and several processes compiling the same spec at once."""
import errno
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from optcompile import cache, cli, loader
from optcompile.backends import registry
from optcompile.backends_available import c_compiler
from optcompile.cache import CacheWarning, JITDisabledError
from optcompile.stamp import body_hash_ok, parse_key
from optcompile.version import __version__

ROOT = Path(__file__).resolve().parents[1]
FILE_BACKENDS = [b.name for b in registry.BACKENDS if not b.in_module]  # each in its own file beside the module
WORKER = Path(__file__).with_name("cache_worker.py")

SPEC = """\
from optcompile.spec import *
spec = OptimizerSpec("Tiny", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", 0.9, Interval.Ropen(0, 1))
m = spec.state("m")
m = spec.assign(m, beta * m + (1 - beta) * spec.grad)
spec.update(m, lr=lr)
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(SPEC)
    return path


def _entries(cache_dir: Path) -> list[Path]:
    """Cache entries (not locks, nor Python's __pycache__ of them) of this compiler version."""
    d = cache_dir / __version__
    return sorted(p for p in d.iterdir() if not p.name.endswith(".lock") and not p.name.startswith(".")
                  and p.name != "__pycache__") if d.exists() else []


def _temps(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*.tmp")]


def _step(cls) -> torch.Tensor:
    """One step of the compiled optimizer on a fixed problem (checks an entry is usable)."""
    p = torch.nn.Parameter(torch.arange(4.0))
    p.grad = torch.ones(4)
    cls([p], lr=0.5, foreach=False, triton=False, fused=False).step()
    return p.detach()


def _fresh_module(monkeypatch, path: Path):
    monkeypatch.delitem(sys.modules, f"optcompile.generated.{path.stem.replace('-', '_')}", raising=False)


def test_miss_then_hit_and_entries_are_hashed(spec_file, cache_dir):
    r1, r2 = loader.CompileReport(), loader.CompileReport()
    loader.compile_to_cache(spec_file, r1)
    loader.compile_to_cache(spec_file, r2)
    assert r1.files and not any(hit for _, hit in r1.files)
    assert all(hit for _, hit in r2.files)
    entries = _entries(cache_dir)
    assert sorted(Path(f).name for f, _ in r1.files) == [p.name for p in entries]
    for p in entries:
        assert body_hash_ok(p.read_text()), p
    assert not _temps(cache_dir)


@pytest.mark.parametrize("fault", ["flip_byte", "truncate", "edit", "empty", "truncate_header"])
def test_damaged_entry_is_detected_and_rebuilt(fault, spec_file, cache_dir, monkeypatch):
    main = loader.compile_to_cache(spec_file)
    good = main.read_bytes()
    data = bytearray(good)
    if fault == "flip_byte":
        i = len(data) - 40  # inside the body, in code
        data[i] = ord("#") if data[i] != ord("#") else ord("x")
    elif fault == "truncate":
        data = data[: len(data) // 2]
    elif fault == "edit":
        data += b"\nprint('injected')\n"
    elif fault == "empty":
        data = bytearray()
    elif fault == "truncate_header":
        data = data[:100]
    main.write_bytes(bytes(data))
    _fresh_module(monkeypatch, main)
    with pytest.warns(CacheWarning, match="corrupt"):
        cls = loader.compile_spec(spec_file)
    assert main.read_bytes() == good
    assert torch.equal(_step(cls), torch.tensor([-0.05, 0.95, 1.95, 2.95]))  # m = 0.1, p -= 0.5 m
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.compile_to_cache(spec_file)  # now a clean hit: no warning


def test_non_utf8_entry_is_rebuilt(spec_file, cache_dir):
    main = loader.compile_to_cache(spec_file)
    good = main.read_bytes()
    main.write_bytes(b"\xff\xfe" + good[2:])
    with pytest.warns(CacheWarning):
        loader.compile_to_cache(spec_file)
    assert main.read_bytes() == good


def test_unusable_cache_dir_falls_back_to_temp(spec_file, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OPTCOMPILE_CACHE_DIR", str(blocker / "cache"))  # mkdir fails: NotADirectoryError
    with pytest.warns(CacheWarning, match="not usable"):
        path = loader.compile_to_cache(spec_file)
    assert not str(path).startswith(str(blocker)) and path.exists() and body_hash_ok(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, then the fallback is reused
        assert loader.compile_to_cache(spec_file) == path


def test_read_only_cache_dir_falls_back_to_temp(spec_file, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        target = Path("/proc/optcompile-cache")  # root ignores mode bits; /proc refuses mkdir
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "cache"
    monkeypatch.setenv("OPTCOMPILE_CACHE_DIR", str(target))
    with pytest.warns(CacheWarning, match="not usable"):
        path = loader.compile_to_cache(spec_file)
    assert path.exists() and not str(path).startswith(str(target))


def test_missing_cache_dir_is_created(spec_file, tmp_path, monkeypatch):
    target = tmp_path / "does" / "not" / "exist"
    monkeypatch.setenv("OPTCOMPILE_CACHE_DIR", str(target))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = loader.compile_to_cache(spec_file)
    assert path.parent == target / __version__


def _worker(spec_file, mode, cache_dir, *extra, marker=None):
    env = {**os.environ, "OPTCOMPILE_CACHE_DIR": str(cache_dir), "MARKER": str(marker or "")}
    return subprocess.Popen([sys.executable, str(WORKER), str(spec_file), mode, *map(str, extra)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker: Path, proc, timeout=90):
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "worker never reached the hang"
        time.sleep(0.05)


@pytest.mark.slow
def test_four_processes_compile_concurrently(spec_file, cache_dir, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_worker(spec_file, "plain", cache_dir, barrier, 4) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("ok Tiny")
        assert "CacheWarning" not in err  # nobody saw a torn file
    entries = _entries(cache_dir)
    assert len({e.name.split("-")[0] for e in entries}) == 1
    assert len([e for e in entries if e.suffix == ".py" and not e.name.endswith("_triton.py")]) == 1
    assert all(body_hash_ok(e.read_text()) for e in entries)
    assert not _temps(cache_dir)
    r = loader.CompileReport()
    loader.compile_to_cache(spec_file, r)
    assert all(hit for _, hit in r.files)


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_no_usable_partial(spec_file, cache_dir, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    proc = _worker(spec_file, "slow_write", cache_dir, marker=marker)
    _wait_for(marker, proc)
    temps = _temps(cache_dir)
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the killed writer's bytes are on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _entries(cache_dir) == [], "a partial entry became visible"
    _fresh_module(monkeypatch, spec_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls = loader.compile_spec(spec_file)  # the dead writer's lock was released by the kernel
    assert torch.equal(_step(cls), torch.tensor([-0.05, 0.95, 1.95, 2.95]))
    assert not _temps(cache_dir), "the dead writer's temp file was not cleaned up"
    assert all(body_hash_ok(e.read_text()) for e in _entries(cache_dir))


@pytest.mark.slow
def test_compiler_killed_mid_build_leaves_nothing(spec_file, cache_dir, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    proc = _worker(spec_file, "slow_build", cache_dir, marker=marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _entries(cache_dir) == [] and not _temps(cache_dir)
    _fresh_module(monkeypatch, spec_file)
    cls = loader.compile_spec(spec_file)
    assert torch.equal(_step(cls), torch.tensor([-0.05, 0.95, 1.95, 2.95]))


def test_disable_jit_with_missing_entry_raises(spec_file, cache_dir, monkeypatch):
    monkeypatch.setenv("OPTCOMPILE_DISABLE_JIT", "1")
    with pytest.raises(JITDisabledError, match="OPTCOMPILE_DISABLE_JIT=1"):
        loader.compile_spec(spec_file)
    assert _entries(cache_dir) == []
    monkeypatch.delenv("OPTCOMPILE_DISABLE_JIT")
    loader.compile_to_cache(spec_file)
    monkeypatch.setenv("OPTCOMPILE_DISABLE_JIT", "1")
    _fresh_module(monkeypatch, spec_file)
    assert loader.compile_spec(spec_file).__name__ == "Tiny"  # a present, valid entry still loads
    main = next(e for e in _entries(cache_dir) if e.suffix == ".py")
    main.write_text(main.read_text() + "# edited\n")
    with pytest.raises(JITDisabledError, match="corrupt"):
        loader.compile_to_cache(spec_file)


def test_disable_jit_with_stale_builtin_raises(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "generated_dir", lambda: tmp_path)  # no checked-in modules
    monkeypatch.delitem(sys.modules, "optcompile.generated.sgd", raising=False)
    monkeypatch.setenv("OPTCOMPILE_DISABLE_JIT", "1")
    with pytest.raises(JITDisabledError, match="OPTCOMPILE_DISABLE_JIT=1"):
        loader.builtin_module("sgd")


@pytest.mark.parametrize("edited", [False, True])
def test_edited_checked_in_module_is_not_imported(edited, cache_dir, tmp_path, monkeypatch):
    """A fresh generated/ file is imported as is; a hand-edited one fails its body hash: the
    loader warns and compiles into the cache instead."""
    from optcompile.compiler import generate_sources
    from optcompile.spec import load_spec
    src = generate_sources(load_spec(ROOT / "specs" / "sgd.py"))[".py"]
    if edited:
        src = src.replace("def sgd(", "def sgd_edited(", 1)
    (tmp_path / "sgd.py").write_text(src)
    monkeypatch.setattr(loader, "generated_dir", lambda: tmp_path)
    monkeypatch.delitem(sys.modules, "optcompile.generated.sgd", raising=False)
    if edited:
        with pytest.warns(CacheWarning, match="edited or is corrupt"):
            module = loader.builtin_module("sgd")
        assert Path(module.__file__).parent == cache_dir / __version__
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module = loader.builtin_module("sgd")
        assert Path(module.__file__) == tmp_path / "sgd.py"
    assert hasattr(module, "sgd") and not hasattr(module, "sgd_edited")


@pytest.mark.parametrize("fault", ["directory", "not_utf8"])
def test_unreadable_checked_in_module_is_compiled_instead(fault, cache_dir, tmp_path, monkeypatch):
    if fault == "directory":
        (tmp_path / "sgd.py").mkdir()
    else:
        (tmp_path / "sgd.py").write_bytes(b"\xff\xfe not text")
    monkeypatch.setattr(loader, "generated_dir", lambda: tmp_path)
    monkeypatch.delitem(sys.modules, "optcompile.generated.sgd", raising=False)
    module = loader.builtin_module("sgd")
    assert Path(module.__file__).parent == cache_dir / __version__ and hasattr(module, "sgd")


def test_cli_cache_info_and_clear(spec_file, cache_dir, capsys):
    loader.compile_to_cache(spec_file)
    n = len(_entries(cache_dir))
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"root: {cache_dir}" in out and f"entries: {n}" in out
    assert cli.main(["cache", "clear"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not cache_dir.exists() or _entries(cache_dir) == []
    assert cli.main(["cache", "info"]) == 0
    assert "entries: 0" in capsys.readouterr().out


def test_cli_disable_jit_error_has_no_traceback(spec_file, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("OPTCOMPILE_DISABLE_JIT", "1")
    assert cli.main(["compile", str(spec_file)]) == 1
    err = capsys.readouterr().err
    assert "OPTCOMPILE_DISABLE_JIT" in err and "Traceback" not in err


# ── faults of a real cache: shared folders, foreign entries, damaged libraries, full or read-only
#    disks, killed builds, permissions and owners ──────────────────────────────────────────────
NEEDS_CC = pytest.mark.skipif(c_compiler() is None, reason="no C compiler for the fused backend")
# the same algorithm with another update: its kernel computes something else
OTHER_SPEC = SPEC.replace("spec.update(m, lr=lr)", "spec.update(2 * m, lr=lr)")
TINY_AFTER_ONE_STEP = [-0.05, 0.95, 1.95, 2.95]  # m = 0.1, p -= 0.5 m (what _step checks)

FUSED_STEP = r"""
import json, sys, warnings
import torch
from optcompile import loader
cls = loader.compile_spec(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = {}
    for dtype in sys.argv[2:]:
        p = torch.nn.Parameter(torch.arange(4.0, dtype=getattr(torch, dtype)))
        p.grad = torch.ones_like(p)
        cls([p], lr=0.5, fused=True).step()
        out[dtype] = p.detach().float().tolist()
print(json.dumps({"out": out, "warnings": [f"{type(w.message).__name__}: {w.message}" for w in caught]}))
"""


def _fused_step(spec_file, cache_dir, *dtypes, env=None, prefix=()):
    """One fused step per dtype in a fresh process: ``(returncode, result or stderr)``."""
    proc = subprocess.run([*prefix, sys.executable, "-c", FUSED_STEP, str(spec_file), *(dtypes or ["float32"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OPTCOMPILE_CACHE_DIR": str(cache_dir), **(env or {})})
    if proc.returncode != 0:
        return proc.returncode, proc.stderr
    return 0, json.loads(proc.stdout.splitlines()[-1])


def _libraries(cache_dir: Path) -> list[Path]:
    d = cache_dir / __version__ / "fused"
    return sorted(d.glob("*.so")) if d.exists() else []


def _owned_tree(cache_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(cache_dir)): oct(p.lstat().st_mode & 0o777) for p in cache_dir.rglob("*")}


def test_clear_and_info_touch_only_what_optcompile_created(spec_file, cache_dir, tmp_path):
    """A cache root shared with a user's files: `info` counts only entries, `clear` removes only
    them (and the folders it made, once empty), and never follows a symlink out of the cache."""
    loader.compile_to_cache(spec_file)
    n = len(_entries(cache_dir))
    outside = tmp_path / "outside"
    outside.mkdir()
    bait = [outside / f"tiny-{'0' * 12}.py", outside / f"tiny_fused-0-{'0' * 16}.so"]  # named like entries
    user = [cache_dir / "notes.txt", cache_dir / "project" / "data.bin", cache_dir / __version__ / "mine.txt",
            cache_dir / "1.2" / "results.csv", cache_dir / __version__ / "fused" / "build.log", *bait]
    for f in user:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("user data")
    (cache_dir / __version__ / "linked").symlink_to(outside)
    (cache_dir / __version__ / "fused" / "linked").symlink_to(outside)
    (cache_dir / "9.9.9").symlink_to(outside)  # a version-named symlink: not descended into
    assert cache.info()["entries"] == n
    assert cli.main(["cache", "clear"]) == 0
    assert all(f.read_text() == "user data" for f in user)
    assert not any(cache.ENTRY.fullmatch(p.name) for p in (cache_dir / __version__).iterdir())
    assert cache.info()["entries"] == 0


def _compile_with_another_spec(spec_file, tmp_path):
    """Compile ``spec_file`` and another spec into the cache; their two reports."""
    other = tmp_path / "other" / "tiny.py"
    other.parent.mkdir()
    other.write_text(OTHER_SPEC)
    ours, theirs = loader.CompileReport(), loader.CompileReport()
    loader.compile_to_cache(spec_file, ours)
    loader.compile_to_cache(other, theirs)
    return ours, theirs


@pytest.mark.parametrize("which", [0, 1, 2], ids=["module", "second_backend", "third_backend"])
def test_entry_holding_another_specs_output_is_rebuilt(which, spec_file, cache_dir, tmp_path, monkeypatch):
    """Another spec's valid file under this entry's name: its header's key is not the one asked for."""
    ours, theirs = _compile_with_another_spec(spec_file, tmp_path)
    if which >= len(ours.files):
        pytest.skip("this build generates fewer backend files")
    mine, foreign = Path(ours.files[which][0]), Path(theirs.files[which][0])
    assert mine.name != foreign.name and body_hash_ok(foreign.read_text())
    good = mine.read_bytes()
    mine.write_bytes(foreign.read_bytes())
    monkeypatch.setenv("OPTCOMPILE_DISABLE_JIT", "1")
    with pytest.raises(JITDisabledError, match="another spec"):
        loader.compile_to_cache(spec_file)
    monkeypatch.delenv("OPTCOMPILE_DISABLE_JIT")
    _fresh_module(monkeypatch, Path(ours.files[0][0]))
    with pytest.warns(CacheWarning, match="another spec or compiler"):
        cls = loader.compile_spec(spec_file)
    assert mine.read_bytes() == good
    assert torch.equal(_step(cls), torch.tensor(TINY_AFTER_ONE_STEP))


def _stand_in_loader(monkeypatch, backend) -> list:
    """Replace ``backend``'s loader with one that records the path it is given (no build, no Triton)."""
    module, _, attr = backend.loader.partition(":")
    loaded = []
    monkeypatch.setattr(importlib.import_module(module), attr, lambda info, path: loaded.append(path) or "step")
    return loaded


@pytest.mark.parametrize("name", FILE_BACKENDS)
def test_backend_file_of_another_compile_beside_a_module_is_not_loaded(name, cache_dir, tmp_path, monkeypatch):
    """A checked-in backend file with a sound body but another compile's key is not used."""
    from optcompile.compiler import generate_sources
    from optcompile.spec import load_spec
    backend = registry.get(name)
    if not backend.available():
        pytest.skip(f"backend {name} is not available here")
    sgd = generate_sources(load_spec(ROOT / "specs" / "sgd.py"))
    adam = generate_sources(load_spec(ROOT / "specs" / "adam.py"))
    (tmp_path / "sgd.py").write_text(sgd[".py"])
    (tmp_path / backend.entry("sgd")).write_text(adam[backend.suffix])  # intact, but Adam's
    monkeypatch.setattr(loader, "generated_dir", lambda: tmp_path)
    monkeypatch.delitem(sys.modules, "optcompile.generated.sgd", raising=False)
    module = loader.builtin_module("sgd")
    assert Path(module.__file__) == tmp_path / "sgd.py"
    loaded = _stand_in_loader(monkeypatch, backend)
    assert loader.load_backend(module._INFO, name) == "step"
    assert loaded[0].parent == cache_dir / __version__
    assert loaded[0].read_text() == sgd[backend.suffix]


def test_every_file_of_a_compile_is_stamped_with_the_key_it_is_stored_under(spec_file, cache_dir, monkeypatch):
    report = loader.CompileReport()
    loader.compile_to_cache(spec_file, report)
    key = Path(report.files[0][0]).stem
    assert [Path(f).name for f, _ in report.files] == [b.entry(key) for b in registry.files().values()]
    for f, _ in report.files:
        assert parse_key(Path(f).read_text()) == key, f
    _fresh_module(monkeypatch, Path(report.files[0][0]))
    assert loader.compile_spec(spec_file)._info.key == key  # the module carries it as a value


@pytest.mark.parametrize("name", FILE_BACKENDS)
def test_module_imported_by_hand_does_not_load_another_compiles_backend_file(name, spec_file, cache_dir, tmp_path,
                                                                              monkeypatch):
    """A module imported without the loader still checks the backend file beside it against its
    own key (``_INFO.key``), and takes its own compile's file from the cache instead."""
    backend = registry.get(name)
    if not backend.available():
        pytest.skip(f"backend {name} is not available here")
    ours, theirs = _compile_with_another_spec(spec_file, tmp_path)
    mine = {Path(f).name: Path(f) for f, _ in ours.files}
    foreign = {Path(f).name[len(Path(theirs.files[0][0]).stem):]: Path(f) for f, _ in theirs.files}
    key = Path(ours.files[0][0]).stem
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "tiny_mine.py").write_bytes(mine[key + ".py"].read_bytes())
    (copied / backend.entry("tiny_mine")).write_bytes(foreign[backend.suffix].read_bytes())  # sound, another key
    module_name = "optcompile.generated.tiny_mine_by_hand"
    monkeypatch.setitem(sys.modules, module_name, None)  # so the module is removed again at teardown
    module = loader.import_path(module_name, copied / "tiny_mine.py")
    loaded = _stand_in_loader(monkeypatch, backend)
    assert loader.load_backend(module._INFO, name) == "step"
    assert loaded == [mine[backend.entry(key)]]


@NEEDS_CC
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "directory", "other_library"])
def test_damaged_cached_library_is_rebuilt_with_a_warning(damage, spec_file, cache_dir, tmp_path):
    """A truncated library would kill the process in dlopen (SIGBUS), a directory fail to load, another
    spec's library run the wrong kernel: each is caught before loading and rebuilt once, saying so."""
    rc, first = _fused_step(spec_file, cache_dir)
    assert rc == 0 and first["out"]["float32"] == pytest.approx(TINY_AFTER_ONE_STEP), first
    assert not [w for w in first["warnings"] if "Fallback" in w or "Cache" in w], first["warnings"]
    (lib,) = _libraries(cache_dir)
    good = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(good[: len(good) // 3])
    elif damage == "directory":
        lib.unlink()
        lib.mkdir()
        (lib / "x").write_text("")
    else:
        other = tmp_path / "other" / "tiny.py"
        other.parent.mkdir()
        other.write_text(OTHER_SPEC)
        from optcompile.backends import fused_runtime
        module = loader.compile_to_cache(other)
        foreign = fused_runtime.build(module.with_name(module.stem + "_fused.c"), 0)
        lib.write_bytes(foreign.read_bytes())  # a sound library, of another kernel
    rc, again = _fused_step(spec_file, cache_dir)
    assert rc == 0, again
    assert again["out"]["float32"] == pytest.approx(TINY_AFTER_ONE_STEP)
    assert not [w for w in again["warnings"] if "FusedFallback" in w], again["warnings"]
    damaged = [w for w in again["warnings"] if w.startswith("CacheWarning") and lib.name in w]
    assert len(damaged) == 1 and ("damaged" in damaged[0] or "directory" in damaged[0]), again["warnings"]
    assert lib.is_file() and cache.seal_problem(lib) is None
    rc, third = _fused_step(spec_file, cache_dir)  # rebuilt once: the next process just uses it
    assert rc == 0 and not [w for w in third["warnings"] if "Cache" in w or "Fallback" in w], third


def _cc_logger(tmp_path: Path) -> tuple[Path, Path]:
    """A C compiler that logs every compile (not ``--version``) and then runs the real one."""
    log, cc = tmp_path / "cc.log", tmp_path / "logcc"
    cc.write_text(f'#!/bin/sh\ncase "$1" in --version) ;; *) echo "$@" >> {log} ;; esac\nexec {c_compiler()} "$@"\n')
    cc.chmod(0o755)
    return cc, log


def _read_only(path: Path) -> tuple[str, ...]:
    """A command prefix that runs the rest with ``path`` bind-mounted read-only (root ignores mode
    bits, so chmod proves nothing); skips where mount namespaces are not allowed."""
    mount = f"mount --bind -o ro '{path}' '{path}'"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && ! touch '{path}/.w'"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {probe.stderr.decode().strip()[:200]}")
    return ("unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "ro")


@NEEDS_CC
@pytest.mark.slow
def test_populated_read_only_cache_is_used_as_is(spec_file, cache_dir, tmp_path):
    """Everything present is used without gcc or temp folders; only what is missing (the bf16
    library) is built, into a temp folder removed at exit, with one warning."""
    cc, log = _cc_logger(tmp_path)
    rc, first = _fused_step(spec_file, cache_dir, "float32", env={"CC": str(cc)})
    assert rc == 0, first
    assert len(log.read_text().splitlines()) == 1
    before = _owned_tree(cache_dir)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ro = _read_only(cache_dir)
    rc, out = _fused_step(spec_file, cache_dir, "float32", env={"CC": str(cc), "TMPDIR": str(tmp)}, prefix=ro)
    assert rc == 0, out
    assert out["out"]["float32"] == pytest.approx(TINY_AFTER_ONE_STEP)
    assert not [w for w in out["warnings"] if "Cache" in w or "Fallback" in w], out["warnings"]
    assert len(log.read_text().splitlines()) == 1, "gcc ran although the library was in the cache"
    assert list(tmp.iterdir()) == []
    rc, out = _fused_step(spec_file, cache_dir, "float32", "bfloat16", env={"CC": str(cc), "TMPDIR": str(tmp)},
                          prefix=ro)
    assert rc == 0, out
    assert len(log.read_text().splitlines()) == 2  # the missing bf16 library only
    ours = [w for w in out["warnings"] if "Cache" in w or "Fallback" in w]
    assert len(ours) == 1 and "not usable" in ours[0], out["warnings"]
    assert out["out"]["bfloat16"] == pytest.approx(TINY_AFTER_ONE_STEP, abs=1e-2)
    assert list(tmp.iterdir()) == [], "the fallback folder outlived its process"
    assert _owned_tree(cache_dir) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_full_disk_while_writing_falls_back_with_one_warning(code, spec_file, cache_dir, tmp_path, monkeypatch):
    real = cache.atomic_write

    def full(path, data, mode=None):
        if str(path).startswith(str(cache_dir)):
            raise OSError(code, os.strerror(code))
        return real(path, data, mode)
    monkeypatch.setattr(cache, "atomic_write", full)
    with pytest.warns(CacheWarning, match=os.strerror(code)) as caught:
        cls = loader.compile_spec(spec_file)
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1
    assert torch.equal(_step(cls), torch.tensor(TINY_AFTER_ONE_STEP))
    assert not sys.modules[cls._info.module].__file__.startswith(str(cache_dir))
    assert _entries(cache_dir) == [] and not _temps(cache_dir)
    other = tmp_path / "other" / "tiny.py"
    other.parent.mkdir()
    other.write_text(OTHER_SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        loader.compile_to_cache(other)


EFBIG_WORKER = r"""
import resource, signal, sys
from optcompile import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.exit(cli.main(["compile", sys.argv[1]]))
"""


def test_file_size_limit_is_one_error_line_and_leaves_no_partial_entry(spec_file, cache_dir):
    """RLIMIT_FSIZE stops every write, the temp fallback's too: one line, no traceback, nothing torn."""
    proc = subprocess.run([sys.executable, "-c", EFBIG_WORKER, str(spec_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OPTCOMPILE_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("optcompile: error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and "File too large" in errors[0], proc.stderr
    assert _entries(cache_dir) == [] and not _temps(cache_dir)


def test_info_and_clear_count_and_remove_every_library_and_nothing_else(cache_dir):
    """Kernels for every storage (stochastic rounding's tags end in ``s``), the pointer reader and
    the table checker."""
    fused = cache_dir / __version__ / "fused"
    fused.mkdir(parents=True)
    ours = [fused / f"adamw-{'a' * 12}_fused-0-{'b' * 16}.so", fused / f"adamw-{'a' * 12}_fused-111s-{'c' * 16}.so",
            fused / f"tensor_pointers-{'d' * 16}.so", fused / f"table_check-{'e' * 16}.so"]
    theirs = [fused / "notes.so", fused / f"tensor_pointers-{'d' * 15}.so"]
    for f in ours + theirs:
        f.write_bytes(b"\x7fELF")
    assert cache.info()["entries"] == len(ours)
    assert cache.clear() == len(ours)
    assert [f for f in ours if f.exists()] == [] and all(f.exists() for f in theirs)


def test_dead_writers_leftovers_are_removed_and_a_directory_entry_rebuilt(spec_file, cache_dir, monkeypatch):
    key_path = loader.compile_to_cache(spec_file)
    good = key_path.read_bytes()
    cache.clear()
    v, fused = cache_dir / __version__, cache_dir / __version__ / "fused"
    lib = f"tiny_fused-0-{'a' * 16}.so"
    dead = [v / f".tiny-{'b' * 12}.py.x1y2z3ab.tmp",  # another entry's writer, killed
            fused / f".{lib}.q9w8e7r6.tmp", fused / f"{cache.BUILD_DIR}{lib}.k3j4h5g6", v / ".probe-999999999"]
    old_build = fused / f"{cache.BUILD_DIR}a1b2c3d4"  # an older optcompile's unnamed build folder
    live_build = fused / f"{cache.BUILD_DIR}e5f6g7h8"
    for d in dead + [old_build, live_build]:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir() if "cc-" in d.name else d.write_bytes(b"partial")
    (dead[2] / lib).write_bytes(b"half a library")
    os.utime(old_build, (time.time() - 2 * 3600,) * 2)
    key_path.mkdir()  # a directory where the entry belongs
    (key_path / "junk").write_text("")
    _fresh_module(monkeypatch, key_path)
    with pytest.warns(CacheWarning, match="is a directory"):
        cls = loader.compile_spec(spec_file)
    assert key_path.read_bytes() == good and torch.equal(_step(cls), torch.tensor(TINY_AFTER_ONE_STEP))
    assert [d for d in dead + [old_build] if os.path.lexists(d)] == []
    assert live_build.exists()  # might be a build in progress: recent and unnamed, so kept


@NEEDS_CC
@pytest.mark.slow
def test_build_killed_in_the_compiler_leaves_nothing_behind(spec_file, cache_dir, tmp_path):
    marker, hang = tmp_path / "marker", tmp_path / "hangcc"
    hang.write_text(f'#!/bin/sh\ncase "$1" in --version) exec {c_compiler()} --version ;; esac\n'
                    f'touch {marker}\nsleep 600\n')
    hang.chmod(0o755)
    env = {**os.environ, "OPTCOMPILE_CACHE_DIR": str(cache_dir), "CC": str(hang)}
    proc = subprocess.Popen([sys.executable, "-c", FUSED_STEP, str(spec_file), "float32"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the Python process and its compiler
    proc.wait(timeout=30)
    fused = cache_dir / __version__ / "fused"
    assert [p.name for p in fused.iterdir() if p.name.startswith(cache.BUILD_DIR)], "nothing to clean up?"
    rc, out = _fused_step(spec_file, cache_dir)
    assert rc == 0 and out["out"]["float32"] == pytest.approx(TINY_AFTER_ONE_STEP), out
    assert not [p for p in fused.iterdir() if p.name.startswith(cache.BUILD_DIR) or p.name.endswith(".tmp")]


def test_folders_0700_and_files_0600_whatever_the_umask(spec_file, cache_dir, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # Python's __pycache__ of entries too
    old = os.umask(0)
    try:
        cls = loader.compile_spec(spec_file)
        if c_compiler() is not None:
            from optcompile.backends import fused_runtime
            src = next(p for p in (cache_dir / __version__).iterdir() if p.name.endswith("_fused.c"))
            fused_runtime.build(src, 0)
    finally:
        os.umask(old)
    modes = _owned_tree(cache_dir)
    assert modes and cls.__name__ == "Tiny"
    assert {k: m for k, m in modes.items() if (cache_dir / k).is_dir() and m != "0o700"} == {}
    assert {k: m for k, m in modes.items() if (cache_dir / k).is_file() and m != "0o600"} == {}
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("folder", ["root", "version"])
def test_cache_folder_of_another_user_is_refused(folder, spec_file, cache_dir, capsys):
    loader.compile_to_cache(spec_file)
    target = cache_dir if folder == "root" else cache_dir / __version__
    os.chown(target, 65534, 65534)
    before = _owned_tree(cache_dir)
    with pytest.raises(cache.UnsafeCacheError, match=rf"{re.escape(str(target))}.*uid 65534.*uid 0"):
        loader.compile_spec(spec_file)
    for args in (["cache", "clear"], ["cache", "info"], ["compile", str(spec_file)]):
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "owned by uid 65534" in err and "Traceback" not in err
    assert _owned_tree(cache_dir) == before  # nothing removed or written
