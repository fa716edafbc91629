"""`compile_spec` with specs built in memory: each is keyed by what it declares."""
import torch

from optcompile import compile_spec
from optcompile.spec import Interval, OptimizerSpec, oo


def _scaled_sgd(name: str, scale: float) -> OptimizerSpec:
    spec = OptimizerSpec(name, weight_decay=None, doc=f"{name}: SGD with a scaled gradient")
    lr = spec.hyper("lr", domain=Interval(0, oo))
    spec.update(scale * spec.grad, lr=lr)
    return spec


def test_specs_built_by_one_function_do_not_share_a_cache_entry():
    classes = [compile_spec(_scaled_sgd("Scaled", 2)), compile_spec(_scaled_sgd("Scaled", 5))]
    for cls, scale in zip(classes, (2, 5)):
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        cls([p], lr=1.0, fused=False).step()
        assert torch.equal(p.detach(), torch.full((3,), -float(scale)))
        assert cls.__doc__.startswith("Scaled: SGD with a scaled gradient")


def test_same_in_memory_spec_twice_is_a_cache_hit():
    from optcompile.loader import CompileReport, compile_to_cache
    first, second = CompileReport(), CompileReport()
    compile_to_cache(_scaled_sgd("Twice", 3), first)
    compile_to_cache(_scaled_sgd("Twice", 3), second)
    assert all(hit for _, hit in second.files) and first.files[0][0] == second.files[0][0]
