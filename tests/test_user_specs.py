"""Algorithms a user might write from the README alone (LAMB's per-tensor trust ratio, RMSprop's
optional states, Signum's clipping functions, a periodic `every`/`set_param` anchor, a stateless
step, Adamax's elementwise Max with a max-reduction clip and a param-dependent init, ClipSGD's
tensor Piecewise against a hyperparameter and a flag, AdaGrad's hyperparameter-initialised
state, Nesterov's guarded read of a `when=` state, CyclicSGD's scalar state, ChoiceSGD's string
choice, RowNormMomentum's batched matrix function): every backend must compile them and agree
with the eager backend, in fp32 and bf16."""
import os
import warnings
from pathlib import Path

import pytest
import torch

import optcompile
from optimizers import BACKENDS, EAGER, backend_params

SPECS = sorted((Path(__file__).parent / "user_specs").glob("*.py"))
OTHERS = ("foreach", "fused", "triton")  # compared with eager
OPTIONS = {"lamb": {}, "rmsprop": {"centered": True, "momentum": 0.9, "weight_decay": 0.1}, "signum": {},
           "nadam": {"k": 2}, "plain": {}, "adamax": {"weight_decay": 0.1, "init_scale": 0.5},
           "clipsgd": {"clip": 0.3, "weight_decay": 0.01, "sign_only": True},
           "adagrad": {"initial_accumulator_value": 0.5, "clip_updates": False, "weight_decay": 0.01},
           "nesterov": {"momentum": 0.9, "dampening": 0.1},
           "rmsnormsgd": {"momentum": 0.8, "weight_decay": 0.1},
           "clampsgd": {"clip": 0.3, "max_ratio": 1.5, "weight_decay": 0.1},
           "warmupavgsgd": {"warmup": 4, "weight_decay": 0.1},
           "rownormsgd": {"beta": 0.8, "weight_decay": 0.1}, "cyclicsgd": {"period": 3},
           "choicesgd": {"rule": "clip", "weight_decay": 0.1}, "rownormmomentum": {"weight_decay": 0.1}}


def _run(cls, kw, dtype, backend):
    torch.manual_seed(0)
    shapes = [(3,), (1025,), (0,), (7, 9)]
    ndims = cls._info.extra.get("param_ndims")  # spec.param_ndim: the ranks the class takes
    if ndims:
        shapes = [s for s in shapes + [(7, 9), (9, 7), (4, 4)] if len(s) in ndims]
    params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    opt = cls(params, lr=1e-2, **kw, **backend)
    for _ in range(6):
        for p in params:
            p.grad = (0.5 * torch.randn(p.shape)).to(dtype)
        opt.step()
    return [p.detach().float() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backend_params(*OTHERS))
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_user_spec_backends_agree_with_eager(path, backend, dtype):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    cls = optcompile.compile_spec(path)
    kw = OPTIONS[path.stem]
    want = _run(cls, kw, dtype, EAGER)
    # every user spec has Triton and C kernels (RowNormSGD's axis reduction and RowNormMomentum's
    # tensor function included: torch segments between kernel stages)
    assert cls._info.extra.get("no_kernel") is None, cls._info.extra.get("no_kernel")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*kernels")  # neither skipped nor missing
        got = _run(cls, kw, dtype, BACKENDS[backend].flags)
    for a, b in zip(got, want):
        if dtype == torch.float32:  # fp32 math in another association order: a few ulp over 6 steps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # both compute in fp32 and round once per store; FMA contraction may flip a rounding
            assert (a != b).sum() <= 0.02 * a.numel()
            torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7)


NO_KERNEL_SPEC = '''
from optcompile.spec import Interval, OptimizerSpec, oo, sqrt
spec = OptimizerSpec("TensorScaledRows", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
g = spec.grad
rms = spec.let("rms", sqrt(spec.mean(g**2)))
s = spec.state("row_sq", axis=-1)
s = spec.assign(s, 0.5 * s + spec.mean(g**2, axis=-1) / (rms + 1))
spec.update(g / (sqrt(s) + 1), lr=lr)
'''


