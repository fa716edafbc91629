"""optcompile.utils against optimi.utils (the oracle), plus the fixes we document there."""
import pytest
import torch
from torch import nn

import optimi
from optcompile.utils import param_groups_weight_decay, to_low_precision


class Rotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.RoPE = Rotary()
        self.rotary_emb = Rotary()
        self.bn = nn.BatchNorm1d(8)  # float buffers plus the int64 num_batches_tracked
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _model():
    torch.manual_seed(0)
    return Block()


def _dtypes(model):
    return ({n: p.dtype for n, p in model.named_parameters()}, {n: b.dtype for n, b in model.named_buffers()})


# ── param_groups_weight_decay ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"additional_layers": ["emb", "head"]},
                                    {"additional_layers": ("proj",)}])
def test_param_groups_weight_decay_matches_optimi(kwargs):
    model = _model()
    ours = param_groups_weight_decay(model, **kwargs)
    theirs = optimi.param_groups_weight_decay(model, **kwargs)
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs]
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in theirs]


def test_param_groups_weight_decay_rules():
    model = _model()
    no_decay, decay = param_groups_weight_decay(model, weight_decay=0.05, additional_layers=["head"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert sorted(names[id(p)] for p in decay["params"]) == ["emb.weight", "proj.weight"]
    assert "frozen.weight" not in {names[id(p)] for p in no_decay["params"] + decay["params"]}
    # always two groups, no-decay first, even when one is empty
    groups = param_groups_weight_decay(nn.Linear(3, 3, bias=False))
    assert [len(g["params"]) for g in groups] == [0, 1]


# ── to_low_precision ─────────────────────────────────────────────────────────────────────────
# rope_fix: the keyword "rope" is in effect, so our case-insensitive match keeps the buffer of the
# module named "RoPE" in fp32 where optimi (lowercased keyword vs. raw name) casts it.
@pytest.mark.parametrize("kwargs, rope_fix", [
    ({}, True),
    ({"dtype": torch.float16}, True),
    ({"fp32_modules": None, "fp32_buffers": None}, False),
    ({"fp32_modules": (nn.Embedding, nn.LayerNorm)}, True),
    ({"fp32_buffers": [nn.BatchNorm1d, "rotary"]}, False),
    ({"fp32_buffers": nn.BatchNorm1d}, False),
    ({"fp32_modules": (nn.LayerNorm,), "fp32_buffers": ("rope",)}, True),
])
def test_to_low_precision_matches_optimi(kwargs, rope_fix):
    ours, theirs = _model(), _model()
    assert to_low_precision(ours, **kwargs) is ours
    optimi.to_low_precision(theirs, **kwargs)
    assert theirs.RoPE.inv_freq.dtype != torch.float32
    if rope_fix:
        assert ours.RoPE.inv_freq.dtype == torch.float32
        theirs.RoPE.inv_freq.data = theirs.RoPE.inv_freq.float()  # arange(4) is exact in bf16/fp16
    assert _dtypes(ours) == _dtypes(theirs)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_to_low_precision_policy():
    model = to_low_precision(_model())
    params, buffers = _dtypes(model)
    assert params["emb.weight"] == torch.float32  # fp32_modules keep params and buffers
    assert params["proj.weight"] == params["norm.bias"] == params["bn.weight"] == torch.bfloat16
    assert buffers["RoPE.inv_freq"] == buffers["rotary_emb.inv_freq"] == torch.float32  # keyword match
    assert buffers["bn.running_mean"] == torch.bfloat16
    assert buffers["bn.num_batches_tracked"] == torch.int64  # integers are never cast


def test_to_low_precision_bare_string_is_one_keyword():
    """Fixed optimi bug 6: optimi iterates "rope" as the keywords r, o, p, e, so every module whose
    name has one of those letters ("encoder", "rotary_emb") keeps fp32 buffers by accident."""
    model = _model()
    model.add_module("encoder", Rotary())  # contains 'e', 'o', 'r' but not "rope"
    to_low_precision(model, fp32_buffers="rope")
    _, buffers = _dtypes(model)
    assert buffers["RoPE.inv_freq"] == torch.float32
    assert buffers["encoder.inv_freq"] == buffers["rotary_emb.inv_freq"] == torch.bfloat16

    quirk = _model()
    quirk.add_module("encoder", Rotary())
    optimi.to_low_precision(quirk, fp32_buffers="rope")
    assert quirk.encoder.inv_freq.dtype == torch.float32  # the character-split quirk we fixed


def test_to_low_precision_keeps_existing_grads_consistent():
    model = nn.Linear(4, 2)
    model(torch.randn(3, 4)).sum().backward()
    to_low_precision(model)
    assert model.weight.dtype == model.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("make", [list, lambda types: (t for t in types)])
def test_to_low_precision_list_or_generator_of_types(make):
    """optimi raises TypeError from isinstance() for a list and misses the types of a generator."""
    model = to_low_precision(_model(), fp32_modules=make([nn.Embedding, nn.Linear]))
    params, _ = _dtypes(model)
    assert params["proj.weight"] == params["emb.weight"] == torch.float32
    assert params["norm.weight"] == torch.bfloat16


@pytest.mark.parametrize("fp32_modules", ["Embedding", nn.Embedding(2, 2), [nn.Embedding, int], 3])
def test_to_low_precision_bad_fp32_modules(fp32_modules):
    with pytest.raises(TypeError, match="fp32_modules must be nn.Module subclass type"):
        to_low_precision(_model(), fp32_modules=fp32_modules)
    with pytest.raises(TypeError, match="fp32_modules must be nn.Module subclass type"):
        optimi.to_low_precision(_model(), fp32_modules=fp32_modules)


@pytest.mark.parametrize("fp32_buffers", [[3], ["rope", nn.Embedding(2, 2)], (float,), 1.5])
def test_to_low_precision_bad_fp32_buffers(fp32_buffers):
    with pytest.raises(TypeError, match="fp32_buffers items must be str or a nn.Module subclass type"):
        to_low_precision(_model(), fp32_buffers=fp32_buffers)
