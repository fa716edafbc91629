"""The fused step's prebuilt tables (runtime's ``_FusedGroup``, fused_runtime's ``FusedTable``)
are never stepped stale: after a param's storage is swapped (``.data``, ``set_()``), a param is
resized, a grad is replaced, set to None or given another dtype, a state tensor is replaced,
moved (``set_()``) or removed, the group's params list changes or a state dict is loaded, the
next steps match a freshly constructed optimizer's (one that never had a table) bit for bit, or
raise what it raises. A stale pointer would write into the old memory (freed, or another
tensor's) and leave the new tensor as it was.

Every case runs with CPython's dict version tags telling that ``optimizer.state`` did not
change and with the state looked up and compared by identity (Python 3.12+), each with the data
pointers read in one C call (``PointerReader``) and in Python (no C++ compiler), and with the
C++ table checker (``TableChecker``: every layout, the grads and the pointers in one call)."""
import copy
import re
import warnings

import pytest
import torch

import optcompile
from optcompile import layouts, runtime
from optcompile.backends import fused_runtime
from optimizers import BACKENDS

pytestmark = [pytest.mark.fused, pytest.mark.skipif(BACKENDS["fused"].unavailable() is not None,
                                                     reason=str(BACKENDS["fused"].unavailable()))]
_POINTER_READER = fused_runtime.pointer_reader
N = 40  # ≥ layouts.MIN_TENSORS: the layout is recorded, so the table is built
SHAPES = [(8,), (3, 5)] * (N // 2)


@pytest.fixture(params=["dict-versions", "lookups"])
def state_check(request, monkeypatch):
    if request.param == "dict-versions" and layouts.DICT_VERSION is None:
        pytest.skip("no dict version tags on this Python")
    if request.param == "lookups":
        monkeypatch.setattr(runtime, "DICT_VERSION", None)
    return request.param


@pytest.fixture(autouse=True, params=["checker", "c-pointers", "python-pointers"])
def pointers(request, monkeypatch):
    if request.param == "checker" and fused_runtime.table_checker() is None:
        pytest.skip("no C++ table checker (no C++ compiler, or torch's headers are missing)")
    if request.param != "checker":  # torch's guards, the pointers read in one C call or in Python
        monkeypatch.setattr(fused_runtime, "table_checker", lambda: None)
    if request.param == "c-pointers" and fused_runtime.pointer_reader() is None:
        pytest.skip("no pointer reader (no C++ compiler, or torch lacks the accessor)")
    if request.param == "python-pointers":
        monkeypatch.setattr(fused_runtime, "pointer_reader", lambda: None)
    return request.param


def _grad(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _trained(steps=3, dtype=torch.float32, shapes=SHAPES, **kw):
    params = [_grad(s, 1000 + i, dtype).requires_grad_() for i, s in enumerate(shapes)]
    opt = optcompile.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=True, **kw)
    for k in range(steps):
        _set_grads(params, k)
        opt.step()
    assert _table(opt) is not None, "the table is built after two general steps"
    return opt, params


def _table(opt, group=0):
    slot = opt._fused_groups.get(id(opt.param_groups[group]))
    return None if slot is None else slot.table


def _set_grads(params, k, none=(), dtype=None):
    for i, p in enumerate(params):
        p.grad = None if i in none else _grad(p.shape, 100 * k + i, dtype or p.dtype)


def _fresh(opt, params):
    """A new optimizer (no table) over copies of ``params``, with copies of ``opt``'s groups'
    hyperparameters and step counts and of its states."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    fresh = optcompile.AdamW([{"params": [copies[index[id(p)]] for p in g["params"]]} for g in opt.param_groups],
                             lr=1e-2, fused=True)
    clone = lambda d: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items() if k != "params"}
    for mine, theirs in zip(fresh.param_groups, opt.param_groups):
        mine.update(clone(theirs))
    for p, c in zip(params, copies):
        if p in opt.state:
            fresh.state[c] = clone(opt.state[p])
    return fresh, copies


def _same(a, pa, b, pb):
    for i, (p, q) in enumerate(zip(pa, pb)):
        assert p.dtype == q.dtype and torch.equal(p.detach(), q.detach()), f"param {i}"
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sa.keys() == sb.keys(), f"state keys of param {i}"
        for name in sa:
            x, y = sa[name], sb[name]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"{name} of param {i}"
            elif name != "group":
                assert x == y, f"{name} of param {i}"


def _both(a, pa, b, pb, steps=4, start=10, **grads):
    """Step both optimizers with the same grads; compare after every step."""
    for k in range(start, start + steps):
        _set_grads(pa, k, **grads)
        _set_grads(pb, k, **grads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fused_runtime.FusedFallbackWarning)
            a.step()
            b.step()
        _same(a, pa, b, pb)


# ── params ───────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("how", ["data", "set_"])
def test_param_storage_swapped(state_check, how):
    """Same layout, other memory: only the data pointer tells; a stale one steps the old memory."""
    opt, params = _trained()
    for i in (0, 17, N - 1):
        new = _grad(params[i].shape, 7 + i)
        if how == "data":
            params[i].data = new
        else:
            with torch.no_grad():
                params[i].set_(new)
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)
    assert _table(opt) is not None, "the same layout keeps its table"


def test_param_swapped_with_swap_tensors(state_check):
    """``torch.utils.swap_tensors``: the same Python object, another TensorImpl and memory."""
    opt, params = _trained()
    with torch.no_grad():
        for i in (1, N - 3):
            torch.utils.swap_tensors(params[i], _grad(params[i].shape, 9 + i).requires_grad_())
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)
    assert _table(opt) is not None, "the same layout keeps its table"


@pytest.mark.parametrize("size", [(16,), (4,), (2, 4)], ids=["larger", "smaller", "reshaped"])
def test_param_resized_raises_and_writes_nothing(state_check, size):
    opt, params = _trained()
    params[4].data = torch.randn(size)
    _set_grads(params, 5)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=re.escape(f"AdamW: exp_avg has shape (8,) but its param has shape {size}")):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_param_narrowed_in_place_after_its_grad_raises(state_check):
    """``p.data`` set to a view of its own start after the grads: the same memory, fewer elements."""
    opt, params = _trained()
    _set_grads(params, 5)
    params[6].data = params[6].data[:4]
    with pytest.raises(RuntimeError, match=r"AdamW: grad has shape \(8,\) but its param has shape \(4,\)"):
        opt.step()


def test_param_dtype_changed(state_check):
    """A bf16 param among fp32 ones: two dtype groups, the bf16 one on the eager loop."""
    opt, params = _trained()
    params[3].data = params[3].data.bfloat16()
    for name in ("exp_avg", "exp_avg_sq"):
        opt.state[params[3]][name] = opt.state[params[3]][name].bfloat16()
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)


def test_group_params_list_changed(state_check):
    opt, params = _trained()
    new = _grad((6,), 5).requires_grad_()
    opt.param_groups[0]["params"][9] = new  # a param without state, in place of another
    params[9] = new
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)
    extra = _grad((5,), 6).requires_grad_()
    opt.param_groups[0]["params"].append(extra)
    fresh, copies = _fresh(opt, params + [extra])
    _both(opt, params + [extra], fresh, copies, start=20)


# ── grads ────────────────────────────────────────────────────────────────────────────────────
def test_grad_kept_and_updated_in_place(state_check):
    """The same grad tensors every step (accumulated in place): their new values are read."""
    opt, params = _trained()
    fresh, copies = _fresh(opt, params)
    for k in range(3):
        for p, q in zip(params, copies):
            g = _grad(p.shape, 50 + k)
            p.grad.copy_(g)
            q.grad = g.clone()
        opt.step()
        fresh.step()
        _same(opt, params, fresh, copies)


def test_grad_none_then_back(state_check):
    opt, params = _trained()
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies, steps=2, none=(0, 21))
    _both(opt, params, fresh, copies, steps=4, start=20)
    assert _table(opt) is not None, "rebuilt once every param has its grad again"


def test_grad_of_another_dtype(state_check):
    """An fp64 grad for an fp32 param does not fit the kernel: the general path takes it (and the
    eager loop refuses it); the optimizer with a table ends exactly where a fresh one does."""
    opt, params = _trained()
    fresh, copies = _fresh(opt, params)
    for p in (params[5], copies[5]):
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # torch ≥ 2.10 refuses a grad of another dtype unless asked
    for k in range(10, 13):
        outcomes = []
        for o, ps in ((opt, params), (fresh, copies)):
            _set_grads(ps, k)
            ps[5].grad = ps[5].grad.double()
            outcomes.append(_step_outcome(o))
        assert outcomes[0] == outcomes[1]
        _same(opt, params, fresh, copies)


def _step_outcome(opt) -> str | None:
    """A step's error message, None if it stepped (the fallback's warning silenced)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fused_runtime.FusedFallbackWarning)
            opt.step()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_grad_of_another_shape_raises(state_check):
    opt, params = _trained()
    _set_grads(params, 5)
    params[11].grad.set_(torch.randn(15, 1))  # the same grad object, another layout (torch refuses ``.grad =``)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"AdamW: grad has shape \(15, 1\) but its param has shape \(3, 5\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ── states ───────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("how", ["replaced", "set_", "data", "dict replaced", "swap_tensors", "storage moved"])
