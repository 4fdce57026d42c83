"""`nlrw explain`: one explanation per chosen latent from its activating examples, as JSON lines
(explain/explanations.jsonl), resumable per batch of latents."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret.explain import latent_batches
from nlrw_jax.io import append_batch
from nlrw_jax.stages.common import LazyBackend, llm_identity, load_examples, model_identity, run_folder, \
    subject_tokenizer


def chosen_latents(cfg: Config, num_latents: int) -> list[int]:
    """explain.latent_ids if given, else explain.latents latents, a seeded random choice (sorted); 0: all."""
    if cfg.explain.latent_ids:
        bad = [i for i in cfg.explain.latent_ids if not 0 <= i < num_latents]
        if bad:
            raise UserError(f"config key explain.latent_ids: {bad} out of range 0..{num_latents - 1}")
        return sorted(set(cfg.explain.latent_ids))
    n = cfg.explain.latents
    if n == 0 or n >= num_latents:
        return list(range(num_latents))
    return sorted(int(i) for i in np.random.default_rng(cfg.explain.seed).choice(num_latents, n, replace=False))


def run(cfg: Config, progress: bool = True, backend=None) -> Path:
    e = cfg.explain
    ex = load_examples(cfg)
    if e.examples_per_decile > ex.data["act_window"].shape[2]:
        raise UserError(f"config key explain.examples_per_decile: {e.examples_per_decile} must be in "
                        f"1..examples.per_decile ({ex.data['act_window'].shape[2]}) of the examples")
    latents = chosen_latents(cfg, ex.num_latents)
    run = run_folder(cfg)
    ident = {**model_identity(cfg), "coder": ex.coder_hash, "examples": run.identity_hash("examples"),
             "explain": identity(e), **llm_identity(cfg)}
    with run.claim("explain", ident):
        path = run.explanations
        batches, _, todo = latent_batches(path, latents, e.latents_per_batch)
        if todo:
            tok = subject_tokenizer(cfg)
            backend = backend or LazyBackend(cfg, progress)
            bar = tqdm(total=len(latents), initial=len(latents) - sum(len(batches[b]) for b in todo),
                       desc="explain", unit="latent", disable=not progress)
            for b in todo:
                records, prompts, slots = [], [], []
                for latent in batches[b]:
                    windows = ex.activating(latent, e.examples_per_decile)
                    if not windows:
                        records.append({"latent": latent, "explanation": None, "skipped": "no activating examples"})
                        continue
                    toks, acts = ex.windows(windows, latent)
                    messages = P.explainer_messages([(P.token_strings(tok, t), a) for t, a in zip(toks, acts)])
                    ids = backend.render(messages, P.EXPLANATION_PREFIX)
                    records.append({"latent": latent, "prompt_hash": hashlib.sha256(
                        json.dumps(ids).encode()).hexdigest()[:16], "examples": len(windows)})
                    prompts.append(ids)
                    slots.append(len(records) - 1)
                texts = backend.generate(prompts, e.max_tokens) if prompts else []
                for slot, text in zip(slots, texts):
                    records[slot].update(explanation=P.parse_explanation(text), raw=text)
                for r in records:
                    r.update(batch=b, model=cfg.llm.model)
                append_batch(path, records)
                bar.update(len(batches[b]))
            bar.close()
    return path
