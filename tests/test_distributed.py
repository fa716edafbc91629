"""Generated optimizers under torch.distributed on CPU (gloo, 2 processes): DDP, and FSDP2
(fully_shard, DTensor params) with the eager and foreach backends.

Elementwise algorithms step each rank's local shard, bit for bit as unsharded. Algorithms with
per-tensor reductions (or numel) step local shards too: each reduction is the all-reduce of the
shards' partials (optcompile/sharding.py), never a gather, so they match the unsharded run up to
the order of fp32 additions; checked on every backend that runs here (eager, foreach, the fused C
kernel, Triton under TRITON_INTERPRET) with StableAdamW and a user spec reducing by mean, sum, max
and numel, over uneven shards (one rank's shard of a tensor is empty).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors
import dist_worker as w  # noqa: E402
from optcompile.loader import builtin_module
from optcompile.paths import builtin_specs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
# every built-in but those that take only matrices (Muon): the worker's model has 1-D params
# (Muon's FSDP2 runs on a matrices-only model: test_fsdp2_muon_*)
NAMES = [p.stem for p in builtin_specs() if not builtin_module(p.stem)._INFO.extra.get("param_ndims")]

REDUCTION_SPEC = """\
from optcompile.spec import *
spec = OptimizerSpec("RmsNormed", weight_decay="decoupled")
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", 0.9, Interval.Ropen(0, 1))
spec.weight_decay_hyper(0.01)
eps = spec.hyper("eps", 1e-6, Interval(0, oo))
m = spec.state("m")
m = spec.assign(m, beta * m + (1 - beta) * spec.grad)
rms = spec.let("rms", sqrt(spec.mean(m**2)))
center = spec.let("center", spec.sum(m) / spec.numel)
spec.update(m / (rms + eps) + spec.max(Abs(spec.grad)) * 0.01 * sign(m) + 0.1 * center, lr=lr)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    spec = tmp / "rms_normed.py"
    spec.write_text(REDUCTION_SPEC)
    out = tmp / "results.pt"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("dist_worker.py")), str(out),
                                       ",".join(NAMES), str(spec)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    return torch.load(out, weights_only=False), str(spec)


def _close(got, want, rtol, atol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what} tensor {i}: {m}")


@pytest.mark.parametrize("foreach", [False, True])
def test_ddp_matches_single_process(results, foreach):
    res, _ = results
    # DDP averages the two half-batch gradients: the full-batch gradient up to the rounding of
    # one all-reduce (the order of additions), amplified a little by Adam's normalisation
    _close(res[("ddp", "adamw", foreach)], w.reference_training("adamw", foreach), 1e-5, 1e-6, "ddp")


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", NAMES + ["reduction_spec"])
def test_fsdp2_training_matches_unsharded(results, name, foreach):
    res, spec = results
    key = spec if name == "reduction_spec" else name
    shapes = res[("fsdp2_local_shape", key, foreach)]
    assert shapes[0][0] == 5, "params were not sharded"  # 10 rows over 2 ranks
    # reduce-scatter of gradients rounds differently from the single-process backward
    _close(res[("fsdp2", key, foreach)], w.reference_training(key, foreach), 1e-4, 1e-5, f"fsdp2 {name}")


# fp32 sums over shards add in another order than over the whole tensor: a few ulps in a
# reduction, after three steps of lr 1e-2 well inside this
SHARDED_RTOL, SHARDED_ATOL = 1e-5, 1e-6


def _whole_tensor(key) -> bool:
    return w.opt_class(key)._info.extra["whole_tensor"]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", NAMES + ["reduction_spec"])
def test_sharded_dtensor_step_matches_unsharded(results, name, foreach):
    """Same params and grads, sharded unevenly over 2 ranks vs whole: identical bits for
    elementwise algorithms; for reductions, equal up to the fp32 order of additions (which is
    only true if each mean/sum/max spans both shards)."""
    res, spec = results
    key = spec if name == "reduction_spec" else name
    got, want = res[("dtensor", key, foreach)], w.reference_steps(key, foreach)
    if _whole_tensor(key):
        _close(got, want, SHARDED_RTOL, SHARDED_ATOL, f"sharded {name}")
    else:
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{name} tensor {i}: max diff {(a - b).abs().max()}"
    assert res[("dtensor_state_type", key, foreach)] == ["DTensor"], "optimizer state is not sharded"