def test_state_tensor_changed(state_check, how):
    """Another tensor, or the same one over other memory: the new memory is stepped."""
    opt, params = _trained()
    for i in (2, N - 2):
        state = opt.state[params[i]]
        new = _grad(params[i].shape, 30 + i).abs()
        if how == "replaced":
            state["exp_avg_sq"] = new
        elif how == "set_":
            state["exp_avg_sq"].set_(new)
        elif how == "data":
            state["exp_avg_sq"].data = new
        elif how == "swap_tensors":
            torch.utils.swap_tensors(state["exp_avg_sq"], new)
        elif how == "storage moved":  # the storage reallocated: the same tensor, its data elsewhere
            before = state["exp_avg_sq"].data_ptr()
            state["exp_avg_sq"].untyped_storage().resize_(1 << 20)
            assert state["exp_avg_sq"].data_ptr() != before
        else:
            opt.state[params[i]] = {**state, "exp_avg_sq": new}
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)


@pytest.mark.parametrize("how", ["resize_", "as_strided_", "data view"])
def test_state_reshaped_in_place_raises(state_check, how):
    """The same tensor and memory, fewer elements: the kernel would step past its end."""
    opt, params = _trained()
    exp_avg = opt.state[params[0]]["exp_avg"]
    if how == "resize_":
        exp_avg.resize_(4)
    elif how == "as_strided_":
        exp_avg.as_strided_((4,), (1,))
    else:
        exp_avg.data = exp_avg.data[:4]
    _set_grads(params, 5)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg has shape \(4,\) but its param has shape \(8,\)"):
        opt.step()


