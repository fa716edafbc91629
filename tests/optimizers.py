"""The one registry the tests draw from (in the spirit of torch's ``OptimizerInfo``): every
built-in optimizer with its references and the option configurations each kind of test runs,
and every backend with the constructor flags that select it.

Test files parametrize over what this module derives from ``builtin_specs()``, so a new built-in
spec is picked up everywhere; one without an entry in ``_ENTRIES`` stops collection with an error
that names it. tests/test_registry.py checks the entries against the classes and against optimi.
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import pytest
import torch

from optcompile import backends_available
from optcompile.paths import builtin_specs


# ── backends ──────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Backend:
    """A backend and the constructor flags that select exactly it (every flag explicit, so the
    choice never depends on the device or on what is installed)."""
    name: str
    flags: Mapping[str, bool]
    oracle_flags: Mapping[str, bool] | None  # optimi's flags for its matching path; None: it has none on CPU
    mark: pytest.MarkDecorator | None = None

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.name == "triton" and importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if self.name == "fused" and backends_available.c_compiler() is None:
            return "no C compiler"
        return None

    def param(self):
        """This backend as a pytest parameter: its marker, and skipped where it cannot run."""
        reason = self.unavailable()
        marks = [self.mark] if self.mark else []
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        return pytest.param(self.name, marks=marks, id=self.name)


def _flags(**kw):
    return MappingProxyType(kw)


BACKENDS = {b.name: b for b in [
    Backend("eager", _flags(foreach=False, triton=False, fused=False), _flags(foreach=False, triton=False)),
    Backend("foreach", _flags(foreach=True, triton=False, fused=False), _flags(foreach=True, triton=False)),
    Backend("triton", _flags(foreach=False, triton=True, fused=False), None, pytest.mark.triton),
    Backend("fused", _flags(foreach=False, triton=False, fused=True), None, pytest.mark.fused),
]}
EAGER = BACKENDS["eager"].flags
ORACLE_EAGER = BACKENDS["eager"].oracle_flags
TORCH_BACKENDS = ("eager", "foreach")  # the ones torch-optimi (and torch.optim) have on CPU
TORCH_EAGER = _flags(foreach=False)  # torch.optim's for-loop path


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend (all by default), with its marker and availability skip."""
    return [BACKENDS[n].param() for n in (names or BACKENDS)]


SUMMED_ULPS = 4  # OptimizerInfo.summed_states: fp32 ulps of a summed state's largest magnitude

# ── optimizers ────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Config:
    """One set of constructor keywords (lr excluded unless a test says otherwise) and its test id."""
    kwargs: Mapping
    id: str

    def __post_init__(self):
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


@dataclass(frozen=True)
class TorchCase:
    """Where the algorithm coincides with torch.optim: our keywords and torch's (translated)."""
    ours: Mapping
    torch_cls: type
    theirs: Mapping


