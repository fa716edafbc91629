"""Triton on CUDA and the GPU check that runs it (benchmarks/gpu_check.sh).

On a machine with a GPU, ``test_triton_tests_pass_on_cuda`` runs tests/test_triton.py with
compiled kernels on the GPU (``OPTCOMPILE_TEST_DEVICE=cuda``). Everywhere, the CPU-side logic
is checked: the device switch rejects what it cannot run with a clear error, the GPU check
script parses its arguments, refuses a machine without CUDA and writes its report, and the
benchmark's 1B-parameter set and memory-aware scheduling work at toy size.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
HAS_CUDA = torch.cuda.is_available()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pytest_triton(device: str, *args, timeout=120):
    env = dict(os.environ, OPTCOMPILE_TEST_DEVICE=device)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton.py",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ── the device switch of tests/test_triton.py ──────────────────────────────────────────────────
@pytest.mark.triton
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_triton_tests_pass_on_cuda():
    out = _pytest_triton("cuda", timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.parametrize("device, message", [
    ("tpu", "OPTCOMPILE_TEST_DEVICE='tpu': expected 'cpu'"),
    pytest.param("cuda", "OPTCOMPILE_TEST_DEVICE=cuda but torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")),
])
def test_device_switch_refuses_what_it_cannot_run(device, message):
    """A GPU check that silently ran the interpreter (or nothing) on CPU would report a pass."""
    out = _pytest_triton(device, "--collect-only")
    assert out.returncode != 0
    assert message in out.stdout + out.stderr, out.stdout[-3000:]


# ── benchmarks/gpu_check.sh ────────────────────────────────────────────────────────────────────
def _script(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_gpu_check_script_syntax_and_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    out = _script("--help")
    assert out.returncode == 0 and "--smoke" in out.stdout and "OPTCOMPILE_TEST_DEVICE=cuda" in out.stdout
    out = _script("--bogus")
    assert out.returncode == 64 and "unknown argument '--bogus'" in out.stderr
    out = _script("--bench-timeout", "soon")
    assert out.returncode == 64 and "whole seconds, got 'soon'" in out.stderr


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
def test_gpu_check_without_cuda_exits_2_with_a_message(tmp_path):
    out = _script("--out", str(tmp_path), env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no Python here has torch with a usable GPU" in out.stderr
    assert f"{sys.executable}: torch {torch.__version__}" in out.stdout
    assert not list(tmp_path.iterdir())  # no report pretending a result


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_the_report(tmp_path):
    """The whole pipeline at toy size on CPU: phase bookkeeping, the benchmark's table, the file."""
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    out = _script("--smoke", "--skip-tests", "--out", str(tmp_path), env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    (report,) = tmp_path.glob("gpu_check-*-smoke.md")
    text = report.read_text()
    assert "smoke run on CPU" in text
    assert "| tests/test_triton.py (OPTCOMPILE_TEST_DEVICE=cpu) | skipped | 0 |" in text
    assert "| benchmarks/bench_step.py | passed |" in text
    rows = [line for line in text.splitlines() if line.startswith("| gpt2-1b")]
    assert len(rows) == 4 and all(float(r.split("|")[6]) > 0 for r in rows), rows  # the "ours fused" column
    assert text in out.stdout  # also printed


# ── benchmarks/bench_step.py: the GPU set and the memory-aware schedule ────────────────────────
def test_gpt2_1b_set_is_over_a_billion_params_and_shrinks():
    b = _bench()
    full = b.numel(b.gpt2_1b(1.0))
    assert 1.3e9 < full < 1.32e9 and (2048 * 8192) in [torch.Size(s).numel() for s in b.gpt2_1b(1.0)]
    assert b.numel(b.gpt2_1b(0.0005)) < 1e6
    assert b.numel(b.gpt2_like(1.0)) == 34_132_992  # the CPU set is unchanged by the refactor


def test_bench_rejects_cuda_without_a_gpu_and_unknown_sets(capsys):
    b = _bench()
    with pytest.raises(SystemExit):
        b.main(["--sets", "gpt2,huge"])
    assert "--sets: unknown 'huge'" in capsys.readouterr().err
    if not HAS_CUDA:
        with pytest.raises(SystemExit):
            b.main(["--device", "cuda"])
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_sequential_schedule_times_every_implementation():
    """The GPU schedule for sets too big to hold every implementation at once (build, time,
    free, next) times the same implementations as the interleaved one."""
    b = _bench()
    shapes = b.gpt2_1b(0.0002)
    only = ["ours foreach", "torch AdamW foreach"]
    both = [b.run_config("adamw", shapes, torch.float32, False, "cpu", rounds=2, steps=1, only=only,
                         sequential=seq) for seq in (True, False)]
    assert [sorted(r) for r in both] == [sorted(only)] * 2
    assert all(t > 0 for r in both for t in r.values())


def test_missing_deepspeed_drops_its_column_with_a_note(tmp_path, monkeypatch):
    b = _bench()
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    out = tmp_path / "bench.md"
    b.main(["--scale", "0.0002", "--sets", "gpt2", "--optimizers", "adamw", "--dtypes", "fp32", "--threads", "1",
            "--rounds", "1", "--only", "ours foreach,deepspeed", "--no-compile-costs", "--out", str(out)])
    text = out.read_text()
    assert "no DeepSpeedCPUAdam column: deepspeed is not installed" in text
    assert "deepspeed CPUAdam |" not in text and "× DeepSpeedCPUAdam" not in text
    assert b.column_of("torch AdamW* fused") == "torch fused" and b.column_of(b.DEEPSPEED) == b.DEEPSPEED


def test_torch_family_mode_finds_every_torch_family_spec():
    """The mode is driven by the specs, so a new torch.optim-family built-in is benchmarked the
    day it lands: exactly the registry's torch-family classes."""
    from optimizers import BY_STEM, STEMS
    assert _bench().torch_family() == {s: BY_STEM[s].name for s in STEMS if BY_STEM[s].torch_family}


def test_torch_family_mode_rewrites_its_readme_block(tmp_path):
    b = _bench()
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:torch-family:begin -->\nold\n<!-- bench:torch-family:end -->\nafter\n")
    stem = next(iter(b.torch_family()))
    b.main(["--torch-family", "--scale", "0.0002", "--sets", "gpt2", "--optimizers", stem, "--rounds", "1",
            "--dtypes", "fp32", "--readme", str(readme), "--out", str(tmp_path / "bench.md")])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "\nold\n" not in text
    assert "× torch best" in text and f"| {stem} | fp32 |" in text


@pytest.mark.slow
def test_deepspeed_peer_computes_adamw():
    """The DeepSpeedCPUAdam column is a fair peer only while it computes AdamW: within a few fp32
    ulp of torch.optim.AdamW, and bit-identical in bf16 to fp32 AdamW rounded once per step."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the optional bench extra)")
    b = _bench()
    cls, note = b.deepspeed_cpu_adam()
    if cls is None:
        pytest.skip(note)
    fp32, bf16 = note.split("; ")
    assert float(fp32.split("|Δparam| ")[1].split(",")[0]) < 1e-5, note
    assert "bfloat16 max |Δparam| 0.0e+00, 0 of" in bf16, note
