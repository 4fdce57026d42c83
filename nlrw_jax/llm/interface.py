"""What every LLM backend offers (explainer, scorers and simulator all use it).

    backend.render(messages, answer_prefix) -> token ids of a chat prompt whose assistant turn
                                               starts with `answer_prefix` (forced)
    backend.candidate_ids(candidates)       -> the token id of each single-token answer
    backend.generate(prompts, max_tokens)   -> greedy completions (text)
    backend.next_token_logprobs(prompts, candidates) -> [n, len(candidates)] log-probs of the
                                               next token; -inf where a candidate is not among
                                               the top `llm.top_logprobs`
    backend.slot_logprobs(prompts, slots, candidates) -> per prompt [len(slots[i]), len(candidates)]:
                                               the log-probs of the token after each slot index of
                                               the prompt, from one forward pass (all_at_once)

Prompts are token ids rendered by our own tokenizer, so every backend sees exactly the same
tokens. The backends (local.py, vllm_engine.py, openai_pool.py) import this module, never each
other; backends.make_backend picks one.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError

if TYPE_CHECKING:
    from nlrw_jax.config import LLMConfig


def check_slots(prompts: list[list[int]], slots: list[list[int]]) -> None:
    """Each slot must have a next token in its prompt (a bug in the caller otherwise)."""
    if len(slots) != len(prompts) or any(s and not 0 <= min(s) <= max(s) < len(p) - 1
                                         for p, s in zip(prompts, slots)):
        raise ValueError("slot_logprobs: a slot outside its prompt (or not followed by a token)")


class Backend(abc.ABC):
    name = "base"

    def __init__(self, cfg: LLMConfig, tokenizer, progress: bool = True):
        self.cfg, self.tokenizer, self.progress = cfg, tokenizer, progress
        self.model_name = cfg.model

    # -- prompts -----------------------------------------------------------------------------
    def render(self, messages: list[dict], answer_prefix: str = "") -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text + answer_prefix, add_special_tokens=False)

    def candidate_ids(self, candidates: Sequence[str]) -> list[int]:
        """Each candidate answer must be one token of this model's vocabulary."""
        ids = []
        for c in candidates:
            enc = self.tokenizer.encode(c, add_special_tokens=False)
            if len(enc) != 1:
                raise UserError(f"llm.model {self.model_name!r}: answer {c!r} is not a single token "
                                f"({len(enc)} tokens); the scorers need each of {list(candidates)} as one token")
            ids.append(enc[0])
        return ids

    def health(self) -> dict:
        """Counters for live metrics (the stages' TensorBoard progress); a remote backend adds its
        retries and how many endpoints are up."""
        return {}

    def bar(self, total: int, desc: str):
        """A prompts bar (rate, ETA). Stages pass their own, spanning all their calls, as `bar=`."""
        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress, smoothing=0.1)

    def _bar(self, bar, total: int, desc: str):
        return (bar, False) if bar is not None else (self.bar(total, desc), True)

    # -- work ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], max_tokens: int, bar=None) -> list[str]:
        """Greedy completions of token-id prompts."""

    @abc.abstractmethod
    def next_token_logprobs(self, prompts: list[list[int]], candidates: Sequence[str], bar=None) -> np.ndarray:
        """[n, len(candidates)] next-token log-probs; -inf outside the top llm.top_logprobs."""

    @abc.abstractmethod
    def slot_logprobs(self, prompts: list[list[int]], slots: list[list[int]], candidates: Sequence[str],
                      bar=None) -> list[np.ndarray]:
        """Per prompt [len(slots[i]), len(candidates)]: log-probs of the token at s + 1 given the prompt
        up to s, for each slot index s; -inf outside the top llm.top_logprobs. `bar` counts slots."""

    def close(self):
        pass