@dataclass(frozen=True)
class OptimizerInfo:
    """A built-in optimizer and everything the tests run it with.

    * ``training``: hyperparameters that switch on the optional parts (momentum, weight decay of
      each kind the class has) in the training-loop tests (gradient release, accumulation, bf16);
      every configuration runs against the eager normal step and against optimi.
    * ``kernel``: option sets that together switch on every generated pass; a backend is compared
      with eager on each (tests/test_fused.py).
    * ``differential``: option sets run against optimi bit for bit, on every backend optimi has.
    * ``stateful``: the least that gives the optimizer all its states (SGD: momentum).
    * ``state_dict``: the options the checkpoint tests save and load with.
    * ``torch_optim``: the configurations that are torch.optim's algorithm too.
    * ``torch_family``: for a class that *is* torch.optim's (same name, arguments and state), the
      option combinations run against it with identical keywords (tests/test_torch_family.py).

    Facts where an algorithm departs from what most tests assume (checked against the class in
    tests/test_registry.py; each test that reads one checks the other behaviour instead):

    * ``weight_decay``: the class has weight decay (the pass's ``weight_decay``, ``decouple_wd``,
      ``decouple_lr``, ``max_lr``). Rprop has none, as in torch.
    * ``freeze``: group values under which a step cannot move the params. ``lr=0`` where the
      step scales with lr; Rprop's lr only seeds the per-element step sizes (as in torch), so
      its step sizes are clamped to 0 instead. Empty where no group value stops the next step:
      ASGD steps by the ``eta`` its previous step stored (lr reaches it from the step after);
      Ranger's lookahead moves p to its slow weights every k steps; Schedule-Free moves y towards
      z by the average's weight, which lr = 0 does not make 0 once an lr was positive.
    * ``grad_states``: some state reads the gradient, so optimizer accumulation's micro-steps
      update it. Not ASGD: its only tensor state, ``ax``, averages the params, so micro-steps leave
      it as it was (only the last micro-step's gradient reaches the param, as with a stateless SGD).
    * ``forgets_nonfinite``: a non-finite gradient element that stops coming leaves no trace in
      params or states after the next step: Rprop reads only ``sign(g·g_prev)`` and ``sign(g)``,
      and ``sign(nan) = 0`` (torch.sign), so a NaN/inf never moves a param or a step size and its
      ``prev`` is overwritten by the next gradient (torch.optim.Rprop does the same).
    * ``kahan``: hyperparameters for the bf16 Kahan measurement (tests/test_low_precision.py) where
      the default lr 1e-3 does not put the updates below half a bf16 ulp (see the entries).
    * ``nonnegative``: the states the compiler shows are never negative (optcompile/nonnegative.py),
      stored with unsigned codes under ``state_precision="8bit"`` (RMSprop's ``square_avg`` is not:
      its ``alpha`` may exceed 1, as torch allows, and Rprop's step sizes are clamped to bounds of
      any sign).
    * ``schedule_free``: the oracle is the ``schedulefree`` package's class of the same name
      (:func:`schedulefree_cls`: put in train mode on construction, as optcompile's start), which
      neither optimi nor torch.optim has; its params hold a view (``train()``/``eval()``).
    * ``summed_states``: states that sum terms much larger than themselves, so where one crosses
      zero two backends' fp32 values differ by a few ulps of the *terms*: the backend comparisons
      (tests/test_fused.py, tests/test_triton.py) allow an absolute error of ``SUMMED_ULPS`` fp32
      ulps of the tensor's largest magnitude there (:func:`fp32_atol`). RMSprop's momentum buffer
      sums ``g/√ṽ``, which is ±1/√(1−α) = ±10 on the first step: |b| reaches ~40 in 7 steps, and
      the backends' ``g/√ṽ`` (torch's addcdiv against C's and Triton's own rounding of the same
      ops) differ by 1-2 ulps of it (measured up to 1.7 ulps of max|b|, 7.6e-6).
    * ``torch_exact``: the backends whose fp32 results equal torch.optim's bit for bit (its
      for-loop path for eager, its foreach path for foreach); the others are compared within
      tolerances. torch's two paths of NAdam and ASGD order their ops differently from each other
      (and NAdam's divides by the bias correction, which the printers turn into a multiply by its
      reciprocal), so one spec matches neither exactly (docs/differences.md); nor Adafactor's:
      torch computes its row/column means and RMS values with ``torch.norm``, we with sums of
      squares (a few fp32 ulps).
    """
    stem: str
    name: str
    training: tuple[Config, ...]
    kernel: tuple[Mapping, ...]
    differential: tuple[Mapping, ...]
    lr: float = 1e-2
    stateful: Mapping = field(default_factory=dict)
    state_dict: Mapping = field(default_factory=dict)
    torch_optim: tuple[TorchCase, ...] = ()
    torch_family: tuple[Mapping, ...] = ()
    weight_decay: bool = True
    freeze: Mapping = field(default_factory=lambda: {"lr": 0.0})
    forgets_nonfinite: bool = False
    grad_states: bool = True
    kahan: Mapping = field(default_factory=dict)
    summed_states: tuple[str, ...] = ()
    torch_exact: tuple[str, ...] = ("eager", "foreach")
    nonnegative: tuple[str, ...] = ()
    param_ndims: tuple[int, ...] = ()  # spec.param_ndim: the ranks the class accepts (Muon: 2-D), () any
    schedule_free: bool = False  # the schedulefree package's class of the same name is the oracle

    def fp32_atol(self, state: str | None, value: torch.Tensor, atol: float) -> float:
        """The absolute tolerance for comparing ``value`` (a param: ``state=None``) between two
        backends in fp32: ``atol``, or for a summed state at least SUMMED_ULPS ulps of max|value|."""
        if state not in self.summed_states or value.numel() == 0:
            return atol
        return max(atol, SUMMED_ULPS * torch.finfo(torch.float32).eps * float(value.abs().max()))

    def __post_init__(self):
        for name in ("stateful", "state_dict", "freeze", "kahan"):  # shared by every test: read-only
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def cls(self):
        from optcompile import loader
        return loader.builtin_class(self.stem)

    @property
    def torch_cls(self):
        """torch.optim's class of the same name where this optimizer is torch.optim's, else None."""
        return getattr(torch.optim, self.name) if self.torch_family else None

    def torch_flags(self, foreach: bool = False) -> Mapping:
        """torch.optim's flags for its for-loop (``foreach=False``) or foreach path, as its class
        takes them: torch.optim.Muon has no ``foreach`` (one path, the for-loop)."""
        if "foreach" not in inspect.signature(self.torch_cls.__init__).parameters:
            return _flags()
        return _flags(foreach=foreach)

    @property
    def optimi_cls(self):
        """torch-optimi's class of the same name, or None where optimi has none."""
        import optimi
        return getattr(optimi, self.name, None)

    @property
    def lr_scales_step(self) -> bool:
        """Whether group["lr"] drives the steps (so a scheduler does): all but Rprop, whose lr only
        seeds its step sizes. ASGD's reaches its steps through ``eta``, from the step after."""
        return "lr" in self.freeze or not self.freeze

    @property
    def oracle(self) -> tuple[type, Mapping]:
        """The reference implementation and its flags for its for-loop path on CPU: optimi's class
        where optimi has one, schedulefree's for the Schedule-Free classes, else torch.optim's (the
        torch family)."""
        if self.schedule_free:
            return schedulefree_cls(self.name), TORCH_EAGER
        if self.optimi_cls is not None:
            return self.optimi_cls, ORACLE_EAGER
        assert self.torch_cls is not None, f"{self.name}: neither optimi nor torch.optim has it"
        return self.torch_cls, self.torch_flags(foreach=False)


