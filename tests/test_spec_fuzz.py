"""The spec fuzzer: random specs written with the public DSL the way a README-only user writes
them — hyperparameters, a flag, host lets, states with ``init=`` and ``when=``, guarded writes,
element lets, reductions and ratios of reductions, ``numel`` and ``sum(1)``, ``clamp``, Piecewise on
flags, hyperparameters and elements — with every name drawn from a list that holds the identifiers the generated code uses
itself (``mask``, ``offsets``, ``torch``, ``h0``, ``sum0`` …). Each spec is compiled to all four
backends and stepped on small tensors in fp32 and bf16; every backend must agree with eager.

CI runs ``EXAMPLES`` derandomized examples (the same specs on every run). For a long run:
``OPTCOMPILE_FUZZ_EXAMPLES=1000 OPTCOMPILE_FUZZ_SEED=1 bash scripts/test.sh tests/test_spec_fuzz.py -k random``
(a fixed seed: the same specs again for the same seed; change it for new ones).

The bugs it found are pinned below as plain tests (``test_*_regression``).
"""
from __future__ import annotations

import keyword
import os
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from optcompile import backends_available, loader
from optcompile.spec import GENERATED_CODE_NAMES, RESERVED_NAMES, SpecError
from optimizers import BACKENDS as REGISTRY, EAGER

