"""One rank of tests/test_distributed.py (launched twice with torchrun-style env: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). ``dist_worker.py OUT.pt NAMES REDUCTION_SPEC``.

Runs, on CPU with gloo: DDP training; FSDP2 (fully_shard) training with the eager and foreach
backends; and single steps on hand-made sharded DTensors. Rank 0 saves the full results; the test
compares them with the single-process runs of the same functions here (``reference_*``).
"""
import os
import sys
import warnings

import torch

STEPS = 4
BATCH = 16  # per rank


def model_and_data(seed=0, world=2, bias=True):
    """A two-layer MLP and its batches; ``bias=False``: matrices only (Muon takes nothing else)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10, bias=bias), torch.nn.Tanh(), torch.nn.Linear(10, 3, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    xs = torch.randn(STEPS, BATCH * world, 6, generator=g)
    ys = torch.randn(STEPS, BATCH * world, 3, generator=g)
    return model, xs, ys


def opt_class(name: str):
    from optcompile import loader
    if name.endswith(".py"):
        return loader.compile_spec(name)
    module = loader.builtin_module(name)
    return getattr(module, module._INFO.name)


def kwargs(name: str) -> dict:
    return {"momentum": 0.9} if name == "sgd" else {}


def make(name, params, foreach):
    return opt_class(name)(params, lr=1e-2, foreach=foreach, triton=False, fused=False, **kwargs(name))


def train(model, opt, xs, ys, rank=0, world=1):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        lo, hi = rank * len(x) // world, (rank + 1) * len(x) // world
        torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()


def reference_training(name, foreach):
    model, xs, ys = model_and_data()
    train(model, make(name, model.parameters(), foreach), xs, ys)
    return [p.detach().clone() for p in model.parameters()]


def shard_inputs(seed=1):
    """Full tensors for the single-step check: odd sizes, so shards are uneven."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (1, 4)]
    return [torch.randn(s, generator=g) for s in shapes], [[torch.randn(s, generator=g) for s in shapes]
                                                           for _ in range(3)]


def _unsharded_steps(make_opt):
    """The params after ``shard_inputs``' steps on one process, with ``make_opt(params)``."""
    params, grads = shard_inputs()
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_opt(ps)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in ps]


def reference_steps(name, foreach):
    return _unsharded_steps(lambda ps: make(name, ps, foreach))


BACKENDS = {"eager": dict(foreach=False, triton=False, fused=False), "foreach": dict(foreach=True, triton=False, fused=False),
            "fused": dict(fused=True), "triton": dict(triton=True)}


def sharded_backends() -> list[str]:
    """The backends the sharded-reduction check runs: Triton where its kernels run on CPU."""
    from optcompile import backends_available as avail
    names = ["eager", "foreach"] + (["fused"] if avail.fused_cpu() else [])
    return names + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" and avail.triton_importable() else [])


def make_on(name, params, backend):
    return opt_class(name)(params, lr=1e-2, **BACKENDS[backend], **kwargs(name))


def matrix_shard_inputs():
    """``shard_inputs``' matrices: (7, 3) splits 4 + 3 rows, (1, 4) leaves rank 1 an empty shard."""
    params, grads = shard_inputs()
    return [params[0], params[2]], [[gs[0], gs[2]] for gs in grads]


def reference_matrix_training(name, backend):
    """``reference_training`` of the matrices-only model on one backend (Muon's FSDP2 check)."""
    model, xs, ys = model_and_data(bias=False)
    train(model, make_on(name, model.parameters(), backend), xs, ys)
    return [p.detach().clone() for p in model.parameters()]


def reference_matrix_steps(name, backend):
    params, grads = matrix_shard_inputs()
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_on(name, ps, backend)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in ps]


def reference_steps_on(name, backend):
    """``reference_steps`` on one backend: the unsharded run a sharded one is compared with."""
    return _unsharded_steps(lambda ps: make_on(name, ps, backend))