@pytest.mark.parametrize("backend", backend_params("fused", "triton"))
def test_a_spec_the_kernel_plan_cannot_take_runs_its_foreach_step_with_the_reason(tmp_path, backend):
    """A reduced-shape state updated from a per-tensor value (the segments between kernel stages
    take host values only): the module says why, and triton/fused run the foreach step, warning once."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    path = tmp_path / "tensorscaledrows.py"
    path.write_text(NO_KERNEL_SPEC)
    cls = optcompile.compile_spec(path)
    assert cls._info.extra["kernels"] is False and "per-tensor" in cls._info.extra["no_kernel"]
    want = _run(cls, {}, torch.float32, EAGER)
    import optcompile.runtime as rt
    rt._NO_KERNEL_WARNED.discard(("TensorScaledRows", backend))
    with pytest.warns(UserWarning, match=f"TensorScaledRows: no {backend} kernels for this spec .*per-tensor rms"):
        got = _run(cls, {}, torch.float32, BACKENDS[backend].flags)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


TWO_AXES_SPEC = '''
from optcompile.spec import Interval, Max, OptimizerSpec, oo, sqrt
spec = OptimizerSpec("TwoAxes")
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", default=0.5, domain=Interval(0, 1))
spec.weight_decay_hyper(0.0)
g = spec.grad
r = spec.state("row_sq", axis=-1)
c = spec.state("col_max", axis=(-2,))
r = spec.assign(r, beta * r + (1 - beta) * spec.mean(g**2, axis=-1))
c = spec.assign(c, Max(beta * c, spec.max(abs(g + 1), axis=-2)))
scale = spec.let("scale", 1 / (sqrt(r) + 1))
centred = spec.let("centred", g - spec.sum(g, axis=-1) / 8)
spec.update(centred * scale / (c + 1) + spec.mean(spec.param * c, axis=-2), lr=lr)
'''


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backend_params(*OTHERS))
def test_axis_reductions_and_reduced_states_on_every_backend(tmp_path, backend, dtype):
    """Two reduced-shape states (a tuple axis), three full-shape operands (so several spills feed the
    segment), a reduced let and axis reductions inside the update: the kernels read them by a
    broadcast index, over contiguous, 3-D and transposed params, and agree with eager."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    path = tmp_path / "twoaxes.py"
    path.write_text(TWO_AXES_SPEC)
    cls = optcompile.compile_spec(path)
    assert cls._info.extra.get("kernels", True)

    def run(flags):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(dtype) for s in [(5, 8), (2, 3, 8), (1, 8)]]
        params.append(torch.randn(8, 6, generator=gen).to(dtype).t())  # dense, not contiguous
        params = [p.requires_grad_() for p in params]
        opt = cls(params, lr=1e-2, weight_decay=0.1, **flags)
        for _ in range(3):
            for p in params:
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
            opt.step()
        return [p.detach().float() for p in params] + [v.float() for p in params for v in opt.state[p].values()
                                                      if isinstance(v, torch.Tensor) and v.dim()]
    want = run(EAGER)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*kernels")
        got = run(BACKENDS[backend].flags)
    for a, b in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7)


HOST_TAIL_SPEC = '''
from optcompile.spec import Ge, Gt, Interval, OptimizerSpec, Piecewise, oo
spec = OptimizerSpec("HostTail", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
beta = spec.hyper("beta", default=0.9)
g = spec.grad
spec.update(Piecewise((g, Gt(g, 0)), (2 * g, Ge(beta, 0.5)), (3 * g, Ge(beta, lr)), (4 * g, True)), lr=lr)
'''


@pytest.mark.parametrize("beta", [0.9, 0.3, 0.01])
def test_elementwise_piecewise_with_host_conditions_after_a_tensor_one(tmp_path, beta):
    """Branches after an elementwise condition may test hyperparameters (they become host guards)."""
    path = tmp_path / "hosttail.py"
    path.write_text(HOST_TAIL_SPEC)
    cls = optcompile.compile_spec(path)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    factor = 2 if beta >= 0.5 else 3 if beta >= 0.1 else 4
    want = -0.1 * torch.where(g > 0, g, factor * g)
    for backend in [EAGER, *(BACKENDS[n].flags for n in OTHERS)]:
        if backend.get("triton") and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        p = torch.zeros(1000, requires_grad=True)
        opt = cls([p], lr=0.1, beta=beta, **backend)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


# ── the DSL features of issue 14 (numel, clamp, optional int hyperparameters, when= on the step):
# each user spec against a plain-torch reference written here, on every backend, fp32 and bf16+Kahan
def _ref_rmsnormsgd(p, g, st, t, lr, momentum=0.9, weight_decay=0.0, eps=1e-8):
    n = p.numel()
    rms = (g.square().sum() / n).sqrt()
    st["exp_avg"] = momentum * st.get("exp_avg", torch.zeros_like(p)) + g / (rms + eps)
    lr_t = lr / n**0.5  # spec.update(..., lr=lr/sqrt(numel)): the decay uses it too
    return p * (1 - lr_t * weight_decay) - lr_t * st["exp_avg"]