EXAMPLES = int(os.environ.get("OPTCOMPILE_FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("OPTCOMPILE_FUZZ_SEED")
SHAPES = [(5,), (3, 4), (0,)]
STEPS = 3  # `spec.every(2)` writes on step 2 only

# identifiers of the generated code, in some backend, and names a user might pick anyway
CODE_IDENTIFIERS = [
    "mask", "offsets", "pid", "tensor", "start", "n_elements", "numels", "program_tensor", "program_start",
    "first", "count", "acc", "idx", "part", "plan", "i", "n", "h", "c", "v", "ts", "ts_t", "flags", "n_chunks",
    "torch", "math", "tl", "triton", "libdevice", "fp32", "launch_plan", "BLOCK_SIZE", "DTYPE", "ALIGNED",
    "h0", "h1", "t0", "t1", "cond0", "sum0", "mean0", "max0", "mean1", "sum0_t", "mean0_t", "decay", "decay_l2",
    "kahan_upd", "param_prev", "exp_avg", "exp_avgs", "param_ptr", "grad_ptrs", "sqrt", "exp", "log", "pow",
    "max", "min", "abs", "float", "int", "double", "bool", "range", "len", "zip", "lowp", "x", "beta", "momentum",
    "rho", "trust", "spill_t0", "oc", "sign",
]
API_NAMES = [n for n in CODE_IDENTIFIERS if n not in RESERVED_NAMES | GENERATED_CODE_NAMES]  # hypers, states
LET_NAMES = [n for n in CODE_IDENTIFIERS if n not in RESERVED_NAMES and not keyword.iskeyword(n)]


def _fuzz_settings(test):
    # CI reports the failing spec as found (shrinking a 5-second example takes minutes); the long run shrinks
    phases = [p for p in Phase if p != Phase.shrink or SEED is not None]
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                    suppress_health_check=list(HealthCheck), phases=phases)(test)
    return seed(int(SEED))(test) if SEED is not None else test


class _Names:
    """Distinct names for one spec, drawn from the pools above. A state's buffers travel as a list
    named ``<state>s`` (optimi's ``exp_avgs``), so that name is taken too (the DSL says so)."""

    def __init__(self, draw):
        self.draw, self.used = draw, set()

    def __call__(self, pool, state: bool = False) -> str:
        free = [n for n in pool if n not in self.used and not (state and (f"{n}s" in self.used or
                                                                            keyword.iskeyword(f"{n}s")))]
        name = self.draw(st.sampled_from(free))
        self.used |= {name, f"{name}s"} if state else {name}
        return name


def _reads(text: str, var: str) -> bool:
    return re.search(rf"\b{var}\b", text) is not None


@st.composite
def spec_texts(draw) -> str:
    """One spec file. Every value stays in a numerically tame range (EMA coefficients in (0, 1],
    denominators bounded away from 0, sqrt/log of non-negative values, tensor conditions on the
    gradient only), so a disagreement between backends is a bug, not rounding amplified."""
    name = _Names(draw)
    pick = lambda xs: draw(st.sampled_from(xs))  # noqa: E731
    wd = pick([None, "decoupled", "l2"])
    decl = ["from optcompile.spec import *", f"spec = OptimizerSpec('Fuzz', weight_decay={wd!r})",
            "lr = spec.hyper('lr', domain=Interval(0, oo))"]
    if wd:
        decl.append(f"spec.weight_decay_hyper({pick([0.0, 0.1])})")
    decl.append("g, p, t = spec.grad, spec.param, spec.step")
    body: list[str] = []  # statements that read the declarations

    betas = [f"B{k}" for k in range(draw(st.integers(1, 2)))]
    for b in betas:
        decl.append(f"{b} = spec.hyper({name(API_NAMES)!r}, {pick([0.5, 0.9, 0.99])}, Interval.Ropen(0, 1))")
    decl.append(f"E = spec.hyper({name(API_NAMES)!r}, {pick([1e-3, 1e-2])}, Interval(0, oo))")
    flags = pick([[], ["F0"], ["F0"]])
    for f in flags:
        decl.append(f"{f} = spec.flag({name(API_NAMES)!r}, {draw(st.booleans())})")

    def host_condition():
        return pick([f"Gt({pick(betas)}, 0.6)"] + flags + [f"~{f}" for f in flags])

    coefs = list(betas)  # host values in (0, 1]: EMA coefficients
    for k in range(draw(st.integers(0, 2))):
        b, b2 = pick(coefs), pick(betas)
        forms = [f"{b}**t", f"1 - {b2}**t", f"(1 - {b2})/(1 - {b2}**t)", f"sqrt(1 - {b2}**t)",
                 f"Max({b2}, 1/(t + 1))", f"Min({b}, 1 - 1/(t + 1))",
                 f"Piecewise(({b}**t, Gt({b2}, 0.6)), ({b}, True))", f"{b}*{b2}"] + [f"Piecewise(({b}, {f}), (1 - {b2}/2, True))" for f in flags]
        body.append(f"H{k} = spec.let({name(LET_NAMES)!r}, {pick(forms)})")
        coefs.append(f"H{k}")

    def elem(inputs):
        """An elementwise value over ``inputs`` (tensors of magnitude about 1)."""
        x, y = pick(inputs), pick(inputs)
        forms = ["g", "g**2", "Abs(g)", "sign(g)", "Max(g, 0)", f"Min(g, {x})", f"{x}*{y}", f"{x} + g",
                 f"Piecewise((g, Gt(g, 0)), (2*{x}, True))", f"exp(-Abs({x}))", f"log(1 + Abs({x}))",
                 f"{x}/(Abs({y}) + 1)", f"sqrt(Abs({x}))", f"Piecewise(({x}, {host_condition()}), ({y}, True))",
                 f"Max({x}, {y}, -1)", f"Max(g, {pick(coefs)})", f"Min({x}, {pick(coefs)})",
                 f"Piecewise(({x}, {host_condition()}), ({pick(['0', '1', pick(coefs)])}, True))",
                 f"Piecewise((g, Gt(g, 0)), ({pick(coefs)}, True))", f"{x}*{pick(coefs)}",
                 f"clamp({x}, -{pick(coefs)}, {pick(coefs)})", f"clamp({x}, lo=-1)",
                 f"clamp(g, -Abs({y}) - {pick(coefs)}, hi=Abs({x}) + 1)"]
        forms += [f"Piecewise(({x}, {f} & Gt(g, 0)), (-{y}, True))" for f in flags]
        return pick(forms)

    states, guarded = [], {}  # state variable → the host condition it exists under
    for k in range(draw(st.integers(1, 3))):
        s = f"S{k}"
        init = pick(["0", "g", "p", "-g", "Abs(g)", pick(betas)])
        when = host_condition() if k and draw(st.booleans()) else None
        decl.append(f"{s} = spec.state({name(API_NAMES, state=True)!r}, init={init}" +
                    (f", when={when})" if when else ")"))
        readable = ["g", "p", s] + [x for x in states if x not in guarded]
        c = pick(coefs)
        write_when = pick(["", ", when=spec.every(2)", f", when={host_condition()}"])
        body.append(f"{s} = spec.assign({s}, {c}*{s} + (1 - {c})*({elem(readable)}){write_when})")
        states.append(s)
        if when:
            guarded[s] = when

    plain = ["g", "p"] + [x for x in states if x not in guarded]
    lets = []
    for k in range(draw(st.integers(0, 2))):
        body.append(f"L{k} = spec.let({name(LET_NAMES)!r}, {elem(plain + lets)})")
        lets.append(f"L{k}")

    reductions, nonneg, rooted = [], [], []
    for k in range(draw(st.integers(0, 3))):
        op, x = pick(["sum", "mean", "max"]), pick(plain + lets)
        signed = [f"g*{x}"] if op != "max" else []
        operand = pick([f"{x}**2", f"Abs({x})", "g**2", "Abs(g)", "1"] + signed)  # sum(1) is numel
        body.append(f"R{k} = spec.{op}({operand})")
        reductions.append(f"R{k}")
        if operand not in signed:
            nonneg.append(f"R{k}")
        if operand not in signed and op != "max":  # the max of an empty tensor is -inf: see the xfail below
            rooted.append(f"R{k}")
    tscalars = []
    for k in range(draw(st.integers(0, 2)) if nonneg else 0):
        r, r2, any_r = pick(nonneg), pick(nonneg), pick(reductions)
        forms = [f"({r} + {any_r})/({r} + 1)", f"{any_r}/({r2} + 1)", f"clamp({any_r}/spec.numel, -1, 1)"]
        if rooted:
            r, r2 = pick(rooted), pick(rooted)
            forms += [f"Min(1, 1/(sqrt({r}) + E))", f"sqrt({r})/(sqrt({r2}) + 1)"]
        body.append(f"T{k} = spec.let({name(LET_NAMES)!r}, {pick(forms)})")
        tscalars.append(f"T{k}")

    if tscalars and draw(st.booleans()):  # a state written after a reduction: a later stage (kernel)
        s, c = f"S{len(states)}", pick(coefs)
        decl.append(f"{s} = spec.state({name(API_NAMES, state=True)!r})")
        body.append(f"{s} = spec.assign({s}, {c}*{s} + (1 - {c})*{pick(tscalars)}*({elem(plain + lets + [s])}))")
        states.append(s)

    # the direction reads every state (a guarded one under its condition), let and per-tensor value
    terms = [f"Piecewise(({s}, {guarded[s]}), (g, True))" if s in guarded else s for s in states] + lets
    d = " + ".join(terms)
    d = f"({d})/(sqrt(Abs({pick(plain + lets)})) + E)" if draw(st.booleans()) else f"{d} + E*g"
    for x in tscalars:
        d = f"({d})*{x}"
    for r in reductions:
        if not any(_reads(line.split("=", 1)[1], r) for line in body if line.startswith("T")):
            d = f"({d})/({r}**2 + 1)"
    if flags and draw(st.booleans()):
        d = f"Piecewise(({d}, {flags[0]} & Gt(g, 0)), (-({d}), True))"
    lr = pick(["lr"] + [f"lr*{x}" for x in tscalars])  # a per-tensor learning rate, as StableAdamW's
    reads = "\n".join(line.split("=", 1)[1] for line in body) + d + lr
    for v in betas + flags + coefs[len(betas):]:  # declared but not read yet: fold it in
        if not _reads(reads, v):
            d = f"Piecewise(({d}, {v}), (g, True))" if v in flags else f"({d})*(1 + {v})"
    return "\n".join(decl + body + [f"spec.update({d}, lr={lr})"]) + "\n"


# ── running a spec on every backend ───────────────────────────────────────────────────────────
BACKENDS = {name: REGISTRY[name].flags for name in ("foreach", "fused", "triton")}


def _backends() -> list[str]:
    out = ["foreach"]
    if loader.has_backend("fused") and backends_available.fused_cpu():
        out.append("fused")
    if os.environ.get("TRITON_INTERPRET") == "1" and loader.has_backend("triton"):
        out.append("triton")  # the interpreter runs Triton kernels on CPU tensors
    return out


def _run(cls, backend: dict, dtype, kw=None, shapes=SHAPES, steps=STEPS):
    """Params and every state tensor after ``steps`` steps from fixed inputs. A backend that falls
    back to the for-loop fails the check, except Triton's one documented case (a state's old value
    read across a reduction after it was overwritten: the kernels cannot carry it)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(params, lr=1e-2, **(kw or {}), **backend)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    for w in caught:
        text = str(w.message)
        assert not any(x in text for x in ("skipped", "could not build", "eager backend", "for-loop")), text
    return [p.detach().float() for p in params] + [v.float() for p in params for v in opt.state[p].values()
                                                   if torch.is_tensor(v) and v.shape == p.shape]


def _agree(got, want, dtype, what) -> None:
    """fp32: other association orders and FMA contraction, a few ulps per step. bf16: both round
    an fp32 value once per store, so an fp32 ulp flips a rounding now and then (one bf16 ulp) and a
    flipped state moves later steps by about an ulp of the tensor's size. NaN positions match."""
    flips, total = 0, 0
    for i, (a, b) in enumerate(zip(got, want)):
        label = f"{what}: tensor {i}"
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{label}: NaN positions differ"
        a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{label}\n{m}")
            continue
        diff = (a - b).abs()
        ulp = torch.maximum(a.abs(), b.abs()) * 2.0 ** -7
        scale = float(torch.maximum(a.abs(), b.abs()).mean()) if a.numel() else 0.0
        bad = diff > 4 * ulp + 4 * 2.0 ** -7 * scale + 1e-3
        assert not bad.any(), f"{label}: more than a few bf16 ulps apart:\n{a[bad]}\n{b[bad]}"
        flips, total = flips + int((diff > 0).sum()), total + a.numel()
    assert flips <= max(3, 0.15 * total), f"{what}: {flips} of {total} values differ by a bf16 rounding"


def _check_every_backend(cls, text: str, kw=None) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        want = _run(cls, EAGER, dtype, kw)
        for backend in _backends():
            _agree(_run(cls, BACKENDS[backend], dtype, kw), want, dtype, f"{backend} {dtype}\n{text}")


def _compile(tmp_path_factory, text: str):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.py"
    path.write_text(text)
    return loader.compile_spec(path)


@pytest.mark.slow
@_fuzz_settings
@given(text=spec_texts())
def test_random_specs_agree_on_every_backend(text, tmp_path_factory):
    cls = _compile(tmp_path_factory, text)
    _check_every_backend(cls, text, {"weight_decay": 0.1} if "weight_decay_hyper" in text else None)


# ── what it found, pinned ─────────────────────────────────────────────────────────────────────
RATIO_SPEC = '''
from optcompile.spec import *
spec = OptimizerSpec("Ratio", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
g = spec.grad
s = spec.let("s", (spec.sum(g**2) + spec.sum(Abs(g))) / (spec.sum(g**2) + 1))
m = spec.state("m")
m = spec.assign(m, 0.9 * m + s * g * g)
spec.update(m, lr=lr)
'''


def test_ratio_of_reductions_regression(tmp_path_factory):
    """A per-tensor value that is a ratio of reductions: eager and foreach printed
    ``(sum0 + sum1)/(sum2 + 1).item()`` (``.item()`` bound to the denominator; foreach then passed
    0-dim tensors to ``_foreach_addcmul_``). Every backend against a plain torch loop."""
    cls = _compile(tmp_path_factory, RATIO_SPEC)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    want = []
    for i, p in enumerate(params):
        p, m = p.clone(), torch.zeros_like(p)
        for step in range(STEPS):
            g = grads[step][i]
            s = ((g**2).sum() + g.abs().sum()) / ((g**2).sum() + 1)
            m = 0.9 * m + s * g * g
            p = p - 1e-2 * m
        want.append(p)
    for backend in ["eager"] + _backends():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = cls(ps, lr=1e-2, **(EAGER if backend == "eager" else BACKENDS[backend]))
        for step in range(STEPS):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()
        for p, w in zip(ps, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend}: {m}")
    _check_every_backend(cls, RATIO_SPEC)


# one spec, two spellings: names the generated code uses itself, and plain ones; the results must not
# depend on which (a let `mask` was the Triton kernel's bounds mask, `offsets` its element offsets …)
NAMES_SPEC = '''
from optcompile.spec import *
spec = OptimizerSpec("Names", weight_decay="decoupled")
lr = spec.hyper("lr", domain=Interval(0, oo))
spec.weight_decay_hyper(0.0)
beta = spec.hyper("{beta}", 0.9, Interval.Ropen(0, 1))
eps = spec.hyper("{eps}", 1e-3, Interval(0, oo))
flag = spec.flag("{flag}", True)
g, p, t = spec.grad, spec.param, spec.step
m = spec.state("{m}")
v = spec.state("{v}", init=Abs(g), when=flag)
r = spec.sum(g**2)
a = spec.let("{a}", beta**t)
b = spec.let("{b}", (1 - beta) / (1 - a))
m = spec.assign(m, beta * m + (1 - beta) * g)
v = spec.assign(v, a * v + (1 - a) * g**2)
c = spec.let("{c}", m * b)
d = spec.let("{d}", Piecewise((c, Gt(g, 0)), (c / 2, True)))
e = spec.let("{e}", Abs(d) + r / (spec.mean(Abs(g)) + 1))
f = spec.let("{f}", sqrt(spec.mean(g**2)))
h = spec.let("{h}", (r + f) / (r + 1))
q = spec.let("{q}", Piecewise((sqrt(v) + eps, flag), (1, True)))
spec.update((d + e * eps) / q * h, lr=lr)
'''
PLAIN = dict(beta="beta", eps="eps", flag="flag", m="m", v="v", a="a", b="b", c="c", d="d", e="e", f="f", h="h", q="q")
HAZARDS = [  # lets named like the generated code's locals, imports, temporaries and derived names
    dict(PLAIN, a="torch", b="math", c="mask", d="offsets", e="pid", f="tl", h="sum0", q="mean1_t"),
    dict(PLAIN, a="h0", b="i", c="n", d="t0", e="len", f="double", h="decay", q="kahan_upd"),
    dict(PLAIN, a="cond0", b="param_prev", c="ms", d="libdevice", e="plan", f="sqrt", h="BLOCK_SIZE", q="acc"),
    dict(PLAIN, m="h0", v="h1", a="t1", b="cond1"),  # states named like hoisted host scalars
    # hyperparameters, flags and states named like Triton's kernel locals and arguments
    dict(PLAIN, beta="mask", eps="offsets", flag="pid", m="tensor", v="numels", c="m_ptr", d="program_start"),
    dict(PLAIN, beta="decay", eps="plan", flag="start", m="n_elements", v="first", c="tensor_ptrs", d="count"),
]


@pytest.mark.parametrize("names", HAZARDS, ids=lambda n: "-".join(v for k, v in n.items() if v != PLAIN[k]))
def test_names_of_the_generated_code_regression(names, tmp_path_factory):
    """A user name may equal any name the generated code uses: the code keeps its own names out
    of the way (Triton's own locals are `_`-prefixed, internal names that equal an import, a builtin
    or a derived name get a trailing `_`, passes pick fresh names), on every backend."""
    kw = {names["beta"]: 0.9, names["eps"]: 1e-3}
    text = NAMES_SPEC.format(**names)
    cls = _compile(tmp_path_factory, text)
    plain = _compile(tmp_path_factory, NAMES_SPEC.format(**PLAIN))
    for dtype in (torch.float32, torch.bfloat16):
        want = _run(plain, EAGER, dtype, {"beta": 0.9, "eps": 1e-3})
        for backend in ["eager"] + _backends():
            got = _run(cls, EAGER if backend == "eager" else BACKENDS[backend], dtype, kw)
            _agree(got, want, dtype, f"{backend} {dtype}\n{text}")


@pytest.mark.parametrize("body,words", [
    ("m = spec.state('m')\nb = spec.hyper('ms', 0.5)\nm = spec.assign(m, b * g)\nspec.update(m, lr=lr)",
     ["state 'm'", "list named 'ms'", "rename one of them"]),
    ("m = spec.state('i')\nm = spec.assign(m, g)\nspec.update(m, lr=lr)", ["list named 'is'", "Python keyword"]),
    ("k = spec.flag('kahan')\nspec.update(Piecewise((g, k), (2 * g, True)), lr=lr)", ["'kahan' is a reserved name"]),
    ("r = spec.sum(g**2)\nb = spec.hyper('sum0', 0.5)\nspec.update(b * r * g, lr=lr)",
     ["'sum0' is already the name of a value made by an earlier call"]),
])
def test_api_names_the_generated_code_cannot_take(body, words, tmp_path):
    """Hyperparameters, flags and states are API names (constructor arguments, state keys, the
    functional form's `<state>s` lists): one the generated code cannot carry is a SpecError."""
    path = tmp_path / "bad.py"
    path.write_text("from optcompile.spec import *\nspec = OptimizerSpec('T', weight_decay=None)\n"
                    "lr = spec.hyper('lr', domain=Interval(0, oo))\ng = spec.grad\n" + body + "\n")
    with pytest.raises(SpecError) as info:
        loader.compile_spec(path)
    for w in words:
        assert w in str(info.value), str(info.value)


FLAG_STAGE_SPEC = '''
from optcompile.spec import *
spec = OptimizerSpec("FlagStage", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
f = spec.flag("f", False)
g = spec.grad
m = spec.state("m")
m = spec.assign(m, Piecewise((g, f), (2 * g, True)))
r = spec.sum(g**2)
spec.update(Piecewise((m, f & Gt(g, 0)), (-m, True)) / (r + 1), lr=lr)
'''


@pytest.mark.parametrize("f", [True, False])
def test_flag_in_the_math_of_a_later_stage_regression(f, tmp_path_factory):
    """A flag that guards a statement of one stage and is read by the math of another: the fused
    backend shared one loop between the flag's values (same statements) with the flag baked in as
    the first one's constant, so `f=True` stepped as `f=False`."""
    _check_every_backend(_compile(tmp_path_factory, FLAG_STAGE_SPEC), FLAG_STAGE_SPEC, {"f": f})


EMPTY_MAX_SPEC = '''
from optcompile.spec import *
spec = OptimizerSpec("EmptyMax", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
g = spec.grad
c = spec.let("c", Min(1, 1 / (sqrt(spec.max(Abs(g))) + 1)))
spec.update(c * g, lr=lr)
'''


def test_sqrt_of_the_max_of_an_empty_param(tmp_path_factory):
    """Found by the fuzzer: the max over an empty param is -inf, and eager/foreach computed its
    sqrt with ``math.sqrt`` (``ValueError: math domain error``); host math is IEEE now (NaN), as
    in the C and Triton kernels."""
    _check_every_backend(_compile(tmp_path_factory, EMPTY_MAX_SPEC), EMPTY_MAX_SPEC)
