#!/usr/bin/env bash
# The main job (README quick start): set up .venv, compile the built-in specs, train a small model
# with a generated optimizer next to torch.optim's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/optcompile compile --all
.venv/bin/python examples/train.py "$@"
