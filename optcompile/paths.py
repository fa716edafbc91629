"""Where specs/, templates/ and generated/ live: the source checkout first, the installed
package's data second (the wheel maps them to ``optcompile/_data/``)."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PKG.parent / name, _PKG / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"optcompile data folder {name!r} not found next to {_PKG}")


def specs_dir() -> Path:
    return data_dir("specs")


def templates_dir() -> Path:
    return data_dir("templates")


def generated_dir() -> Path:
    return data_dir("generated")


def builtin_specs() -> list[Path]:
    return sorted(p for p in specs_dir().glob("*.py") if not p.name.startswith("_"))
