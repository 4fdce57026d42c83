"""`nlrw explain`: one explanation per chosen latent, as JSON lines, resumable per batch of latents.

run_dir/explain/explanations.jsonl holds {latent, explanation, raw, model, prompt_hash, batch}
(explanation null and `skipped` set for a latent with no activating examples);
run_dir/explain/manifest.json names the transcoder, examples, config and LLM they came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.config import config_hash
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret.examples import Examples
from nlrw_jax.io import append_batch, claim_run_folder, read_batches, read_json_object


def chosen_latents(cfg, num_latents: int) -> list[int]:
    """explain.latent_ids if given, else explain.latents latents, a seeded random choice (sorted); 0: all."""
    if cfg.explain.latent_ids:
        bad = [i for i in cfg.explain.latent_ids if not 0 <= i < num_latents]
        if bad:
            raise UserError(f"config key explain.latent_ids: {bad} out of range 0..{num_latents - 1}")
        return sorted(set(cfg.explain.latent_ids))
    n = cfg.explain.latents
    if n < 0:
        raise UserError(f"config key explain.latents: {n} must be >= 0 (0 = all latents)")
    if n == 0 or n >= num_latents:
        return list(range(num_latents))
    return sorted(int(i) for i in np.random.default_rng(cfg.explain.seed).choice(num_latents, n, replace=False))


def subject_tokenizer(cfg):
    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.data.tokens import subject_tokenizer_path
    from nlrw_jax.models import hf

    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    return load_tokenizer(subject_tokenizer_path(folder, cfg.data.tokenizer))


def llm_identity(cfg) -> dict:
    return {"backend": cfg.llm.backend, "model": cfg.llm.model, "dtype": cfg.llm.dtype}


def latent_batches(path: Path, latents: list[int], size: int) -> tuple[list[list[int]], dict, list[int]]:
    """(the fixed batches of latents, the complete batches already in `path`, the batch indices to do).
    Batches are fixed by the latent list alone, so a resumed run redoes exactly the missing ones."""
    if size <= 0:
        raise UserError(f"latents per batch must be positive, got {size}")
    batches = [latents[i:i + size] for i in range(0, len(latents), size)]
    done = read_batches(path, {b: len(ls) for b, ls in enumerate(batches)})
    return batches, done, [b for b in range(len(batches)) if b not in done]


def explain_from_config(cfg, progress: bool = True, backend=None) -> Path:
    from nlrw_jax.llm.backends import make_backend

    e = cfg.explain
    ex = Examples(cfg)
    if e.examples_per_decile <= 0 or e.examples_per_decile > ex.data["act_window"].shape[2]:
        raise UserError(f"config key explain.examples_per_decile: {e.examples_per_decile} must be in "
                        f"1..examples.per_decile ({ex.data['act_window'].shape[2]})")
    latents = chosen_latents(cfg, ex.num_latents)
    out = Path(cfg.run_dir) / "explain"
    claim_run_folder(out, {"coder": ex.coder_hash, "examples": ex.manifest["examples"], "explain": config_hash(e),
                           **llm_identity(cfg)})
    path = out / "explanations.jsonl"
    batches, _, todo = latent_batches(path, latents, e.latents_per_batch)
    if todo:
        tok = subject_tokenizer(cfg)
        backend = backend or make_backend(cfg.llm, progress)
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


def load_explanations(cfg) -> dict[int, str | None]:
    """{latent: explanation or None (skipped)} of the run; a file for another transcoder is an error."""
    from nlrw_jax.interpret.examples import load_coder

    out = Path(cfg.run_dir) / "explain"
    path = out / "explanations.jsonl"
    if not path.exists():
        raise UserError(f"{path}: no explanations; run `nlrw explain` first")
    manifest_path = out / "manifest.json"
    manifest = read_json_object(manifest_path, "the explanations cannot be matched to a transcoder: rerun "
                                               "`nlrw explain` in a new run_dir")
    _, _, coder_hash = load_coder(cfg)
    if manifest.get("coder") != coder_hash:
        raise UserError(f"{path}: explanations of another transcoder ({manifest.get('coder')}; this run's is "
                        f"{coder_hash})")
    result = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n}: not a JSON record (a torn or garbled line); rerun `nlrw explain` to "
                            f"redo its batch") from None
        latent = rec.get("latent") if isinstance(rec, dict) else None
        if not isinstance(latent, int) or isinstance(latent, bool):
            raise UserError(f"{path}:{n}: not an explanation record (field 'latent' missing or not an integer)")
        text = rec.get("explanation")
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{n}: field 'explanation' of latent {latent} is a {type(text).__name__}, "
                            f"not a string or null")
        result[latent] = text
    return result
