"""make_backend: the LLM backend named by `llm.backend` (the interface is in interface.py).

`local` (transformers in this process, local.py), `vllm` (the offline engine, vllm_engine.py) and
`openai` (a pool of OpenAI-compatible servers, openai_pool.py). torch, transformers and vLLM are
imported when a backend is built, so importing this module needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nlrw_jax.errors import UserError
from nlrw_jax.llm.interface import Backend
from nlrw_jax.llm.local import LocalBackend
from nlrw_jax.llm.openai_pool import OpenAIBackend
from nlrw_jax.llm.vllm_engine import VLLMBackend

if TYPE_CHECKING:
    from nlrw_jax.config import LLMConfig

BACKENDS = {"local": LocalBackend, "vllm": VLLMBackend, "openai": OpenAIBackend}


def make_backend(cfg: LLMConfig, progress: bool = True) -> Backend:
    """cfg: the `llm` config section."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"config key llm.backend: {cfg.backend!r} is not one of {list(BACKENDS)}")
    return BACKENDS[cfg.backend](cfg, progress)