def schedulefree_cls(name: str) -> type:
    """``schedulefree.<name>`` (the test oracle of the Schedule-Free classes), in train mode from
    construction: schedulefree's optimizers start in eval mode and raise on a step until
    ``train()``; optcompile's start in train mode."""
    import schedulefree
    base = getattr(schedulefree, name)
    return type(name, (base,), {"__init__": _train_after_init, "__module__": base.__module__})


def _train_after_init(self, *args, **kwargs):
    type(self).__mro__[1].__init__(self, *args, **kwargs)
    self.train()


def _training(*configs):
    """One config keeps the optimizer's own id; several get ``stem-<config id>``."""
    return tuple(Config(kw, cid) for cid, kw in configs)


def _product(**choices):
    """Every combination of the choices (``name=[value, …]``; a tuple of names takes values together),
    without the keywords left at their first (default) value."""
    names = list(choices)
    out = []
    for values in itertools.product(*choices.values()):
        kw = {}
        for name, value in zip(names, values):
            if isinstance(name, str) and "__" in name:
                kw.update(value)  # a bundle of keywords chosen together
            else:
                kw[name] = value
        out.append(MappingProxyType({k: v for k, v in kw.items() if v not in (None, False, 0) or k == "lr"}))
    return tuple(out)


_TORCH_KERNEL = ({"maximize": True, "weight_decay": 0.01}, {"weight_decay": 0.01, "decouple_wd": True})

# fused.py's option sets for specs without their own: decay, and fully decoupled decay
_KERNEL_DEFAULT = ({"weight_decay": 0.01}, {"weight_decay": 0.01, "decouple_lr": True})

