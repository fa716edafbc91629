"""The cache survives what happens to real caches: torn, edited and corrupted entries, writers
killed mid-write, unusable folders, and several processes compiling the same spec at once."""
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from optcompile import cli, loader
from optcompile.cache import CacheWarning, JITDisabledError
from optcompile.codegen.header import body_hash_ok
from optcompile.version import __version__

ROOT = Path(__file__).resolve().parents[1]
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
    """Cache entries (not locks) of this compiler version."""
    d = cache_dir / __version__
    return sorted(p for p in d.iterdir() if not p.name.endswith(".lock") and not p.name.startswith(".")) \
        if d.exists() else []


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
