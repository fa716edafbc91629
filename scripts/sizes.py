"""Line counts: each built-in spec next to the code generated from it (the "once, not three
times" claim, measured). ``--readme`` rewrites the table in README.md between its markers;
``--check`` exits 1 if that table is stale."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- sizes:begin -->", "<!-- sizes:end -->"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def table() -> str:
    rows = []
    for spec in sorted((ROOT / "specs").glob("*.py")):
        if spec.name.startswith("_"):
            continue
        gen = ROOT / "generated"
        stem = spec.stem
        name = re.search(r'OptimizerSpec\("(\w+)"', spec.read_text()).group(1)
        py, tr, c = (_lines(gen / f"{stem}{suffix}") for suffix in (".py", "_triton.py", "_fused.c"))
        rows.append(f"| {name} | {_lines(spec)} | {py} / {tr or '–'} / {c or '–'} |")
    return "\n".join(rows)


def main() -> int:
    current = table()
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = block.sub(lambda _: f"{BEGIN}\n{current}\n{END}", text)
    if "--readme" in sys.argv:
        readme.write_text(new)
    elif "--check" in sys.argv:
        if new != text:
            print("README's size table is stale: run `python scripts/sizes.py --readme`")
            return 1
    else:
        print(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