def _ref_clampsgd(p, g, st, t, lr, clip=1.0, max_ratio=2.0, momentum=0.9, warmup=4.0, weight_decay=0.0):
    m = st.get("exp_avg", torch.zeros_like(p))
    m = torch.clamp(momentum * m + torch.clamp(g, -clip, clip), max=max_ratio * g.abs() + 1)
    st["exp_avg"] = m
    warm = min(max(t / warmup, 0.1), 1.0)
    p_sq, m_sq = p.square().sum(), m.square().sum()
    trust = torch.clamp((p_sq / m_sq).sqrt(), 0, 10).item() if m_sq > 0 else 1.0
    lr_t = lr * warm * trust
    return p * (1 - lr_t * weight_decay) - lr_t * torch.clamp(m, min=-1)


def _ref_warmupavgsgd(p, g, st, t, lr, warmup=None, avg_start=3, weight_decay=0.0):
    avg = st.setdefault("avg", p.clone())
    lr_t = lr * (1.0 if warmup is None else min(t / warmup, 1.0))
    p = p * (1 - lr_t * weight_decay) - lr_t * g
    if t >= avg_start:
        st["avg"] = avg + (p - avg) / (t - avg_start + 1)
    return p


def _ref_choicesgd(p, g, st, t, lr, momentum=0.9, rule=None, weight_decay=0.0):
    st["exp_avg"] = m = momentum * st.get("exp_avg", torch.zeros_like(p)) + g
    d = g + momentum * m if rule == "nesterov" else m.clamp(-1, 1) if rule == "clip" else m
    return p * (1 - lr * weight_decay) - lr * d


FEATURES = {  # spec stem: (reference, options to run with)
    "rmsnormsgd": (_ref_rmsnormsgd, [{"momentum": 0.8, "weight_decay": 0.1}]),
    "clampsgd": (_ref_clampsgd, [{"clip": 0.3, "max_ratio": 1.5, "weight_decay": 0.1}]),
    "warmupavgsgd": (_ref_warmupavgsgd, [{"warmup": 4, "weight_decay": 0.1}, {}]),
    "choicesgd": (_ref_choicesgd, [{"rule": "nesterov", "weight_decay": 0.1}, {"rule": "clip", "momentum": 0.5}, {}]),
}
SHAPES = [(3,), (1025,), (0,), (7, 9)]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _reference(stem, kw, steps):
    ref, _ = FEATURES[stem]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    states = [{} for _ in params]
    for t in range(1, steps + 1):  # an empty tensor has nothing to step (its numel is 0)
        params = [ref(p, g, st, t, 1e-2, **kw) if p.numel() else p for p, g, st in zip(params, _grads(t), states)]
    return params, states


def _compiled(stem, kw, steps, dtype, backend):
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / f"{stem}.py")
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype).requires_grad_()
              for i, s in enumerate(SHAPES)]
    opt = cls(params, lr=1e-2, **kw, kahan_sum=dtype != torch.float32, **BACKENDS[backend].flags)
    for t in range(1, steps + 1):
        for p, g in zip(params, _grads(t)):
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_kahan"])
@pytest.mark.parametrize("backend", backend_params(*BACKENDS))
@pytest.mark.parametrize("stem,case", [(s, i) for s, (_, cases) in FEATURES.items() for i in range(len(cases))])
def test_dsl_feature_spec_matches_torch_reference(stem, case, backend, dtype):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    kw = FEATURES[stem][1][case]
    want, want_states = _reference(stem, kw, steps=6)
    got, opt = _compiled(stem, kw, 6, dtype, backend)
    for i, (a, b) in enumerate(zip(got, want)):
        if dtype == torch.float32:
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
            for name, value in want_states[i].items() if a.numel() else ():
                torch.testing.assert_close(opt.state[got[i]][name], value, rtol=1e-5, atol=1e-6)
        else:  # bf16 states; Kahan keeps the params on the fp32 trajectory within a few bf16 ulp
            assert "kahan_comp" in opt.state[got[i]] or a.numel() == 0
            torch.testing.assert_close((a.detach().float() + opt.state[a].get("kahan_comp", torch.zeros(())).float()),
                                       b, rtol=2**-7, atol=2e-3)


