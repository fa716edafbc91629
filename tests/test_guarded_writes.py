"""Writes under a host guard in the eager and foreach printers (codegen/tensor_code.py).

A temporary the code owns may be updated in place; the caller's ``p.grad`` never. After
``if maximize: grad = -grad`` the name ``grad`` is the code's own tensor only where the guard held,
so the L2 decay that follows must build a new tensor (it used to ``grad.add_(param)`` into the
caller's gradient when ``maximize`` was False). An identity write ``grad ← grad`` prints nothing,
and under a guard no empty ``if``.
"""
import pytest
import sympy
import torch

from optcompile.codegen.tensor_code import Dialect, ForeachDialect, emit_body
from optcompile.compiler import as_spec, build_program
from optcompile.ir import GRAD, PARAM, Assign
from optcompile.loader import builtin_class
from optcompile.paths import builtin_specs
from optimizers import BY_STEM, backend_params

MAXIMIZE = sympy.Symbol("maximize")
DIALECTS = {"eager": Dialect(), "foreach": ForeachDialect()}


def _prog():
    return build_program(as_spec(next(p for p in builtin_specs() if p.stem == "adam")))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_write_under_a_guard_is_not_owned_where_the_guard_fails(dialect):
    decay = sympy.Symbol("weight_decay", real=True)
    stmts = [Assign(GRAD, -GRAD, MAXIMIZE), Assign(GRAD, GRAD + decay * PARAM)]
    lines, _ = emit_body(_prog(), DIALECTS[dialect], stmts)
    in_place = "grad.add_(" if dialect == "eager" else "torch._foreach_add_(grad,"
    assert not any(in_place in line for line in lines), lines
    # under the same guard the code's own tensor is still updated in place
    lines, _ = emit_body(_prog(), DIALECTS[dialect], [Assign(GRAD, -GRAD, MAXIMIZE),
                                                      Assign(GRAD, GRAD + decay * PARAM, MAXIMIZE)])
    assert any(in_place in line for line in lines), lines


@pytest.mark.parametrize("dialect", DIALECTS)
def test_identity_write_prints_nothing_and_no_empty_if(dialect):
    lines, _ = emit_body(_prog(), DIALECTS[dialect], [Assign(GRAD, -GRAD), Assign(GRAD, GRAD, MAXIMIZE),
                                                      Assign(GRAD, GRAD + 1)])
    compile("\n".join(lines), "<body>", "exec")  # an `if` without a body: IndentationError
    assert not any(line.startswith("if ") for line in lines), lines


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("stem", ["adagrad", "rmsprop", "sgd"])
def test_l2_decay_after_maximize_leaves_the_callers_grad_alone(stem, backend, maximize):
    """The repro: maximize=False, weight_decay=0.5 turned p.grad 1.0 into 1.5 (eager, foreach)."""
    from optimizers import BACKENDS
    p = torch.nn.Parameter(torch.ones(7))
    p.grad = torch.ones(7)
    opt = builtin_class(stem)([p], lr=1e-2, weight_decay=0.5, maximize=maximize, **BY_STEM[stem].stateful,
                              **BACKENDS[backend].flags)
    opt.step()
    assert torch.equal(p.grad, torch.ones(7)), f"p.grad became {p.grad.tolist()}"
    assert not torch.equal(p.detach(), torch.ones(7))
