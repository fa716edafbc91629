"""Buffers that do not fit their param never reach a kernel, on any backend: a grad or state of
another shape (smaller, larger, or the same numel reshaped) raises one clear RuntimeError naming
the optimizer, the buffer and both shapes, before anything is written (params, states and the
step counter stay as they were). Before this, the fused C kernel wrote past a smaller state into
whatever lay behind it, aborted the process (``free(): invalid next size``) after a param was
resized, and read past a short grad in the functional API.

Also: the layout record (optcompile/layouts.py) that lets a training loop skip these checks
misses on every change, and hyperparameters given as 1-element tensors behave the same on every
backend."""
import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import importlib.util  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import optcompile  # noqa: E402
from optcompile import backends_available, layouts  # noqa: E402
from optimizers import BACKENDS as REGISTRY, BY_NAME  # noqa: E402

BACKENDS = {name: REGISTRY[name].flags for name in ("fused", "eager", "foreach", "triton")}


def _backend(name):
    if name == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if name == "fused" and backends_available.c_compiler() is None:
        pytest.skip("no C compiler")
    return BACKENDS[name]


def _trained(backend, shapes, cls=optcompile.AdamW, steps=3, dtype=torch.float32, **kw):
    """Steps enough that a layout of ≥ MIN_TENSORS tensors is recorded and then used once."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype).requires_grad_()
              for i, s in enumerate(shapes)]
    opt = cls(params, lr=1e-2, **kw, **backend)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], str(opt.state_dict())


def _unchanged(opt, params, snap):
    before, sd = snap
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a param changed in the failed step"
    assert str(opt.state_dict()) == sd, "the state (or the step count) changed in the failed step"


# ── the cases ────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("n", [1, 40], ids=["one-param", "40-params"])  # 40: the layout-record path
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_smaller_than_its_param_raises(backend, n):
    """``opt.state[p]["exp_avg"] = t[:4]``: the fused kernel wrote 8 elements into it, the tail
    over an unrelated tensor. Now every backend raises, and the neighbour is untouched."""
    opt, params = _trained(_backend(backend), [(8,)] * n)
    p = params[-1]
    storage = torch.zeros(12)
    victim = storage[4:]  # the memory right behind the short state
    opt.state[p]["exp_avg"] = storage[:4]
    for q in params:
        q.grad = torch.randn_like(q)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg has shape \(4,\) but its param has shape \(8,\)"):
        opt.step()
    assert torch.equal(victim, torch.zeros(8))
    _unchanged(opt, params, snap)


@pytest.mark.parametrize("n", [1, 40], ids=["one-param", "40-params"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_resized_between_steps_raises(backend, n):
    """``p.data = torch.randn(8)`` after steps at size 4 aborted the process on fused."""
    opt, params = _trained(_backend(backend), [(4,)] * n)
    params[0].data = torch.randn(8)
    for q in params:
        q.grad = torch.randn_like(q)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg has shape \(4,\) but its param has shape \(8,\)"):
        opt.step()
    _unchanged(opt, params, snap)


@pytest.mark.parametrize("n", [1, 40], ids=["one-param", "40-params"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_param_reshaped_with_same_numel_raises(backend, n):
    """Same numel, another shape: eager's in-place ops raise, and so does every other backend
    (fused stepped it silently). Also after the layout of the earlier steps was recorded."""
    opt, params = _trained(_backend(backend), [(2, 4)] * n)
    params[-1].data = params[-1].data.view(4, 2)  # the same memory: only the metadata changes
    for q in params:
        q.grad = torch.randn_like(q)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg has shape \(2, 4\) but its param has shape \(4, 2\)"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_short_grad_raises(backend):
    """``adamw(..., fused=True)`` with an 8-element grad for a 64-element param read past it."""
    kw = _backend(backend)
    step = torch.tensor(0, dtype=torch.int32)
    param = torch.randn(64)
    before = param.clone()
    with pytest.raises(RuntimeError, match=r"AdamW: grad has shape \(8,\) but its param has shape \(64,\)"):
        optcompile.adamw([param], [torch.randn(8)], [torch.zeros(64)], [torch.zeros(64)], None, lr=1e-3, beta1=0.9,
                         beta2=0.99, weight_decay=0.0, eps=1e-6, step=step, **kw)
    assert torch.equal(param, before) and int(step) == 0, "nothing moves in a step that raises"


@pytest.mark.parametrize("backend", ["fused", "eager", "foreach"])
def test_grad_that_would_broadcast_raises(backend):
    """A 1-element grad broadcasts in eager's in-place ops (a silent, wrong step): rejected too."""
    kw = _backend(backend)
    step = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"AdamW: grad has shape \(1,\) but its param has shape \(8,\)"):
        optcompile.adamw([torch.randn(8)], [torch.randn(1)], [torch.zeros(8)], [torch.zeros(8)], None, lr=1e-3,
                         beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, step=step, **kw)


