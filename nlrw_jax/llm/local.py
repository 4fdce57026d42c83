"""The `local` backend: transformers in this process (CPU or GPU); the shared prefix's KV cache is
computed once per batch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from nlrw_jax.llm.interface import Backend, check_slots
from nlrw_jax.llm.models import load_transformers, require_llm

if TYPE_CHECKING:
    from nlrw_jax.config import LLMConfig


class LocalBackend(Backend):
    """transformers in this process (CPU or GPU); for the embedded default and for tests."""

    name = "local"

    def __init__(self, cfg: LLMConfig, progress: bool = True):
        self.torch = require_llm("torch", "llm.backend=local")
        tokenizer, self.lm = load_transformers(cfg.model, cfg.dtype)
        super().__init__(cfg, tokenizer, progress)
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

    def slot_logprobs(self, prompts, slots, candidates, bar=None):
        torch = self.torch
        check_slots(prompts, slots)
        cand = torch.tensor(self.candidate_ids(candidates))
        out = []
        bar, own = self._bar(bar, sum(len(s) for s in slots), "simulate")
        with torch.inference_mode():  # plain batches: every row has a long own tail (its window's lines),
            for lo in range(0, len(prompts), self.cfg.batch_size):  # so _prefix_batches would cut after each
                hi = min(lo + self.cfg.batch_size, len(prompts))
                for logp in self._slot_logprobs(prompts[lo:hi], slots[lo:hi]):
                    top = logp.topk(self.cfg.top_logprobs, dim=-1).indices
                    keep = (top[:, :, None] == cand[None, None, :]).any(1)
                    out.append(torch.where(keep, logp[:, cand], -math.inf).float().numpy())
                bar.update(sum(len(s) for s in slots[lo:hi]))
        if own:
            bar.close()
        return out

    def _slot_logprobs(self, batch: list[list[int]], slots: list[list[int]]):
        """Per prompt, log-probs [len(slots), vocab] at its slots. The common prefix (up to the first
        slot) runs once and its KV cache is shared; the rest is right-padded, and the vocabulary
        projection runs at the slots only (all positions would be [batch, tokens, 49k] floats)."""
        torch = self.torch
        shared = min(_common_prefix(batch), min(min(s) for s in slots if s) if any(slots) else 0)
        ids, mask, pos, cache = self._after_shared_prefix(batch, shared, left_pad=False)
        hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                       use_cache=cache is not None).last_hidden_state
        head = self.lm.get_output_embeddings()
        return [torch.log_softmax(head(hidden[i, torch.tensor(s, dtype=torch.long) - shared]).float(), dim=-1)
                for i, s in enumerate(slots)]

    def _last_logprobs(self, batch: list[list[int]]):
        """Next-token log-probs after each prompt; the common prefix runs once, its KV cache is shared."""
        torch = self.torch
        shared = _common_prefix(batch)
        shared = min(shared, min(len(p) for p in batch) - 1)  # every row keeps at least one own token
        # left padding after the shared prefix: every row ends at -1
        ids, mask, pos, cache = self._after_shared_prefix(batch, shared, left_pad=True)
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=cache is not None, logits_to_keep=1).logits  # the last position only
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def _after_shared_prefix(self, batch: list[list[int]], shared: int, left_pad: bool):
        """(ids, attention mask, position ids, KV cache) of a batch whose first `shared` tokens are
        common: the prefix runs once and its cache is repeated per row; the rows' own tokens are
        padded on the left (every row ends at -1) or on the right (every row starts at 0)."""
        torch = self.torch
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
        for i, r in enumerate(rest):
            lo = width - len(r) if left_pad else 0
            ids[i, lo:lo + len(r)] = torch.tensor(r)
            mask[i, shared + lo:shared + lo + len(r)] = 1
            pos[i, lo:lo + len(r)] = torch.arange(shared, shared + len(r))
        return ids, mask, pos, cache

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