# Kahan compensates param writes; Schedule-Free's z sums every lr·g too, so in bf16 it loses the
# small ones whatever the param does (as Ranger's slow weights): z in fp32 for the measurement
SCHEDULE_FREE_KAHAN = dict(state_precision={"z": "fp32"})

# Differential option sets: every weight-decay style, fully decoupled decay with and without
# max_lr, and the algorithm's own switches.
_ENTRIES = {e.stem: e for e in [
    OptimizerInfo(
        "adadelta", "Adadelta", nonnegative=('square_avg', 'acc_delta'), lr=1.0,
        training=_training(("l2", dict(weight_decay=1e-2))),
        # lr scales a unit-free step (torch's default 1.0): at lr 1e-3 the fp32 run barely moves
        # (0.01); at 1.0 the steps are ~1e-3, below half a bf16 ulp: measured 26x
        kahan=dict(lr=1.0),
        kernel=_TORCH_KERNEL,
        differential=(),
        state_dict=dict(rho=0.8, weight_decay=0.01),
        torch_family=_product(opts__=[{}, dict(lr=0.5, rho=0.8, eps=1e-5)], weight_decay=[0, 0.1],
                              maximize=[False, True])),
    OptimizerInfo(
        "adafactor", "Adafactor", nonnegative=('row_var', 'col_var', 'variance'),
        training=_training(("decoupled", dict(weight_decay=1e-2))),
        kernel=({}, {"weight_decay": 0.1, "maximize": True, "eps": (1e-4, 1e-2)}),
        differential=(),
        state_dict=dict(beta2_decay=-0.6, d=1.5),
        torch_family=_product(opts__=[{}, dict(beta2_decay=-0.5, eps=(1e-4, 1e-2))], d=[1.0, 1.5],
                              wd__=[{}, dict(weight_decay=0.1)], maximize=[False, True]),
        torch_exact=()),
    OptimizerInfo(
        "adagrad", "Adagrad", nonnegative=('sum',),
        training=_training(("l2", dict(weight_decay=1e-2, lr_decay=1e-3))),
        kernel=({"lr_decay": 0.01, "initial_accumulator_value": 0.1},) + _TORCH_KERNEL,
        differential=(),
        state_dict=dict(lr_decay=0.01, initial_accumulator_value=0.1),
        torch_family=_product(lr_decay=[0, 0.01], initial_accumulator_value=[0, 0.1],
                              wd__=[{}, dict(weight_decay=0.1, eps=1e-6)], maximize=[False, True])),
    OptimizerInfo(
        "adam", "Adam", nonnegative=('exp_avg_sq',),
        training=_training(("l2", dict(weight_decay=1e-2))),
        kernel=({"weight_decay": 0.01}, {"weight_decay": 0.01, "decouple_wd": True}),
        differential=(dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decouple_wd=True),
                      dict(weight_decay=1e-3, decouple_lr=True), dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.05)),
        state_dict=dict(weight_decay=0.01),
        torch_optim=(TorchCase(dict(lr=1e-2, weight_decay=0.1), torch.optim.Adam,
                               dict(lr=1e-2, weight_decay=0.1, eps=1e-6, betas=(0.9, 0.99))),)),
    OptimizerInfo(
        "adamax", "Adamax", nonnegative=('exp_inf',),
        training=_training(("l2", dict(weight_decay=1e-2))),
        kernel=_TORCH_KERNEL,
        differential=(),
        state_dict=dict(betas=(0.8, 0.99)),
        torch_family=_product(betas__=[{}, dict(betas=(0.8, 0.99), eps=1e-6)], weight_decay=[0, 0.1],
                              maximize=[False, True])),
    OptimizerInfo(
        "adamw", "AdamW", nonnegative=('exp_avg_sq',),
        training=_training(("defaults", dict())),
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(weight_decay=0.1, betas=(0.8, 0.95)), dict(weight_decay=1e-3, decouple_lr=True),
                      dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.05)),
        torch_optim=(TorchCase(dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW,
                               dict(lr=1e-2, weight_decay=0.1, eps=1e-6, betas=(0.9, 0.99))),)),
    OptimizerInfo(
        "adamwschedulefree", "AdamWScheduleFree", nonnegative=("exp_avg_sq",),
        training=_training(("wd-warmup", dict(weight_decay=1e-2, warmup_steps=5))),
        kernel=({"weight_decay": 0.01, "warmup_steps": 3}, {"r": 1.0, "weight_lr_power": 0.0, "maximize": True}),
        differential=(),
        state_dict=dict(weight_decay=0.01, warmup_steps=3),
        freeze={},  # lr = 0 still moves y towards z by the average's weight (0 only while every lr was 0)
        kahan=SCHEDULE_FREE_KAHAN,
        schedule_free=True),
    OptimizerInfo(
        "adan", "Adan", nonnegative=('exp_avg_sq',),
        training=_training(("defaults", dict())),
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(weight_decay=0), dict(betas=(0.9, 0.8, 0.999), eps=1e-8),
                      dict(weight_decay=1e-3, decouple_lr=True), dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.05))),
    OptimizerInfo(
        "asgd", "ASGD",
        # a small t0: the average starts following the params (mu < 1) within the 20 steps
        training=_training(("l2", dict(weight_decay=1e-2, t0=5))),
        kernel=({"t0": 5, "lambd": 0.01}, {"t0": 5, "weight_decay": 0.01, "maximize": True},
                {"weight_decay": 0.01, "decouple_wd": True}),
        differential=(),
        state_dict=dict(t0=5, lambd=1e-3),
        torch_family=_product(opts__=[{}, dict(lambd=1e-2, alpha=0.5, t0=5)], weight_decay=[0, 0.1],
                              maximize=[False, True]),
        freeze={}, grad_states=False,
        torch_exact=()),
    OptimizerInfo(
        "lion", "Lion", lr=1e-3,
        training=_training(("decoupled", dict(weight_decay=1e-2))),
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(weight_decay=0.1), dict(weight_decay=1e-3, decouple_lr=True),
                      dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.01)),
        state_dict=dict(lr=1e-3, weight_decay=0.1)),
    OptimizerInfo(
        "muon", "Muon",
        training=_training(("defaults", dict())),
        kernel=({}, {"nesterov": False, "weight_decay": 0.0}),
        differential=(),
        state_dict=dict(momentum=0.9, nesterov=False),
        # written out: _product drops False and 0 values, which are Muon's non-defaults here
        torch_family=tuple(MappingProxyType(kw) for kw in (
            dict(), dict(nesterov=False), dict(weight_decay=0.0, momentum=0.9), dict(adjust_lr_fn="original"),
            dict(adjust_lr_fn="match_rms_adamw", weight_decay=0.01),
            dict(nesterov=False, ns_steps=3, eps=1e-5, ns_coefficients=(3.0, -3.2, 1.2)))),
        param_ndims=(2,)),
    OptimizerInfo(
        "nadam", "NAdam", nonnegative=("exp_avg_sq",),
        training=_training(("l2", dict(weight_decay=1e-2))),
        kernel=({"weight_decay": 0.01}, {"weight_decay": 0.01, "decoupled_weight_decay": True, "maximize": True},
                {"momentum_decay": 0.1}),
        differential=(),
        state_dict=dict(momentum_decay=0.01, weight_decay=0.01),
        torch_family=_product(opts__=[{}, dict(betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.05)],
                              wd__=[{}, dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True)],
                              maximize=[False, True]),
        torch_exact=()),
    OptimizerInfo(
        "radam", "RAdam", nonnegative=('exp_avg_sq',),
        training=_training(("l2", dict(weight_decay=1e-2))),
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decouple_wd=True), dict(betas=(0.9, 0.9)),
                      dict(weight_decay=1e-3, decouple_lr=True), dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.05)),
        state_dict=dict(betas=(0.9, 0.9)),
        torch_optim=(TorchCase(dict(lr=1e-2, weight_decay=0.1, decouple_wd=True), torch.optim.RAdam,
                               dict(lr=1e-2, weight_decay=0.1, eps=1e-6, betas=(0.9, 0.99),
                                    decoupled_weight_decay=True)),)),
    OptimizerInfo(
        "ranger", "Ranger", nonnegative=('exp_avg_sq',),
        training=_training(("decoupled", dict(weight_decay=1e-2))),  # Ranger's decouple_wd defaults to True
        # lr = 0 stops the fast weights, but a lookahead step (every k) still moves p to the slow weights
        freeze={},
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(k=4, alpha=0.3, weight_decay=0.1), dict(k=5, weight_decay=0.1, decouple_wd=False),
                      dict(weight_decay=1e-3, decouple_lr=True), dict(k=3, weight_decay=1e-3, decouple_lr=True, max_lr=0.05)),
        state_dict=dict(k=3)),
    OptimizerInfo(
        "rmsprop", "RMSprop",
        training=_training(("centered-momentum", dict(momentum=0.9, centered=True, weight_decay=1e-2))),
        kernel=({"momentum": 0.9, "centered": True}, {"momentum": 0.9, "weight_decay": 0.01, "maximize": True},
                {"weight_decay": 0.01, "decouple_wd": True}),
        differential=(),
        stateful=dict(momentum=0.9, centered=True),
        state_dict=dict(momentum=0.9, centered=True, alpha=0.9),
        summed_states=("momentum_buffer",),
        # g/sqrt(v) is ~10 on the first steps ((1 − α) = 0.01) and momentum 0.9 sums ten of them, so
        # at lr 1e-3 the updates are far above a bf16 ulp (4.0x); at lr 1e-4: measured 18x
        kahan=dict(lr=1e-4),
        torch_family=_product(centered=[False, True], momentum=[0, 0.9], wd__=[{}, dict(weight_decay=0.1, alpha=0.9)],
                              maximize=[False, True])),
    OptimizerInfo(
        "rprop", "Rprop",
        training=_training(("defaults", dict())),
        kernel=({}, {"maximize": True}),
        differential=(),
        state_dict=dict(etas=(0.4, 1.3)),
        torch_family=_product(opts__=[{}, dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2))],
                              maximize=[False, True]),
        weight_decay=False,
        freeze={"step_size_min": 0.0, "step_size_max": 0.0},
        forgets_nonfinite=True,
        # its step sizes grow ×1.2 a step up to 50 whatever lr is (1.1x at the default caps, where
        # the steps dwarf a bf16 ulp and rounding loses nothing to compensate); capped at 3e-4 they
        # stay below half an ulp of the O(1) weights: measured 33x
        kahan=dict(step_sizes=(1e-6, 3e-4))),
    OptimizerInfo(
        "sgd", "SGD",
        # both decay styles: the training-loop files used to disagree (L2 in one, decoupled in two)
        training=_training(("l2", dict(momentum=0.9, weight_decay=1e-2)),
                           ("decoupled", dict(momentum=0.9, weight_decay=1e-2, decouple_wd=True))),
        kernel=({"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.0}, {"momentum": 0.9, "dampening": True}),
        differential=(dict(), dict(momentum=0.9, weight_decay=0.1), dict(momentum=0.9, dampening=True),
                      dict(momentum=0.9, dampening=True, torch_init=True, weight_decay=0.1),
                      dict(momentum=0.5, weight_decay=0.1, decouple_wd=True), dict(weight_decay=0.1),
                      dict(momentum=0.9, weight_decay=1e-3, decouple_lr=True)),
        stateful=dict(momentum=0.9),
        state_dict=dict(momentum=0.9, dampening=True, torch_init=True),
        torch_optim=(TorchCase(dict(lr=1e-2), torch.optim.SGD, dict(lr=1e-2)),
                     TorchCase(dict(lr=1e-2, momentum=0.9, weight_decay=0.1), torch.optim.SGD,
                               dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
                     TorchCase(dict(lr=1e-2, momentum=0.9, dampening=True, torch_init=True, weight_decay=0.1),
                               torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.9, weight_decay=0.1)))),
    OptimizerInfo(
        "sgdschedulefree", "SGDScheduleFree",
        training=_training(("wd-warmup", dict(weight_decay=1e-2, warmup_steps=5))),
        kernel=({"weight_decay": 0.01, "warmup_steps": 3}, {"r": 1.0, "weight_lr_power": 0.0, "maximize": True}),
        differential=(),
        state_dict=dict(momentum=0.8, weight_decay=0.01, warmup_steps=3),
        freeze={},
        kahan=SCHEDULE_FREE_KAHAN,
        schedule_free=True),
    OptimizerInfo(
        "stableadamw", "StableAdamW", nonnegative=('exp_avg_sq',),
        training=_training(("defaults", dict())),
        kernel=_KERNEL_DEFAULT,
        differential=(dict(), dict(weight_decay=0.1), dict(weight_decay=0), dict(weight_decay=1e-3, decouple_lr=True),
                      dict(weight_decay=1e-3, decouple_lr=True, max_lr=0.05))),
]}


