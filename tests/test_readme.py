"""The README's "write your own optimizer" spec, run exactly as printed, against the paper's math."""
import re
from pathlib import Path

import pytest
import torch

import optcompile

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_spec() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith("# adabelief.py"))


def _adabelief_reference(params, grads_seq, lr, betas, eps, wd):
    """AdaBelief by the paper (Algorithm 2), decoupled decay, in float64."""
    b1, b2 = betas
    ps = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    s = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_seq, start=1):
        for i, (p, g) in enumerate(zip(ps, grads)):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            s[i] = b2 * s[i] + (1 - b2) * (g - m[i]) ** 2 + eps
            p.mul_(1 - lr * wd)
            p.sub_(lr * (m[i] / (1 - b1**t)) / ((s[i] / (1 - b2**t)).sqrt() + eps))
    return ps


@pytest.mark.parametrize("backend", [dict(foreach=False), dict(foreach=True)])
def test_readme_spec_compiles_and_matches_paper(tmp_path, backend):
    path = tmp_path / "adabelief.py"
    path.write_text(_readme_spec())
    AdaBelief = optcompile.compile_spec(path)
    assert AdaBelief.__name__ == "AdaBelief" and "Zhuang" in AdaBelief.__doc__
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(13, requires_grad=True)]
    start = [p.detach().clone() for p in params]
    grads_seq = [[torch.randn_like(p) for p in params] for _ in range(20)]
    opt = AdaBelief(params, lr=1e-2, weight_decay=0.1, eps=1e-8, fused=False, triton=False, **backend)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    ref = _adabelief_reference(start, grads_seq, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    for p, r in zip(params, ref):
        # fp32 vs fp64 reference over 20 steps: a few ulps of accumulated rounding
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-6, atol=2e-7)
    assert set(opt.state[params[0]]) == {"exp_avg", "exp_avg_var", "kahan_comp"}


def test_readme_quick_start_commands_exist():
    text = README.read_text()
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in text
        assert (README.parent / cmd.split()[1]).exists()


def test_readme_size_table_is_current():
    import subprocess
    import sys
    check = subprocess.run([sys.executable, str(README.parent / "scripts" / "sizes.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
