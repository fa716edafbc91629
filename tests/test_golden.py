"""Golden outputs of the compiler's middle: the IR after lowering and after each pass, and the
strings the host and torch printers produce. A change here is a change in generated code: look at
the diff, then refresh with ``OPTCOMPILE_UPDATE_GOLDEN=1 pytest tests/test_golden.py``."""
import os
from pathlib import Path

import pytest
import sympy

from optcompile import kernel_plan
from optcompile.codegen.host import pyexpr
from optcompile.codegen.tensor_code import Dialect, ForeachDialect, TensorCode
from optcompile.compiler import as_spec, build_program
from optcompile.ir import Assign
from optcompile.lower import lower
from optcompile.passes import PASS_NAMES

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "ir"
UPDATE = os.environ.get("OPTCOMPILE_UPDATE_GOLDEN") == "1"


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"golden file {name} is missing; create it with OPTCOMPILE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} changed; refresh with OPTCOMPILE_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("spec", ["adamw", "sgd", "stableadamw", "radam"])
def test_ir_after_each_pass(spec):
    s = as_spec(ROOT / "specs" / f"{spec}.py")
    _check(f"{spec}.lower.txt", lower(s).dump())
    for name in PASS_NAMES:
        _check(f"{spec}.after_{name}.txt", build_program(s, until=name).dump())
    _check(f"{spec}.final.txt", build_program(s).dump())
    _check(f"{spec}.plan.txt", kernel_plan.build(build_program(s)).dump())


@pytest.mark.parametrize("spec", ["muon"])
def test_plan_with_segments(spec):
    """A kernel plan with torch segments between its stages (Muon: Newton–Schulz between the
    momentum kernel and the param-update kernel)."""
    _check(f"{spec}.plan.txt", kernel_plan.build(build_program(as_spec(ROOT / "specs" / f"{spec}.py"))).dump())


def test_passes_are_idempotent():
    from optcompile.passes import run_passes
    for spec in ("adamw", "sgd", "adan"):
        once = run_passes(lower(as_spec(ROOT / "specs" / f"{spec}.py")))
        assert run_passes(once).dump() == once.dump()


b1, t, lr, x = sympy.symbols("beta1 step lr x", real=True)


@pytest.mark.parametrize("expr, text", [
    ((b1**t - b1) / (b1**t - 1), "(-beta1 + _pow(beta1, step))/(_pow(beta1, step) - 1)"),
    (sympy.sqrt(x), "_sqrt(x)"),
    (sympy.Rational(1, 2) * x, "(0.5)*x"),
    (sympy.Max(1, x), "_max(1, x)"),
    (sympy.Piecewise((x, x > 5), (0, True)), "((x) if ((x > 5)) else (0))"),
    (sympy.Eq(sympy.Mod(t, 6), 0), "((step % 6) == 0)"),
])
def test_host_printer(expr, text):
    assert pyexpr(expr) == text


def _emit(dialect, target, expr, stored=("param", "exp_avg", "exp_avg_sq")):
    prog = build_program(as_spec(ROOT / "specs" / "adamw.py"))
    code = TensorCode(prog, dialect)
    code.stored = set(stored)
    code.host |= {"c", "lr", "eps"}
    code.statement(Assign(sympy.Symbol(target, real=True), expr))
    return code.lines


m, v, g, p, c, eps = sympy.symbols("exp_avg exp_avg_sq grad param c eps", real=True)


def test_torch_printer_uses_in_place_fused_ops():
    assert _emit(Dialect(), "exp_avg", c * m + (1 - c) * g) == ["exp_avg.lerp_(grad, 1 - c)"]
    assert _emit(Dialect(), "exp_avg_sq", c * v + (1 - c) * g**2) == [
        "if c != 1:", "    exp_avg_sq.mul_(c)", "exp_avg_sq.addcmul_(grad, grad, value=1 - c)"]
    assert _emit(Dialect(), "param", p - lr * m / (sympy.sqrt(v) + eps)) == [
        "_t0 = torch.sqrt(exp_avg_sq)", "_t0.add_(eps)", "param.addcdiv_(exp_avg, _t0, value=-lr)"]
    assert _emit(ForeachDialect(), "exp_avg", c * m + (1 - c) * g) == ["torch._foreach_lerp_(exp_avg, grad, 1 - c)"]


def test_finalize_is_the_last_pass_and_show_after_can_print_it():
    from optcompile.passes import PIPELINE
    assert PASS_NAMES[-1] == "finalize" and all(p.__name__ in PASS_NAMES for p in PIPELINE)
    s = as_spec(ROOT / "specs" / "adamw.py")
    assert build_program(s, until="finalize").dump() == build_program(s).dump()
    assert "finalize" not in build_program(s, until="add_kahan_summation").passes