def _registry() -> tuple[OptimizerInfo, ...]:
    stems = [p.stem for p in builtin_specs()]
    missing = [s for s in stems if s not in _ENTRIES]
    if missing:
        raise LookupError(f"built-in spec(s) {', '.join(f'specs/{s}.py' for s in missing)} have no entry in "
                          f"tests/optimizers.py: add an OptimizerInfo (its class name and option configurations)")
    stale = sorted(set(_ENTRIES) - set(stems))
    if stale:
        raise LookupError(f"tests/optimizers.py has entries for {stale}, which are not built-in specs")
    return tuple(_ENTRIES[s] for s in stems)


OPTIMIZERS = _registry()
STEMS = [i.stem for i in OPTIMIZERS]
NAMES = [i.name for i in OPTIMIZERS]
BY_STEM = {i.stem: i for i in OPTIMIZERS}
BY_NAME = {i.name: i for i in OPTIMIZERS}


def training_cases(*stems: str) -> list:
    """``pytest.param(stem, kwargs)`` per training configuration of every (or the named) optimizer."""
    return [pytest.param(i.stem, dict(c.kwargs), id=i.stem if len(i.training) == 1 else f"{i.stem}-{c.id}")
            for i in OPTIMIZERS if not stems or i.stem in stems for c in i.training]