def eightbit_inputs(seed=2):
    """Full tensors for the 8-bit check (state_precision="8bit", blocks of 256 per local shard):
    (8, 1024), whose shards over 2 ranks are whole blocks; (17, 1000), split 9000 / 8000
    elements, so rank 1's blocks start off the unsharded run's; (5,), below the size threshold."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 1024), (17, 1000), (5,)]
    return [torch.randn(s, generator=g) for s in shapes], [[torch.randn(s, generator=g) for s in shapes]
                                                           for _ in range(3)]


def make_8bit(params, backend):
    return opt_class("adamw")(params, lr=1e-2, weight_decay=0.01, state_precision="8bit", **BACKENDS[backend])


def eightbit_reference(backend, world=2):
    """``eightbit_inputs``' steps on one process with each sharded tensor stepped as its two
    row shards, separate params: per-shard blocks, so an elementwise step matches bit for bit."""
    params, grads = eightbit_inputs()

    def split(t):
        return [c.clone() for c in t.chunk(world)] if t.numel() >= 4096 else [t.clone()]
    ps = [torch.nn.Parameter(c) for t in params for c in split(t)]
    opt = make_8bit(ps, backend)
    for gs in grads:
        for p, g in zip(ps, [c for t in gs for c in split(t)]):
            p.grad = g
        opt.step()
    out, k = [], 0
    for t in params:
        n = len(split(t))
        out.append(torch.cat([p.detach() for p in ps[k:k + n]]))
        k += n
    return out, torch.cat([opt.dequantized_state(p, "exp_avg") for p in ps[2:4]])


class Collectives:
    """Counts, while active, the collectives a step makes: all-reduces, and every way of
    gathering a tensor (c10d all-gathers, functional all-gathers, DTensor's full_tensor and
    redistribute)."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        from torch.distributed.tensor import DTensor
        self.targets = [(dist, "all_reduce"), (dist, "all_gather"), (dist, "all_gather_into_tensor"),
                        (dist, "all_gather_object"), (funcol, "all_gather_tensor"), (DTensor, "full_tensor"),
                        (DTensor, "redistribute")]
        self.calls = {name: 0 for _, name in self.targets}

    def __enter__(self):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in self.targets]
        for owner, name, fn in self.saved:
            def counted(*args, _fn=fn, _name=name, **kw):
                self.calls[_name] += 1
                return _fn(*args, **kw)
            setattr(owner, name, counted)
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)

    @property
    def gathers(self) -> int:
        return sum(n for name, n in self.calls.items() if name != "all_reduce")


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    out, names, red_spec = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    warnings.simplefilter("ignore")

    for foreach in (False, True):
        model, xs, ys = model_and_data(world=world)
        ddp = DDP(model)
        train(ddp, make("adamw", ddp.parameters(), foreach), xs, ys, rank, world)
        results[("ddp", "adamw", foreach)] = [p.detach().clone() for p in model.parameters()]

    for name in names + [red_spec]:
        for foreach in (False, True):
            model, xs, ys = model_and_data(world=world)
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = make(name, model.parameters(), foreach)
            train(model, opt, xs, ys, rank, world)
            results[("fsdp2", name, foreach)] = [p.full_tensor().detach().clone() for p in model.parameters()]
            results[("fsdp2_local_shape", name, foreach)] = [tuple(p.to_local().shape) for p in model.parameters()]

            params, grads = shard_inputs()
            ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in params]
            opt = make(name, ps, foreach)
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = distribute_tensor(g, mesh, [Shard(0)])
                opt.step()
            results[("dtensor", name, foreach)] = [p.full_tensor().detach().clone() for p in ps]
            state = opt.state[ps[0]]
            results[("dtensor_state_type", name, foreach)] = sorted(
                {type(v).__name__ for v in state.values() if torch.is_tensor(v) and v.dim() > 0})
    # per-tensor reductions over local shards: no gather in step(), partials all-reduced
    for name in ["stableadamw", red_spec]:
        for backend in sharded_backends():
            params, grads = shard_inputs()
            ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in params]
            opt = make_on(name, ps, backend)
            counts = []
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = distribute_tensor(g, mesh, [Shard(0)])
                with Collectives() as seen:
                    opt.step()
                counts.append((seen.gathers, seen.calls["all_reduce"]))
            results[("sharded", name, backend)] = [p.full_tensor().detach().clone() for p in ps]
            results[("sharded_collectives", name, backend)] = counts
            results[("sharded_local_numel", name, backend)] = [p.to_local().numel() for p in ps]
            # a param whose only row is on rank 0: rank 1 steps nothing but joins the collectives
            params, grads = shard_inputs()
            lone = torch.nn.Parameter(distribute_tensor(params[2], mesh, [Shard(0)]))
            opt = make_on(name, [lone], backend)
            for gs in grads:
                lone.grad = distribute_tensor(gs[2], mesh, [Shard(0)])
                opt.step()
            results[("sharded_lone", name, backend)] = lone.full_tensor().detach().clone()

    # Muon (whole matrices: Newton–Schulz of the full momentum): FSDP2 training, and sharded
    # DTensor steps, on every backend; each step gathers the full tensors (runtime._step_on_full_tensors)
    for backend in sharded_backends():
        model, xs, ys = model_and_data(world=world, bias=False)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, make_on("muon", model.parameters(), backend), xs, ys, rank, world)
        results[("fsdp2_muon", backend)] = [p.full_tensor().detach().clone() for p in model.parameters()]
        results[("fsdp2_muon_local_shape", backend)] = [tuple(p.to_local().shape) for p in model.parameters()]
        params, grads = matrix_shard_inputs()
        ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in params]
        opt = make_on("muon", ps, backend)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        results[("dtensor_muon", backend)] = [p.full_tensor().detach().clone() for p in ps]
        results[("dtensor_muon_state", backend)] = [
            (type(opt.state[p]["momentum_buffer"]).__name__, tuple(opt.state[p]["momentum_buffer"].to_local().shape))
            for p in ps]

    # 8-bit states of sharded params: blocks per local shard, a resumed step bit for bit
    import io
    for backend in ["eager", "foreach", "fused"]:
        params, grads = eightbit_inputs()
        ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in params]
        opt = make_8bit(ps, backend)
        for k, gs in enumerate(grads):
            if k == len(grads) - 1:  # the checkpoint before the last step, through weights_only
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                before = [p.detach().clone() for p in ps]
            for p, g in zip(ps, gs):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        results[("8bit", backend)] = [p.full_tensor().detach().clone() for p in ps]
        results[("8bit_state", backend)] = [
            {k: (type(v).__name__, v.dtype, tuple(v.shape), [str(pl) for pl in v.placements], tuple(v.to_local().shape))
             for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()} for p in ps]
        results[("8bit_dequantized", backend)] = opt.dequantized_state(ps[1], "exp_avg").full_tensor()
        from optcompile.runtime import kernel_codes
        results[("8bit_in_kernel", backend)] = sorted(kernel_codes(opt._info, opt.param_groups[0], ps[:2]))
        resumed = [torch.nn.Parameter(b) for b in before]
        opt2 = make_8bit(resumed, backend)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=True))
        for p, g in zip(resumed, grads[-1]):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt2.step()
        results[("8bit_resumed", backend)] = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(resumed, ps))

    from optcompile.sharding import ShardedReductions
    shards = ShardedReductions((3, 2, 1), (dist.group.WORLD,))
    nan = float("nan")
    xs = ([torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor([])] if rank == 0 else
          [torch.tensor([4.0]), torch.tensor([nan, 1.0]), torch.tensor([-5.0])])
    results["shard_ops"] = {op: torch.stack(getattr(shards, op)(xs)) for op in ("sum", "mean", "max")}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