@pytest.mark.parametrize("backend", w.sharded_backends())
@pytest.mark.parametrize("name", ["stableadamw", "reduction_spec"])
def test_sharded_reductions_all_reduce_partials(results, name, backend):
    """Reductions over sharded params on every backend: the result matches the unsharded run,
    and no step gathers a tensor: the partials are all-reduced."""
    res, spec = results
    key = spec if name == "reduction_spec" else name
    # rank 0 holds 4 of 7 rows, 3 of 5, the 1 row of (1, 4): rank 1's shard of that one is empty
    assert res[("sharded_local_numel", key, backend)] == [12, 3, 4]
    _close(res[("sharded", key, backend)], w.reference_steps_on(key, backend), SHARDED_RTOL, SHARDED_ATOL,
           f"sharded {name} on {backend}")
    for step, (gathers, all_reduces) in enumerate(res[("sharded_collectives", key, backend)]):
        assert gathers == 0, f"step {step} gathered {gathers} times"
        assert all_reduces > 0, f"step {step} combined no reduction across the shards"
    want = w.reference_steps_on(key, backend)[2]  # the (1, 4) param alone steps as in the list
    torch.testing.assert_close(res[("sharded_lone", key, backend)], want, rtol=SHARDED_RTOL, atol=SHARDED_ATOL)


def test_sharded_reduction_rules(results):
    """The all-reduce of partials: sums add, a mean divides by the global numel, a max ignores an
    empty shard (-inf) and propagates NaN from either rank."""
    res, _ = results
    ops = res["shard_ops"]  # rank 0: [1, 2], [], []; rank 1: [4], [nan, 1], [-5]
    nan = float("nan")
    torch.testing.assert_close(ops["sum"], torch.tensor([7.0, nan, -5.0]), equal_nan=True)
    torch.testing.assert_close(ops["mean"], torch.tensor([7.0 / 3, nan, -5.0]), equal_nan=True)
    torch.testing.assert_close(ops["max"], torch.tensor([4.0, nan, -5.0]), equal_nan=True)


@pytest.mark.parametrize("backend", w.sharded_backends())
def test_fsdp2_muon_matches_unsharded(results, backend):
    """Muon orthogonalizes whole matrices, so a sharded step gathers param, grad and momentum
    (runtime._step_on_full_tensors), steps them whole on every rank and keeps each rank's shard.
    Sharded DTensor steps on the same grads are bit-exact with the unsharded run; FSDP2 training
    matches it up to the reduce-scatter's rounding of the gradients (which a bf16 Newton–Schulz
    may turn into a bf16 ulp of the update: lr·2⁻⁸)."""
    res, _ = results
    assert res[("fsdp2_muon_local_shape", backend)] == [(5, 6), (2, 10)], "params were not sharded"
    _close(res[("fsdp2_muon", backend)], w.reference_matrix_training("muon", backend), 1e-4, 1e-4,
           f"fsdp2 muon on {backend}")
    for i, (a, b) in enumerate(zip(res[("dtensor_muon", backend)], w.reference_matrix_steps("muon", backend))):
        assert torch.equal(a, b), f"muon on {backend}, tensor {i}: max diff {(a - b).abs().max()}"
    # the momentum stays sharded: rank 0's rows of (7, 3) and of (1, 4)
    assert res[("dtensor_muon_state", backend)] == [("DTensor", (4, 3)), ("DTensor", (1, 4))]


@pytest.mark.parametrize("backend", ["eager", "foreach", "fused"])
def test_fsdp2_eightbit_states_are_per_local_shard(results, backend):
    """state_precision="8bit" on sharded DTensor params (uneven shards, blocks not aligned with
    the unsharded tensor's on rank 1): the step equals, bit for bit, stepping each row shard as a
    separate param (the fused kernel loading and storing the codes itself); codes are DTensors of the param's layout, scales DTensors with one row per
    shard (rank 1's padded); dequantized_state gives a DTensor; a state dict through
    torch.load(weights_only=True) resumes bit for bit; a small param keeps fp32 states."""
    res, _ = results
    want, want_exp_avg = w.eightbit_reference(backend)
    for i, (a, b) in enumerate(zip(res[("8bit", backend)], want)):
        assert torch.equal(a, b), f"tensor {i}: max diff {(a - b).abs().max()}"
    aligned, uneven, small = res[("8bit_state", backend)]
    assert aligned["exp_avg"] == ("DTensor", torch.int8, (8, 1024), ["S(0)"], (4, 1024))
    assert aligned["exp_avg_sq"][:3] == ("DTensor", torch.uint8, (8, 1024))
    assert aligned["exp_avg_scale"] == ("DTensor", torch.float32, (2, 16), ["S(0)"], (1, 16))
    assert uneven["exp_avg_scale"] == ("DTensor", torch.float32, (2, 36), ["S(0)"], (1, 36))  # 9000 elements: 36 blocks
    assert set(small) == {"exp_avg", "exp_avg_sq"} and small["exp_avg"][1] == torch.float32
    assert torch.equal(res[("8bit_dequantized", backend)], want_exp_avg)
    assert res[("8bit_in_kernel", backend)] == (["exp_avg", "exp_avg_sq"] if backend == "fused" else [])
    assert res[("8bit_resumed", backend)]
