"""Every way a spec can be wrong ends in one SpecError that names the spec file, the line and the
offending expression; `optcompile compile` prints it without a traceback and exits 1; and a
failing compile leaves the cache exactly as it was."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optcompile import cli
from optcompile.loader import compile_spec
from optcompile.spec import SUPPORTED_FUNCTIONS, SpecError

ROOT = Path(__file__).resolve().parents[1]

HEAD = """\
from optcompile.spec import *
import sympy
spec = OptimizerSpec("T", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
g = spec.grad
"""  # 5 lines: the case bodies start at line 6

# name → (body, line of the error, words the message must contain, offending expression or None)
CASES = {
    "undefined_symbol": ("spec.update(g * sympy.Symbol('foo', real=True), lr=lr)", 6,
                         ["undefined symbol `foo`"], "foo*grad"),
    "undefined_python_name": ("spec.update(g * foo, lr=lr)", 6, ["NameError", "foo"], None),
    "unused_hyper": ("b = spec.hyper('b', 0.5)\nspec.update(g, lr=lr)", 6, ["'b'", "never used"], None),
    "unused_state": ("m = spec.state('m')\nspec.update(g, lr=lr)", 6, ["'m'", "never read"], None),
    "assign_param": ("spec.assign(spec.param, g)\nspec.update(g, lr=lr)", 6, ["cannot assign to `param`"], "param"),
    "assign_grad": ("spec.assign(g, 2 * g)\nspec.update(g, lr=lr)", 6, ["cannot assign to `grad`"], "grad"),
    "state_read_before_declared": ("x = spec.let('x', sympy.Symbol('m', real=True) * g)\nm = spec.state('m')\n"
                                   "m = spec.assign(m, x + m)\nspec.update(m, lr=lr)", 6,
                                   ["undefined symbol `m`"], "grad*m"),
    "conditional_state_read_unguarded": ("f = spec.flag('f', False)\nm = spec.state('m', when=f)\n"
                                         "m = spec.assign(m, g + m)\nspec.update(m, lr=lr)", 9,
                                         ["state 'm' exists only when `f`", "read here where that may be false"], None),
    "unsupported_function": ("spec.update(sympy.tanh(g), lr=lr)", 6,
                             ["unsupported sympy function 'tanh'", *SUPPORTED_FUNCTIONS], "tanh(grad)"),
    "reduction_in_host_condition": ("r = spec.mean(g**2)\nm = spec.state('m')\nm = spec.assign(m, g, when=r > 1)\n"
                                    "spec.update(m, lr=lr)", 8, ["per-tensor", "hyperparameters and step"], "mean0 > 1"),
    "reduction_in_named_condition": ("r = spec.mean(g**2)\nc = spec.let('c', r > 1)\n"
                                     "spec.update(Piecewise((g, c), (2 * g, True)), lr=lr)", 7,
                                     ["condition on a per-tensor reduction cannot be lowered"], "mean0 > 1"),
    "reduction_in_state_init": ("r = spec.mean(g**2)\nm = spec.state('m', init=r)\nm = spec.assign(m, g + m)\n"
                                "spec.update(m, lr=lr)", 7, ["init may use only", "mean0"], "mean0"),
    "clamp_lo_above_hi": ("spec.update(clamp(g, 1, -1), lr=lr)", 6, ["lo=1 is greater than hi=-1"],
                          "Clamp(grad, 1, -1)"),
    "clamp_without_bounds": ("spec.update(clamp(g), lr=lr)", 6, ["clamp(x) needs a bound"], None),
    "clamp_nan_bound": ("spec.update(clamp(g, sympy.nan), lr=lr)", 6, ["lo=nan is not a real number"], None),
    "numel_in_host_condition": ("m = spec.state('m')\nm = spec.assign(m, g, when=spec.numel > 10)\n"
                                "spec.update(m, lr=lr)", 7, ["(numel)", "hyperparameters and step"], "numel > 10"),
    "numel_in_state_init": ("m = spec.state('m', init=spec.numel)\nm = spec.assign(m, g + m)\nspec.update(m, lr=lr)",
                            6, ["init may use only", "numel"], "numel"),
    "numel_in_elementwise_branch": ("spec.update(Piecewise((g, spec.numel > 10), (2 * g, True)), lr=lr)", 6,
                                    ["cannot branch on a per-tensor value (a reduction or numel)"], "numel > 10"),
    "assign_numel": ("spec.assign(spec.numel, g)\nspec.update(g, lr=lr)", 6, ["cannot assign to `numel`"], "numel"),
    "hyper_named_numel": ("n = spec.hyper('numel', 1.0)\nspec.update(g * n, lr=lr)", 6,
                          ["'numel' is a reserved name"], None),
    "optional_read_unguarded": ("t0 = spec.hyper('t0', None, type=int)\nspec.update(g * t0, lr=lr)", 7,
                                ["'t0' may be None", "spec.is_none(t0)"], None),
    "optional_read_in_none_branch": ("t0 = spec.hyper('t0', None, type=int)\n"
                                     "c = spec.let('c', Piecewise((t0, spec.is_none(t0)), (1, True)))\n"
                                     "spec.update(g * c, lr=lr)", 7, ["'t0' may be None"], None),
    "optional_read_under_other_guard": ("t0 = spec.hyper('t0', None, type=int)\nm = spec.state('m')\n"
                                        "m = spec.assign(m, g * t0, when=spec.every(2))\nspec.update(m, lr=lr)", 8,
                                        ["'t0' may be None"], None),
    "is_none_of_required_hyper": ("a = spec.hyper('a', 1.0)\n"
                                  "spec.update(Piecewise((g, spec.is_none(a)), (g * a, True)), lr=lr)", 7,
                                  ["`a` is not an optional hyperparameter"], None),
    "choice_default_not_a_choice": ("r = spec.hyper('r', 'c', choices=('a', 'b'))\nspec.update(g, lr=lr)", 6,
                                    ["default='c' is not one of the choices"], None),
    "choice_one_choice": ("r = spec.hyper('r', 'a', choices=('a',))\nspec.update(g, lr=lr)", 6,
                          ["two or more distinct non-empty strings"], None),
    "choice_not_a_string": ("r = spec.hyper('r', 'a', choices=('a', 1.5))\nspec.update(g, lr=lr)", 6,
                            ["two or more distinct non-empty strings"], None),
    "choice_with_domain": ("r = spec.hyper('r', 'a', Interval(0, 1), choices=('a', 'b'))\nspec.update(g, lr=lr)", 6,
                           ["takes no domain="], None),
    "int_hyper_float_default": ("k = spec.hyper('k', 2.5, type=int)\nspec.update(g * k, lr=lr)", 6,
                                ["default=2.5 is not an int or None"], None),
    "state_when_reads_step": ("m = spec.state('m', when=spec.step > 2)\nm = spec.assign(m, g + m, when=spec.step > 2)\n"
                              "spec.update(Piecewise((m, spec.step > 2), (g, True)), lr=lr)", 6,
                              ["state 'm': when= decides once", "not on the step"], "step > 2"),
    "hyper_type_bool": ("k = spec.hyper('k', 1, type=bool)\nspec.update(g * k, lr=lr)", 6,
                        ["type='bool'", "spec.flag"], None),
    "hyper_shadows_reserved": ("s = spec.hyper('step', 1.0)\nspec.update(g, lr=lr)", 6,
                               ["'step' is a reserved name"], None),
    "hyper_shadows_max_lr": ("s = spec.hyper('max_lr', 1.0)\nspec.update(g, lr=lr)", 6,
                             ["'max_lr' is a reserved name"], None),
    "state_shadows_reserved": ("m = spec.state('kahan_comp')\nspec.update(g, lr=lr)", 6,
                               ["'kahan_comp' is a reserved name"], None),
    "hyper_shadows_module": ("m = spec.hyper('math', 1.0)\nspec.update(g * m, lr=lr)", 6,
                             ["'math' clashes with the generated code"], None),
    "let_is_keyword": ("c = spec.let('lambda', lr * 2)\nspec.update(g * c, lr=lr)", 6,
                       ["'lambda' clashes with the generated code"], None),
    "state_is_c_keyword": ("m = spec.state('double')\nm = spec.assign(m, g)\nspec.update(m, lr=lr)", 6,
                           ["'double' clashes with the generated code"], None),
    "let_with_internal_prefix": ("c = spec.let('_t0', lr * 2)\nspec.update(g * c, lr=lr)", 6,
                                 ["names starting with '_' or 'oc_' are reserved"], None),
    "declared_twice": ("a = spec.hyper('a', 1.0)\nb = spec.hyper('a', 2.0)\nspec.update(g * a, lr=lr)", 7,
                       ["already declared at line 6"], None),
    "spec_raises": ("raise RuntimeError('boom')", 6, ["spec raised RuntimeError: boom"], None),
    "syntax_error": ("spec.update(g, lr=lr", 6, ["syntax error"], None),
    "update_without_lr": ("spec.update(g)", 6, ["spec.update needs the learning rate"], "grad"),
    "update_twice": ("spec.update(g, lr=lr)\nspec.update(g, lr=lr)", 7, ["spec.update called twice"], None),
    "never_updates": ("m = spec.state('m')", 3, ["never calls spec.update"], None),
    "lr_depends_on_grad": ("spec.update(g, lr=lr * g)", 6, ["learning rate of spec.update"], "grad*lr"),
}

NO_WD = """\
from optcompile.spec import *
spec = OptimizerSpec("T", weight_decay="decoupled")
lr = spec.hyper("lr", domain=Interval(0, oo))
spec.update(spec.grad, lr=lr)
"""

NO_LR = """\
from optcompile.spec import *
spec = OptimizerSpec("T")
a = spec.hyper("a", 0.1)
spec.update(spec.grad, lr=a)
"""


def _snapshot(d: Path) -> dict:
    if not d.exists():
        return {}
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_error_names_file_line_and_expression(name, tmp_path, cache_dir):
    body, line, words, expr = CASES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + body + "\n")
    before = _snapshot(cache_dir)
    with pytest.raises(SpecError) as info:
        compile_spec(path)
    msg = str(info.value)
    assert f"{path}:{line}:" in msg, msg
    for w in words:
        assert w in msg, msg
    if expr is not None:
        assert f"(in `{expr}`)" in msg, msg
    assert info.value.line == line
    assert _snapshot(cache_dir) == before, "a failing compile changed the cache"


@pytest.mark.parametrize("text,line,words", [
    (NO_LR, 2, ["missing required hyperparameter `lr`"]),
    (NO_WD, 2, ["weight_decay='decoupled' needs a `weight_decay` hyperparameter"]),
    ("x = 1\n", 1, ["defines no `spec = OptimizerSpec(...)`"]),
    ("", 1, ["defines no `spec = OptimizerSpec(...)`"]),
])
def test_whole_file_errors(text, line, words, tmp_path, cache_dir):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        compile_spec(path)
    assert f"{path}:{line}:" in str(info.value)
    for w in words:
        assert w in str(info.value)
    assert _snapshot(cache_dir) == {}


def test_missing_file(tmp_path, cache_dir):
    with pytest.raises(SpecError, match="spec file not found"):
        compile_spec(tmp_path / "nope.py")


@pytest.mark.parametrize("name", ["unsupported_function", "spec_raises", "conditional_state_read_unguarded"])
def test_cli_prints_error_without_traceback(name, tmp_path, cache_dir, capsys):
    body, line, words, _ = CASES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + body + "\n")
    assert cli.main(["compile", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("optcompile: error: ") and f"{path}:{line}:" in err
    assert "Traceback" not in err
    assert _snapshot(cache_dir) == {}


def test_cli_subprocess_exit_status(tmp_path):
    """The real entry point: status 1, one line on stderr, no traceback, cache untouched."""
    path = tmp_path / "bad.py"
    path.write_text(HEAD + "spec.update(sympy.tanh(g), lr=lr)\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "OPTCOMPILE_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-m", "optcompile", "compile", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and f"{path}:6:" in r.stderr
    assert r.stderr.count("\n") == 1
    assert not cache.exists()


def test_torch_step_needs_the_torch_layout(tmp_path):
    path = tmp_path / "nostep.py"
    path.write_text(HEAD.replace('weight_decay=None)', 'weight_decay=None, torch_step=False)') +
                    "spec.update(g, lr=lr)\n")
    with pytest.raises(SpecError, match=r"nostep.py:3: torch_step=False is for state_dict='torch'"):
        compile_spec(path)


def test_spec_error_fields():
    e = SpecError("bad thing", "specs/x.py", 12, "a + b")
    assert str(e) == "specs/x.py:12: bad thing (in `a + b`)"
    assert (e.file, e.line, e.reason) == ("specs/x.py", 12, "bad thing")
    assert isinstance(e, ValueError)


def test_valid_spec_compiles(tmp_path, cache_dir):
    """The harness itself: the same header with a correct body compiles (so the cases above fail
    for their own reason, not because the header is broken)."""
    path = tmp_path / "ok.py"
    path.write_text(HEAD + textwrap.dedent("""\
        f = spec.flag("f", False)
        m = spec.state("m", when=f)
        m = spec.assign(m, g + m)
        spec.update(Piecewise((m, f), (g, True)), lr=lr)
    """))
    cls = compile_spec(path)
    assert cls.__name__ == "T"
    assert any(p.suffix == ".py" for p in cache_dir.rglob("*"))


OPTIONAL_INT = """\
from optcompile.spec import *
spec = OptimizerSpec("T", weight_decay=None)
lr = spec.hyper("lr", domain=Interval(0, oo))
t0 = spec.hyper("t0", default=None, type=int, domain=Interval(1, oo))
m = spec.state("m")
m = spec.assign(m, spec.grad / t0, when=~spec.is_none(t0))
spec.update(Piecewise((spec.grad, spec.is_none(t0)), (m, True)), lr=lr)
"""


def test_optional_int_hyperparameter_validation_names_the_argument(tmp_path, cache_dir):
    """``hyper(name, default=None, type=int)``: ``int | None`` in the signature, None accepted,
    anything but an int refused, and the domain checked only for a value; None skips every read."""
    import inspect

    import torch
    path = tmp_path / "optional_int.py"
    path.write_text(OPTIONAL_INT)
    cls = compile_spec(path)
    assert str(inspect.signature(cls).parameters["t0"]) == "t0: int | None = None"
    for bad, why in ((2.5, "t0=2.5 (an int or None)"), (True, "t0=True (an int or None)"), ("3", "t0='3'"),
                     (0, "t0=0")):
        with pytest.raises(ValueError, match=f"Invalid t0: {why}".replace("(", r"\(").replace(")", r"\)")):
            cls([torch.zeros(3, requires_grad=True)], lr=0.1, t0=bad)
    for t0, want in ((None, -0.1 * 2), (4, -0.1 * 2 / 4)):
        p = torch.zeros(3, requires_grad=True)
        opt = cls([p], lr=0.1, t0=t0, foreach=False, triton=False, fused=False)
        p.grad = torch.full((3,), 2.0)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), want))