def test_state_dtype_changed(state_check):
    """A state reinterpreted as another dtype (same memory, ``.data =``): not stepped as fp32."""
    opt, params = _trained()
    fresh, copies = _fresh(opt, params)
    outcomes = []
    for o, ps in ((opt, params), (fresh, copies)):
        state = o.state[ps[7]]
        state["exp_avg"].data = state["exp_avg"].data.view(torch.int32)
        _set_grads(ps, 5)
        outcomes.append(_step_outcome(o))
    assert outcomes[0] == outcomes[1]
    _same(opt, params, fresh, copies)


def test_state_removed(state_check):
    """A param without state starts again from zero moments, as in a fresh optimizer."""
    opt, params = _trained()
    del opt.state[params[6]]
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)


def test_state_smaller_than_its_param_raises(state_check):
    opt, params = _trained()
    storage = torch.zeros(12)
    opt.state[params[0]]["exp_avg"] = storage[:4]
    _set_grads(params, 5)
    with pytest.raises(RuntimeError, match=r"AdamW: exp_avg has shape \(4,\) but its param has shape \(8,\)"):
        opt.step()
    assert torch.equal(storage, torch.zeros(12)), "nothing written behind the short state"


def test_kahan_comp_replaced(state_check):
    """bf16: the Kahan compensation is a buffer of the table too."""
    opt, params = _trained(dtype=torch.bfloat16)
    opt.state[params[1]]["kahan_comp"] = _grad(params[1].shape, 3, torch.bfloat16) * 1e-3
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)


def test_load_state_dict(state_check):
    opt, params = _trained()
    other, _ = _trained(steps=5)
    opt.load_state_dict(copy.deepcopy(other.state_dict()))
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies)
    assert _table(opt) is not None


# ── hyperparameters and the optimizer object ─────────────────────────────────────────────────
def test_hyperparameters_and_backend_are_read_every_step(state_check):
    opt, params = _trained()
    opt.param_groups[0]["lr"] = 3e-2
    opt.param_groups[0]["weight_decay"] = 0.0
    fresh, copies = _fresh(opt, params)
    _both(opt, params, fresh, copies, steps=2)
    calls = []
    eager = opt._info.backend("eager")
    opt._info.backends["eager"] = lambda *a, **k: calls.append(1) or eager(*a, **k)
    try:
        opt.param_groups[0]["fused"] = False
        fresh.param_groups[0]["fused"] = False
        _both(opt, params, fresh, copies, steps=1, start=30)
    finally:
        opt._info.backends["eager"] = eager
    assert calls, "fused=False after the table was built: the eager loop runs"


def test_deepcopy_and_pickle_of_an_optimizer_with_tables(state_check):
    import pickle
    opt, params = _trained()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._fused_groups == {}
        assert torch.equal(clone.state_dict()["state"][0]["exp_avg"], opt.state[params[0]]["exp_avg"])