@pytest.mark.parametrize("backend", ["fused", "eager"])
def test_kahan_comp_of_another_shape_raises(backend):
    opt, params = _trained(_backend(backend), [(16,)], dtype=torch.bfloat16)  # bf16: Kahan compensation
    assert opt.state[params[0]]["kahan_comp"].shape == (16,)
    opt.state[params[0]]["kahan_comp"] = torch.zeros(15, dtype=torch.bfloat16)
    params[0].grad = torch.randn_like(params[0])
    with pytest.raises(RuntimeError, match=r"AdamW: kahan_comp has shape \(15,\) but its param has shape \(16,\)"):
        opt.step()


def test_functional_lists_of_other_lengths_raise():
    """A grads list shorter than params would have shifted the fused kernel's pointer table."""
    step = torch.tensor(0, dtype=torch.int32)
    ps = [torch.randn(4), torch.randn(4)]
    with pytest.raises(ValueError, match="adamw: 2 params but 1 grads"):
        optcompile.adamw(ps, [torch.randn(4)], [torch.zeros(4)] * 2, [torch.zeros(4)] * 2, None, lr=1e-3,
                         beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, step=step, fused=True)
    with pytest.raises(ValueError, match="adamw: 2 params but 3 exp_avg_sqs"):
        optcompile.adamw(ps, [torch.randn(4)] * 2, [torch.zeros(4)] * 2, [torch.zeros(4)] * 3, None, lr=1e-3,
                         beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, step=step)
    assert int(step) == 0


def test_gradient_release_step_checks_too():
    """The per-param step from a hook goes through the same check."""
    model = torch.nn.Linear(4, 3)
    opt = optcompile.AdamW(model.parameters(), lr=1e-2, gradient_release=True, fused=True)
    optcompile.prepare_for_gradient_release(model, opt)
    model(torch.randn(2, 4)).sum().backward()
    opt.state[model.weight]["exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg_sq has shape \(3,\) but its param has shape \(3, 4\)"):
        model(torch.randn(2, 4)).sum().backward()
    optcompile.remove_gradient_release(model)


def test_mixed_device_groups_are_checked_before_any_is_stepped():
    """Two (dtype) groups in one step: the bad one is found before the good one moves."""
    opt, params = _trained(_backend("fused"), [(8,), (8,)])
    params[0].data = params[0].data.double()
    opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].double()
    opt.state[params[0]]["exp_avg_sq"] = opt.state[params[0]]["exp_avg_sq"].double()
    for q in params:
        q.grad = torch.randn_like(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused kernel's fp64 fallback warning
        opt.step()  # two groups (fp64 → eager, fp32 → fused): fine
    opt.state[params[1]]["exp_avg"] = torch.zeros(3)
    for q in params:
        q.grad = torch.randn_like(q)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="exp_avg has shape"):
        opt.step()
    _unchanged(opt, params, snap)


# ── the layout record ────────────────────────────────────────────────────────────────────────
def test_layout_record_is_available_on_this_torch():
    """Without it every step runs the Python checks (correct, ~10% slower at 2,000 tensors)."""
    assert layouts.AVAILABLE


def test_layout_record_misses_on_every_change():
    cache = layouts.LayoutCache()
    params = [torch.randn(4, 3) for _ in range(layouts.MIN_TENSORS)]
    states = [torch.zeros(4, 3) for _ in params]
    absent = [None] * len(params)
    lists = [params, states, absent]
    assert cache.get(lists) is layouts.MISSING
    cache.put(lists, "checked")
    assert cache.get(lists) is layouts.MISSING, "recorded the second time only"
    cache.put(lists, "checked")
    assert cache.get(lists) == "checked"
    assert cache.get([params, [torch.ones(4, 3) for _ in params], absent]) == "checked", "other tensors, same layout"
    for change in (torch.zeros(12), torch.zeros(3, 4), torch.zeros(4, 3, dtype=torch.float64),
                   torch.zeros(3, 4).t(), torch.zeros(4, 6)[:, :3], torch.zeros(4, 3, device="meta")):
        assert cache.get([params, states[:-1] + [change], absent]) is layouts.MISSING, change
    assert cache.get([params, states, [torch.zeros(4, 3)] + absent[1:]]) is layouts.MISSING
    assert cache.get([params, states]) is layouts.MISSING, "another number of buffers"
    params[0].data = params[0].data.view(3, 4)  # .data keeps the object and the pointer
    assert cache.get(lists) is layouts.MISSING
    few = [[torch.zeros(2)] * 3, [torch.zeros(2)] * 3]
    for _ in range(2):
        cache.put(few, "x")
    assert cache.get(few) is layouts.MISSING, "below MIN_TENSORS nothing is recorded"
    some_none = [params, [None] + states[1:], absent]
    for _ in range(2):
        cache.put(some_none, "x")
    assert cache.get(some_none) is layouts.MISSING, "lists with some None: never"


