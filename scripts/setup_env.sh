#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dev requirements and an editable optcompile.
# Reused when requirements-dev.txt is unchanged, so the second run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPTCOMPILE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.requirements.sha"
want=$(sha256sum requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    echo "$want" > "$stamp"
fi