# ── the table is used, and not rebuilt over and over ─────────────────────────────────────────
def test_training_loop_steps_from_the_table(monkeypatch, pointers):
    """After two general steps (the second records the layout) the table steps: no general
    path, no per-tensor pointer pass; results as a fresh optimizer's."""
    opt, params = _trained()
    assert (_table(opt).reader is not None) == (pointers == "c-pointers")
    assert (_table(opt).checked is not None) == (pointers == "checker")
    fresh, copies = _fresh(opt, params)
    general = []
    call = fused_runtime.FusedStep.__call__
    monkeypatch.setattr(fused_runtime.FusedStep, "__call__", lambda *a, **k: general.append(1) or call(*a, **k))
    for k in range(10, 15):
        _set_grads(params, k)
        opt.step()
    assert general == []
    # layouts are remembered by the first param's id: one of a dead optimizer's, at the address a
    # copy now has, would count as seen before (sound, as every hit compares the whole layout)
    fused_runtime._FITS.clear()
    runtime._CHECKED.clear()
    for k in range(10, 15):
        _set_grads(copies, k)
        fresh.step()
    assert len(general) == 2, "a fresh optimizer: two general steps, then its own table"
    _same(opt, params, fresh, copies)


def test_a_table_that_keeps_failing_is_built_ever_less_often(monkeypatch):
    built = []
    init = fused_runtime.FusedTable.__init__
    monkeypatch.setattr(fused_runtime.FusedTable, "__init__", lambda self, *a: built.append(1) or init(self, *a))
    opt, params = _trained()
    assert len(built) == 1
    for k in range(60):  # a grad missing every other step: the table fails each time it is used
        _set_grads(params, k, none=(3,) if k % 2 else ())
        opt.step()
    assert len(built) <= 8, f"{len(built)} tables built in 60 steps"


def test_a_layout_that_does_not_fit_is_looked_up_ever_less_often(monkeypatch):
    """One strided param: the kernel takes the others (``_mixed``), no table fits; the lookup
    that finds so backs off too."""
    tries = []
    table = fused_runtime.FusedStep.table
    monkeypatch.setattr(fused_runtime.FusedStep, "table", lambda *a: tries.append(1) or table(*a))
    params = [_grad(s, i).requires_grad_() for i, s in enumerate(SHAPES)]
    params[0] = torch.randn(8, 2)[:, 0].requires_grad_()  # not contiguous
    opt = optcompile.AdamW(params, lr=1e-2, fused=True)
    for k in range(60):
        _set_grads(params, k)
        opt.step()
    assert _table(opt) is None and len(tries) <= 10, len(tries)


def test_scratch_buffers_of_a_reduction_spec(tmp_path, state_check):
    """A spec whose kernel spills to fp32 scratch (one flat buffer per step in the table path,
    one tensor each in the general path): the same results as a fresh optimizer's step."""
    from test_fused import REDUCE_SPEC
    from optcompile.loader import compile_spec
    path = tmp_path / "rmsclipped.py"
    path.write_text(REDUCE_SPEC)
    cls = compile_spec(path)
    params = [_grad(s, i).requires_grad_() for i, s in enumerate(SHAPES)]
    opt = cls(params, lr=1e-2, fused=True)
    assert opt._info.backend("fused").iface["spills"] > 0
    for k in range(6):
        _set_grads(params, k)
        copies = [p.detach().clone().requires_grad_() for p in params]
        fresh = cls(copies, lr=1e-2, fused=True)
        for p, c in zip(params, copies):
            if p in opt.state:
                fresh.state[c] = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in opt.state[p].items()}
            c.grad = p.grad.clone()
        fresh.param_groups[0]["step"] = opt.param_groups[0].get("step", torch.tensor(0, dtype=torch.int32)).clone()
        fresh.param_groups[0]["setup"] = opt.param_groups[0].get("setup", False)
        opt.step()
        fresh.step()
        _same(opt, params, fresh, copies)
    assert _table(opt) is not None


def test_functional_api_and_small_groups_take_the_general_path():
    """Below MIN_TENSORS no layout is recorded (the Python checks are cheaper) and no table is
    built; the functional API never builds one."""
    opt, params = (None, [torch.randn(8, requires_grad=True) for _ in range(3)])
    opt = optcompile.AdamW(params, lr=1e-2, fused=True)
    for k in range(4):
        _set_grads(params, k)
        opt.step()
    assert _table(opt) is None
    step = torch.tensor(0, dtype=torch.int32)
    ps = [torch.randn(8) for _ in range(N)]
    states = [[torch.zeros(8) for _ in ps] for _ in range(2)]
    for k in range(4):
        optcompile.adamw(ps, [_grad((8,), k) for _ in ps], *states, None, lr=1e-3, beta1=0.9, beta2=0.99,
                         weight_decay=0.0, eps=1e-6, step=step, fused=True)
    assert int(step) == 4