def test_fused_skips_its_checks_only_for_a_recorded_layout(monkeypatch):
    """The first two steps run the Python checks (the second records the layout); later steps
    compare layouts in C++; a state replaced by a smaller tensor runs them again, and raises."""
    from optcompile import runtime
    from optcompile.backends import fused_runtime
    # layouts recorded by earlier tests' tensors at the same addresses would count as this one's
    fused_runtime._FITS.clear()
    runtime._CHECKED.clear()
    calls = []
    checks = fused_runtime.FusedStep._pointers
    monkeypatch.setattr(fused_runtime.FusedStep, "_pointers", staticmethod(lambda *a: calls.append(1) or checks(*a)))
    opt, params = _trained(_backend("fused"), [(8,), (3, 5)] * 20, steps=5)
    assert len(calls) == 2, "checked in Python at steps 1 and 2 (recorded), then by layout"
    opt.state[params[7]]["exp_avg_sq"] = torch.zeros(14)
    for q in params:
        q.grad = torch.randn_like(q)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq has shape \(14,\) but its param has shape \(3, 5\)"):
        opt.step()
    assert len(calls) == 3


# ── hyperparameters as tensors ───────────────────────────────────────────────────────────────
@pytest.mark.parametrize("lr", [torch.tensor(1e-2), torch.tensor([1e-2])], ids=["0-dim", "1-element"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_is_the_same_everywhere(backend, lr):
    """``lr=torch.tensor([1e-3])`` raised TypeError on eager, RuntimeError on foreach and ran on
    fused: now every backend steps exactly as with the tensor's value as a Python float."""
    kw = _backend(backend)
    a = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_()
         for i, s in enumerate([(8,), (3, 5)])]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = optcompile.AdamW(a, lr=lr.clone(), **kw)
    opt_b = optcompile.AdamW(b, lr=lr.item(), **kw)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_tensor_lr_with_several_elements_is_rejected():
    step = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"adamw: lr must be a number or a 1-element tensor, not a tensor of shape "
                                         r"\(2,\)"):
        optcompile.adamw([torch.randn(4)], [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], None,
                         lr=torch.tensor([1e-3, 1e-3]), beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, step=step)


def test_tensor_lr_scheduled_in_place_does_not_move_max_lr():
    """With ``decouple_lr``, max_lr defaults to lr: as a copy of the number, not the tensor that a
    scheduler then fills in place (which made lr/max_lr = 1, i.e. no schedule for the decay)."""
    p = torch.randn(4, requires_grad=True)
    opt = optcompile.AdamW([p], lr=torch.tensor(1e-2), decouple_lr=True, weight_decay=1e-4)
    group = opt.param_groups[0]
    assert group["max_lr"] == pytest.approx(1e-2) and not isinstance(group["max_lr"], torch.Tensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5)
    assert group["max_lr"] == pytest.approx(1e-2) and float(group["lr"]) == pytest.approx(5e-3)
    del sched


# ── decouple_lr needs a positive max_lr ──────────────────────────────────────────────────────
@pytest.mark.parametrize("name", [n for n in optcompile.OPTIMIZERS  # the weight-decay pass's (not Rprop, Muon, Schedule-Free)
                                  if "decouple_lr" in inspect.signature(getattr(optcompile, n)).parameters])