def _train_released(stem, kw, backend, accumulate, release=True, steps=6):
    """A small model stepped from its backward hooks (gradient release), with optimizer
    accumulation (3 micro-steps per update) or without; ``release=False``: plain steps."""
    from optcompile import prepare_for_gradient_release
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / f"{stem}.py")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    opt = cls(model.parameters(), lr=1e-2, **kw, gradient_release=release, **BACKENDS[backend].flags)
    if release:
        prepare_for_gradient_release(model, opt)
    for i in range(steps):
        if accumulate:
            opt.optimizer_accumulation = i % 3 != 2
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()] + \
        [t for s in opt.state.values() for k, t in sorted(s.items()) if torch.is_tensor(t) and t.dim() > 0]


@pytest.mark.parametrize("accumulate", [False, True], ids=["release", "accumulate"])
@pytest.mark.parametrize("backend", backend_params("eager", "fused", "triton"))  # foreach: off under release
@pytest.mark.parametrize("stem", list(FEATURES))
def test_dsl_feature_spec_gradient_release_and_accumulation(stem, backend, accumulate):
    """numel, clamp and optional hyperparameters through gradient release and optimizer
    accumulation: every backend as eager, and eager gradient release as plain steps."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    kw = FEATURES[stem][1][0]
    want = _train_released(stem, kw, "eager", accumulate)
    if backend == "eager" and not accumulate:
        for a, b in zip(want, _train_released(stem, kw, "eager", False, release=False)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    got = _train_released(stem, kw, backend, accumulate)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_axis_reduction_spec_matches_torch_reference(backend):
    """RowNormSGD (tests/user_specs/rownormsgd.py: ``spec.mean(g**2, axis=-1)`` into a state of the
    reduced shape) against the same algorithm written by hand in torch, on 1-D, 2-D and 3-D params."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / "rownormsgd.py")
    torch.manual_seed(0)
    shapes = [(5,), (4, 6), (2, 3, 4)]
    ours = [torch.randn(s).requires_grad_() for s in shapes]
    ref = [p.detach().clone() for p in ours]
    opt = cls(ours, lr=1e-2, beta=0.8, momentum=0.9, weight_decay=0.1, **BACKENDS[backend].flags)
    sq = [torch.zeros(*s[:-1], 1) for s in shapes]
    mom = [torch.zeros(s) for s in shapes]
    for _ in range(8):
        grads = [torch.randn(s) for s in shapes]
        for p, gr in zip(ours, grads):
            p.grad = gr.clone()
        opt.step()
        for p, s_, m, gr in zip(ref, sq, mom, grads):  # AdamW-style decoupled decay, then the step
            s_.mul_(0.8).add_((gr * gr).mean(dim=-1, keepdim=True), alpha=0.2)
            m.mul_(0.9).add_(gr / (s_.sqrt() + 1e-8))
            p.mul_(1 - 1e-2 * 0.1).sub_(m, alpha=1e-2)
    for p, r, s_ in zip(ours, ref, sq):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["row_sq"].shape == s_.shape
        torch.testing.assert_close(opt.state[p]["row_sq"], s_, rtol=1e-5, atol=1e-7)


def test_choice_hyperparameter_is_validated_and_documented():
    """A string choice (tests/user_specs/choicesgd.py): annotated, documented with its values, and
    any other value refused at construction, naming the argument and the choices."""
    import inspect
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / "choicesgd.py")
    rule = inspect.signature(cls.__init__).parameters["rule"]
    assert (rule.default, rule.annotation) == (None, str | None)
    assert "one of None, 'nesterov', 'clip'" in " ".join(cls.__doc__.split())
    with pytest.raises(ValueError, match=r"^Invalid rule: rule='sign'; expected one of None, 'nesterov', 'clip'$"):
        cls([torch.zeros(2, requires_grad=True)], lr=1e-2, rule="sign")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_kahan"])