def test_generated_python_reads_like_hand_written_code():
    import re
    from optcompile.compiler import generate_sources
    text = generate_sources(as_spec(ROOT / "specs" / "adam.py"))[".py"]
    assert "if decay != 0:" in text and "1 - decay != 1" not in text
    assert "one_minus_beta1_t = 1 - beta1_t" in text and not re.search(r"\bh\d+\b", text)
    for fn in text.split("\ndef ")[1:]:  # temporaries are numbered in order of definition
        defined = [int(n) for n in re.findall(r"^\s*_t(\d+) = ", fn, flags=re.M)]
        assert defined == sorted(defined), fn


def test_fused_interface_states_its_spill_buffers():
    import json
    from optcompile.compiler import generate_sources
    for spec in ("adamw", "stableadamw"):
        c = generate_sources(as_spec(ROOT / "specs" / f"{spec}.py"))["_fused.c"]
        iface = json.loads(next(line for line in c.splitlines() if line.startswith("// interface: "))[14:])
        assert iface["spills"] == sum(b.startswith("spill_") for b in iface["buffers"])


def test_every_printer_spells_every_dsl_function():
    """The DSL's functions (spec.SUPPORTED_FUNCTIONS) and powers, on the host, torch (0-dim), Triton,
    C fp32 and C double printers: one decision tree (codegen/printing.py), each printer's spelling.
    A function missing from a printer's table raises instead of printing sympy's default."""
    from optcompile.codegen import c, host, tensor_code, triton
    from optcompile.ir import Clamp
    from optcompile.spec import SUPPORTED_FUNCTIONS
    x, y = sympy.symbols("x y", real=True)
    printers = [host.pyexpr, tensor_code._DEVICE_PRINTER.doprint, triton.TritonPrinter().doprint, c.cexpr,
                c._D.doprint]
    golden = {
        sympy.sqrt(x): ["_sqrt(x)", "torch.sqrt(x)", "tl.sqrt(x)", "sqrtf(x)", "sqrt(x)"],
        1 / sympy.sqrt(x): ["_rsqrt(x)", "torch.rsqrt(x)", "tl.rsqrt(x)", "(1.0f / sqrtf(x))", "(1.0 / sqrt(x))"],
        x ** 0.5: ["_sqrt(x)", "torch.sqrt(x)", "tl.sqrt(x)", "sqrtf(x)", "sqrt(x)"],
        sympy.Abs(x): ["abs(x)", "torch.abs(x)", "tl.abs(x)", "fabsf(x)", "fabs(x)"],
        sympy.exp(x): ["_exp(x)", "torch.exp(x)", "tl.exp(x)", "expf(x)", "exp(x)"],
        sympy.log(x): ["_log(x)", "torch.log(x)", "tl.log(x)", "logf(x)", "log(x)"],
        x ** 3: ["_pow(x, 3)", "x**3", "x * x * x", "(x*x*x)", "pow(x, 3.0)"],
        1 / x: ["_reciprocal(x)", "(1.0 / x)", "1.0/x", "(1.0f / (x))", "(1.0 / x)"],
        x ** sympy.Rational(1, 3): ["_pow(x, 0.3333333333333333)", "x**(0.3333333333333333)",
                                    "libdevice.pow(x, 0.3333333333333333)", "powf(x, 0.3333333333333333f)",
                                    "pow(x, 0.3333333333333333)"],
    }
    for e, want in golden.items():
        assert [p(e) for p in printers] == want, e
    others = {"sign": sympy.sign(x), "Max": sympy.Max(x, y), "Min": sympy.Min(x, y), "clamp": Clamp(x, -y, y),
              "Piecewise": sympy.Piecewise((x, x > y), (y, True))}
    assert {"sqrt", "Abs", "exp", "log", "Mod"} | set(others) == set(SUPPORTED_FUNCTIONS)
    for e in others.values():  # forms with semantics of their own: each printer has a method (golden elsewhere)
        assert all(p(e) for p in printers)
    assert host.pyexpr(sympy.Mod(sympy.Symbol("step"), 3)) == "(step % 3)"  # Mod: host scalars only
    with pytest.raises(NotImplementedError, match="VecPrinter has no spelling for exp"):
        c._V.doprint(sympy.exp(x))  # the bf16 SIMD loop: has_vector_form says no first
    assert c.vexpr(sympy.exp(x)) is None and c.vexpr(sympy.Abs(x)) == "oc_vabs(x)"