def test_decouple_lr_with_max_lr_zero_is_rejected_at_construction(name):
    """It was accepted and failed at step() with a bare ZeroDivisionError."""
    cls = getattr(optcompile, name)
    p = [torch.randn(4, 3, requires_grad=True)]  # (a matrix: Muon takes no other rank)
    with pytest.raises(ValueError, match=r"Invalid maximum learning rate: max_lr=0\b.*must be positive"):
        cls(p, lr=1e-3, decouple_lr=True, max_lr=0, weight_decay=1e-4)
    with pytest.raises(ValueError, match=r"max_lr=0.0\b.*defaults to lr"):
        cls(p, lr=0.0, decouple_lr=True, weight_decay=1e-4)
    with pytest.raises(ValueError, match=r"max_lr=0\b"):
        cls([{"params": p, "max_lr": 0}], lr=1e-3, decouple_lr=True, weight_decay=1e-4)
    with pytest.raises(ValueError, match=r"Invalid maximum learning rate: max_lr=-1\b"):
        cls([{"params": p, "max_lr": -1}], lr=1e-3)
    with pytest.raises(ValueError, match=r"Invalid learning rate: lr=-1\b"):
        cls([{"params": p, "lr": -1}], lr=1e-3)
    cls(p, lr=1e-3, decouple_lr=False, max_lr=0)  # max_lr is not read without decouple_lr


def test_decouple_lr_with_max_lr_zero_is_rejected_at_step():
    """A group changed after construction, and the functional form: ValueError, not ZeroDivisionError."""
    p = torch.randn(4, requires_grad=True)
    opt = optcompile.AdamW([p], lr=1e-3, decouple_lr=True, weight_decay=1e-4)
    opt.param_groups[0]["max_lr"] = 0
    p.grad = torch.randn(4)
    with pytest.raises(ValueError, match="max_lr=0"):
        opt.step()
    with pytest.raises(ValueError, match="max_lr=0"):
        optcompile.adamw([torch.randn(4)], [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], None, lr=1e-3,
                         beta1=0.9, beta2=0.99, weight_decay=1e-4, eps=1e-6, step=torch.tensor(0, dtype=torch.int32),
                         decouple_lr=True, max_lr=0.0)


# ── states that are not there, not tensors, or elsewhere (a hostile review of the above) ───────
def _run_isolated(code: str):
    """A Triton kernel that dereferences a NULL state kills the process (SIGSEGV in the
    interpreter, an illegal address on a GPU): such cases run in a child process."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["momentum", "kahan_sum"])
def test_state_allocation_changed_after_the_first_step_raises(backend, change):
    """SGD stepped without momentum has no momentum buffer (a bf16 AdamW with kahan_sum=False no
    kahan_comp); turning it on afterwards made the Triton kernel read through a NULL pointer
    (segfault) and eager fail with ``'NoneType' object has no attribute 'mul_'``. Now one
    RuntimeError on every backend, before anything is written."""
    flags = dict(_backend(backend))
    code = f"""
import torch, warnings, optcompile
warnings.simplefilter("ignore")
if {change!r} == "momentum":
    params = [torch.randn(8, requires_grad=True) for _ in range(2)]
    opt = optcompile.SGD(params, lr=0.1, momentum=0, **{flags!r})
