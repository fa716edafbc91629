"""generated/ is a product: it must be exactly what the compiler produces from specs/ today."""
import difflib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate(out: Path, seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    subprocess.run([sys.executable, "-m", "optcompile", "compile", "--all", "--out", str(out)], check=True,
                   cwd=ROOT, env=env, capture_output=True, text=True)


def test_generated_is_fresh_and_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _generate(a, "0")
    _generate(b, "12345")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between PYTHONHASHSEEDs"
    checked_in = ROOT / "generated"
    stale = []
    for name in names:
        want = (a / name).read_text()
        have = (checked_in / name).read_text() if (checked_in / name).exists() else ""
        if want != have:
            diff = "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True), f"generated/{name}",
                                                "fresh", n=1))
            stale.append(diff[:3000])
    extra = sorted(p.name for p in checked_in.iterdir() if p.suffix in (".py", ".c") and p.name not in names)
    assert not stale and not extra, (
        "generated/ is stale: run `optcompile compile --all --out generated`\n" + "\n".join(stale)
        + (f"\nfiles with no spec: {extra}" if extra else ""))