def case_id(kwargs: Mapping) -> str:
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


# ── shared model and data for the training-loop tests ─────────────────────────────────────────
MATRIX_SHAPES = ((8, 8), (12, 5), (5, 12), (12, 5))  # square, tall, wide, and two of one shape


def class_ndims(cls) -> tuple[int, ...]:
    """The param ranks a class takes: an optcompile class's ``spec.param_ndim`` fact (carried in its
    ``_info``), () (any) for another library's."""
    info = getattr(cls, "_info", None)
    return info.extra.get("param_ndims", ()) if info is not None else ()


def param_shapes(ndims: tuple[int, ...], shapes) -> list:
    """``shapes`` as a class takes them: all of them, or for a class that takes only some ranks
    (``ndims``: the registry's ``param_ndims``, a class's ``_info.extra["param_ndims"]``; Muon's 2-D)
    those of its ranks and then square, tall and wide matrices (two of one shape: batched calls)."""
    shapes = list(shapes)
    if not ndims:
        return shapes
    return [s for s in shapes if len(s) in ndims] + [s for s in MATRIX_SHAPES if len(s) in ndims]



def make_model(dtype=torch.float32, ndims=()):
    """A small MLP with a LayerNorm (weights, biases and a norm's gain), seeded; for a class that
    takes only some ranks (the registry's ``param_ndims``: Muon's 2-D) one without biases and norm,
    its weights one tall matrix and one wide."""
    torch.manual_seed(0)
    if ndims and 1 not in ndims:
        assert 2 in ndims, ndims
        return torch.nn.Sequential(torch.nn.Linear(12, 24, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(24, 6, bias=False)).to(dtype)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.LayerNorm(24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 6)).to(dtype)


def batches(n, seed=1):
    """``n`` fixed (input, target) batches for :func:`make_model`."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)) for _ in range(n)]


def mse_backward(model, x, y):
    """Backward of the fp32 MSE of ``model(x)`` (inputs cast to the model's dtype)."""
    ((model(x.to(next(model.parameters()).dtype)).float() - y) ** 2).mean().backward()