else:
    params = [torch.randn(8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt = optcompile.AdamW(params, lr=0.1, kahan_sum=False, **{flags!r})
for p in params:
    p.grad = torch.randn_like(p)
opt.step()
opt.param_groups[0][{change!r}] = 0.9 if {change!r} == "momentum" else True
before = [p.detach().clone() for p in params]
try:
    opt.step()
except RuntimeError as exc:
    print("RAISED", exc)
assert all(torch.equal(p, b) for p, b in zip(params, before))
"""
    proc = _run_isolated(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAISED" in proc.stdout and "is None" in proc.stdout, proc.stdout


@pytest.mark.parametrize("n", [1, 40], ids=["one-param", "40-params"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", ["none", "float", "meta"])
def test_state_replaced_by_none_a_number_or_a_meta_tensor_raises(backend, n, value):
    """``opt.state[p]["exp_avg"] = None`` segfaulted the Triton kernel; a Python float gave
    ``AttributeError: 'float' object has no attribute 'shape'``; a meta tensor stepped the params
    before it and then failed in torch. Now one RuntimeError naming the state, nothing written."""
    opt, params = _trained(_backend(backend), [(8,)] * n)
    opt.state[params[-1]]["exp_avg"] = {"none": None, "float": 0.0, "meta": torch.zeros(8, device="meta")}[value]
    for q in params:
        q.grad = torch.randn_like(q)
    snap = _snapshot(opt, params)
    expected = {"none": r"AdamW: exp_avg is None for a param of shape \(8,\), but the step reads it",
                "float": r"AdamW: exp_avg of a param of shape \(8,\) is a float \(0.0\), not a tensor",
                "meta": r"AdamW: exp_avg of a param of shape \(8,\) is on meta but its param is on cpu"}[value]
    if value == "none" and backend == "fused":  # the C kernel's own check of the pointers it reads
        expected = r"AdamW: a state this step needs is None"
    with pytest.raises(RuntimeError, match=expected):
        opt.step()
    _unchanged(opt, params, snap)


def test_functional_none_state_raises_before_the_triton_kernel():
    """The functional API with a None ``exp_avg`` under triton=True: a NULL dereference before."""
    _backend("triton")
    proc = _run_isolated("""
import torch, optcompile
step = torch.tensor(0, dtype=torch.int32)
try:
    optcompile.adamw([torch.randn(4), torch.randn(4)], [torch.randn(4), torch.randn(4)], [torch.zeros(4), None],
                     [torch.zeros(4), torch.zeros(4)], None, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                     eps=1e-6, step=step, triton=True)
except RuntimeError as exc:
    print("RAISED", exc)
assert int(step) == 0
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAISED adamw" not in proc.stdout and "exp_avg is None" in proc.stdout, proc.stdout


def test_triton_functional_grads_of_two_dtypes_do_not_reach_the_kernel():
    """The kernel reads every grad as the first one's dtype: a bf16 grad after an fp32 one was
    read as fp32 (twice its bytes). Now the group leaves the kernel for the for-loop backend,
    which refuses the bf16 grad as torch does."""
    _backend("triton")
    grads = [torch.randn(16), torch.randn(16).bfloat16()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="BFloat16"):
            optcompile.adamw([torch.randn(16), torch.randn(16)], grads, [torch.zeros(16), torch.zeros(16)],
                             [torch.zeros(16), torch.zeros(16)], None, step=torch.tensor(0, dtype=torch.int32),
                             lr=1e-1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-6, triton=True)
    assert any("the gradients mix torch.float32 and torch.bfloat16" in str(w.message) for w in caught)


def test_triton_pointer_table_hit_still_checks_what_lies_at_the_addresses():
    """The Triton pointer tables are cached by data_ptr: a state replaced by a tensor of another
    dtype at the same address (a freed one reused) hit the cache and skipped the dtype check, so the
    kernel wrote fp32 values into a bf16 buffer of half the bytes. (A state list's dtype is its
    own since state_precision: the second param's state is replaced, so the list mixes dtypes.)"""
    _backend("triton")
    from optcompile.backends import triton_runtime
    opt, params = _trained(_backend("triton"), [(8,), (8,)], steps=1)
    state = opt.state[params[1]]
    storage = torch.zeros(8)  # exp_avg's bytes, then the same address seen as bf16
    state["exp_avg"] = storage
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # records the pointer table for this address
    storage.zero_()
    state["exp_avg"] = storage.view(torch.bfloat16)[:8]  # fp32 elements 0-3
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt.step()
        except RuntimeError:
            pass  # the for-loop backend refusing the mixed dtypes is fine too
    assert triton_runtime._POINTERS  # the table was cached: the check ran on a hit
    assert any("Triton kernels skipped" in str(w.message) for w in caught)
    assert torch.equal(storage[4:], torch.zeros(4)), "the kernel wrote past the bf16 state's bytes"


@pytest.mark.parametrize("where", ["constructor", "param group"])
def test_tensor_lr_with_several_elements_is_rejected_at_construction(where):
    """The generated range check ``0.0 <= lr`` failed with torch's "Boolean value of Tensor with
    more than one value is ambiguous"; now a ValueError naming the optimizer and the shape."""
    params = [torch.randn(4, requires_grad=True)]
    lr = torch.tensor([1e-3, 1e-3])
    arg = params if where == "constructor" else [{"params": params, "lr": lr}]
    with pytest.raises(ValueError, match=r"AdamW: lr must be a number or a 1-element tensor, not a tensor of shape "
                                         r"\(2,\)"):
        optcompile.AdamW(arg, lr=lr if where == "constructor" else 1e-3)


def test_run_passes_rejects_an_unknown_pass_name():
    """``run_passes(until="bogus")`` ran every pass and returned the final IR as if it were bogus's."""
    from optcompile.passes import PASS_NAMES, run_passes
    with pytest.raises(ValueError, match=r"until='bogus' is not a pass; the passes are " + ", ".join(PASS_NAMES)):
        run_passes(None, until="bogus")