# ── the pointer reader ───────────────────────────────────────────────────────────────────────
def test_pointer_reader_reads_data_pointers_and_refuses_what_is_not_a_tensor():
    import array
    reader = fused_runtime.pointer_reader()
    if reader is None:
        pytest.skip("no pointer reader (no C++ compiler, or torch lacks the accessor)")
    ts = [torch.zeros(5), torch.arange(12.0).view(3, 4)[1:], torch.nn.Parameter(torch.ones(2)),
          torch.zeros(3, dtype=torch.float16)]
    out = array.array("q", [7] * (len(ts) + 1))
    assert reader.read(array.array("q", [id(t) for t in ts] + [0]), out)
    assert list(out) == [t.data_ptr() for t in ts] + [0], "0 stands for an absent tensor: NULL"
    table = array.array("q", [7] * (len(ts) + 2))
    assert reader.read_tuple(tuple(ts), table, 2)  # the tuple's own item pointers, no ids built
    assert list(table) == [7, 7] + [t.data_ptr() for t in ts]
    with pytest.raises(IndexError):
        reader.read_tuple(tuple(ts), table, 3)
    for other in (None, 3.0, [torch.zeros(2)]):  # torch throws: caught in C++, returned as False
        assert not reader.read(array.array("q", [id(ts[0]), id(other)]), array.array("q", [0, 0]))



def test_table_checker_records_layouts_and_reads_pointers():
    """The C++ checker on its own: pointers as ``data_ptr()``; a param or state whose layout
    changed (1) or a grad that is missing or of other strides (2) refuse the table; a storage
    swapped under the same layout, and a TensorImpl swapped into the same object, are read afresh."""
    import array
    checker = fused_runtime.table_checker()
    if checker is None:
        pytest.skip("no C++ table checker (no C++ compiler, or torch's headers are missing)")
    assert checker.works()
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in ps:
        p.grad = torch.randn(p.shape)
    states = [torch.zeros(4, 3), torch.zeros(5)]
    table = checker.new(ps, ps + states, [0, 1, 4, 5])
    out = array.array("q", bytes(8 * 6))
    want = lambda: [t.data_ptr() for t in ps] + [p.grad.data_ptr() for p in ps] + [s.data_ptr() for s in states]
    assert table.check(out) == 0 and list(out) == want()
    table.release()
    ps[1].data = torch.randn(5)  # another storage, the same layout
    ps[0].grad = torch.randn(4, 3)
    assert table.check(out) == 0 and list(out) == want()
    table.release()
    with torch.no_grad():  # another TensorImpl in the same Python object
        torch.utils.swap_tensors(ps[1], torch.nn.Parameter(torch.randn(5)))
    ps[1].grad = torch.randn(5)
    assert table.check(out) == 0 and list(out) == want()
    table.release()
    for change, code in ((lambda: setattr(ps[1], "grad", None), 2),
                         (lambda: setattr(ps[0], "grad", torch.randn(3, 4).t()), 2),
                         (lambda: states[1].resize_(6), 1),
                         (lambda: setattr(ps[0], "data", torch.randn(12)), 1),
                         (lambda: setattr(ps[1], "data", torch.randn(5, dtype=torch.float64)), 1)):
        before = [p.grad for p in ps], [p.data for p in ps]
        change()
        assert table.check(out) == code
        table.release()
        states[1].resize_(5)
        for p, g, d in zip(ps, *before):
            p.data = d
            p.grad = g
        assert table.check(out) == 0, "back to the recorded layouts"
        table.release()
    checker.new(ps, ps, [0, 1])  # freed when collected


def test_without_a_cxx_compiler_or_torchs_accessor_there_is_no_reader(monkeypatch):
    """Then tables read their pointers in Python (every test here runs so too: python-pointers)."""
    import torch._C._dynamo.guards as guards
    build = _POINTER_READER.__wrapped__  # uncached: decides afresh
    with monkeypatch.context() as m:
        m.setattr(fused_runtime, "cxx_compiler", lambda: None)
        assert build() is None
    with monkeypatch.context() as m:
        m.delattr(guards, "_torchinductor_pyobject_tensor_data_ptr")
        assert build() is None