@pytest.mark.parametrize("backend", backend_params())
def test_batched_matrix_fn_spec_matches_torch_reference(backend, dtype):
    """RowNormMomentum (tests/user_specs/rownormmomentum.py: a batched ``spec.matrix_fn``, one call
    per shape on the stack of same-shaped params) against the algorithm written by hand in torch,
    on square, tall and wide matrices, two of one shape; bf16 with Kahan summation tracks the fp32
    reference. The Triton and fused backends run it as kernels around the function, which runs on
    the stack of their fp32 spills (no fallback, no warning)."""
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / "rownormmomentum.py")
    shapes = [(5, 5), (7, 3), (3, 7), (7, 3)]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().to(dtype).requires_grad_() for p in ref]
    opt = cls(ours, lr=1e-2, momentum=0.8, weight_decay=0.1, **BACKENDS[backend].flags)
    mom = [torch.zeros(s) for s in shapes]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*kernels")
        for _ in range(8):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for p, gr in zip(ours, grads):
                p.grad = gr.to(dtype)
            opt.step()
            for p, m, gr in zip(ref, mom, grads):
                m.mul_(0.8).add_(gr.to(dtype).float())
                p.mul_(1 - 1e-2 * 0.1).sub_(m / (m.norm(dim=-1, keepdim=True) + 1e-8), alpha=1e-2)
    for p, r, m in zip(ours, ref, mom):
        if dtype == torch.float32:
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-6)
        else:  # bf16 states; the Kahan-compensated params stay on the fp32 trajectory within bf16 ulps
            exact = p.detach().float() + opt.state[p]["kahan_comp"].float()
            torch.testing.assert_close(exact, r, rtol=2**-7, atol=2e-3)


def test_matrix_fn_spec_refuses_other_ranks():
    cls = optcompile.compile_spec(Path(__file__).parent / "user_specs" / "rownormmomentum.py")
    with pytest.raises(ValueError, match=r"RowNormMomentum"):
        cls([torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)], lr=1e-2)


# ── scalar states: per-param host values the step reads and writes (cyclicsgd.py) ──────────────
def _cyclic_reference(params, states, lr, gamma, period, step):
    """tests/user_specs/cyclicsgd.py by hand, per param: fp32 ``scale`` as torch would keep it."""
    for p in params:
        scale = states.setdefault(p, torch.tensor(1.0))
        old = scale.item()
        scale.mul_(gamma)
        if step % period == 0:
            scale.fill_(1.0)
        p.data.add_(p.grad, alpha=-(lr * ((old + scale.item()) / 2)))


@pytest.mark.parametrize("backend", backend_params())
def test_scalar_state_matches_a_torch_reference(backend):
    """Every backend against the hand-written reference for 20 steps; the stored scales bit for bit.
    Midway one param's scale is changed (as a loaded checkpoint may leave it), so the params of
    the group hold different values from then on."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU only under TRITON_INTERPRET=1")
    cls = optcompile.compile_spec(SPECS[[p.stem for p in SPECS].index("cyclicsgd")])
    torch.manual_seed(0)
    ours = [torch.randn(s).requires_grad_() for s in [(3,), (1025,), (7, 9)]]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = cls(ours, lr=0.1, gamma=0.7, period=3, **BACKENDS[backend].flags)
    ref_state: dict = {}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        _cyclic_reference(ref, ref_state, 0.1, 0.7, 3, step)
        if step == 7:
            opt.state[ours[1]]["scale"].fill_(0.25)
            ref_state[ref[1]].fill_(0.25)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # kernels: fused multiply-adds
            s = opt.state[p]["scale"]
            assert s.dtype == torch.float32 and s.shape == () and torch.equal(s, ref_state[q]), (step, s, ref_state[q])
    sd = opt.state_dict()
    again = cls([p.detach().clone().requires_grad_() for p in ours], lr=0.1, gamma=0.7, period=3)
    again.load_state_dict(torch.load(_saved(sd), weights_only=True))
    assert [again.state[p]["scale"].item() for p in again.param_groups[0]["params"]] == \
        [opt.state[p]["scale"].item() for p in ours]


def _saved(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_scalar_state_assigned_a_per_element_value_is_a_spec_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text('from optcompile.spec import Interval, OptimizerSpec, oo\n'
                    'spec = OptimizerSpec("Bad", weight_decay=None)\n'
                    'lr = spec.hyper("lr", domain=Interval(0, oo))\n'
                    's = spec.state("s", init=1, scalar=True)\n'
                    's = spec.assign(s, s * spec.grad)\n'
                    'spec.update(spec.grad * s, lr=lr)\n')
    with pytest.raises(optcompile.SpecError, match=r"bad.py:5: scalar state 's' holds one value per param: .*"
                                                   r"not per-element or per-tensor values \(grad\)"):
        optcompile.compile_spec(path)
