"""`nlrw explain`: one explanation per chosen latent from its activating examples, as JSON lines
(explain/explanations.jsonl), resumable per batch of latents. explain.style=contrastive adds
counter-examples from the latents with the closest decoder directions; explain.from_delphi imports
eai-delphi's explanation files instead of running the LLM; `nlrw export-delphi` writes the examples and
explanations in delphi's layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.config import Config, identity, stage_llm
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import delphi_format as D
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret.examples import NO_WINDOW, encoder
from nlrw_jax.interpret.explain import latent_batches
from nlrw_jax.io import append_batch
from nlrw_jax.stages.common import LazyBackend, llm_identity, load_coder, load_examples, load_explanations, \
    model_identity, run_folder, subject_tokenizer
from nlrw_jax.stages.live import live_progress


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


class Neighbours:
    """Counter-examples for contrastive explanations: for a latent, activating windows of the latents
    with the most similar decoder directions (cosine of W_dec rows) on which the latent is silent.
    A closer latent that cannot serve (dead: no activating windows; or the latent fires on all of its
    windows) is passed over and counted in the record; the search stops after SCAN x `count` latents."""

    SCAN = 8

    def __init__(self, ex, count: int, per_neighbour: int):
        w = np.asarray(ex.params["W_dec"], np.float32)
        self.unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        self.live = (ex.data["act_window"] != NO_WINDOW).any(axis=(1, 2))
        self.ex, self.count, self.per_neighbour = ex, count, per_neighbour

    def __call__(self, latent: int) -> tuple[list[int], list[int], int]:
        """(neighbours, counter-example window ids, latents passed over for closer than the last neighbour)."""
        sims = self.unit @ self.unit[latent]
        sims[latent] = -np.inf
        live_sims = np.where(self.live, sims, -np.inf)
        order = [int(i) for i in np.argsort(-live_sims, kind="stable")[:self.SCAN * self.count]
                 if np.isfinite(live_sims[i])]
        per_decile = self.ex.data["act_window"].shape[2]
        own = set(self.ex.activating(latent, per_decile))
        nbs, windows = [], []
        for first in range(0, len(order), self.count):  # a block of candidates at a time: one encoder call
            block = order[first:first + self.count]
            # a neighbour's strongest windows first, a few spare, as the latent may fire on some
            cands = {nb: [w for w in self.ex.activating(nb, per_decile) if w not in own][:4 * self.per_neighbour]
                     for nb in block}
            flat = sorted({w for c in cands.values() for w in c})
            acts = self.ex.windows(flat, latent)[1].max(axis=1) if flat else np.zeros(0)
            silent = {w for w, a in zip(flat, acts) if a <= 0}
            for nb in block:
                picked = [w for w in cands[nb] if w in silent and w not in windows][:self.per_neighbour]
                if picked and len(nbs) < self.count:
                    nbs.append(nb)
                    windows += picked
            if len(nbs) == self.count:
                break
        if not nbs:
            raise UserError(f"explain.style=contrastive: no counter-examples for latent {latent}: of the other latents "
                            f"with activating examples, the {len(order)} nearest have no window where it is silent")
        passed = int((sims > sims[nbs[-1]]).sum()) - (len(nbs) - 1)
        return nbs, windows, passed


def run(cfg: Config, progress: bool = True, backend=None) -> Path:
    e = cfg.explain
    if e.from_delphi:
        return import_delphi(cfg)
    ex = load_examples(cfg)
    if e.examples_per_decile > ex.data["act_window"].shape[2]:
        raise UserError(f"config key explain.examples_per_decile: {e.examples_per_decile} must be in "
                        f"1..examples.per_decile ({ex.data['act_window'].shape[2]}) of the examples")
    latents = chosen_latents(cfg, ex.num_latents)
    run = run_folder(cfg)
    ident = {**model_identity(cfg), "coder": ex.coder_hash, "examples": run.identity_hash("examples"),
             "explain": identity(e), **llm_identity(cfg, "explain")}
    with run.claim("explain", ident):
        path = run.explanations
        batches, _, todo = latent_batches(path, latents, e.latents_per_batch)
        if todo:
            tok = subject_tokenizer(cfg)
            backend = backend or LazyBackend(cfg, progress, "explain")
            neighbours = Neighbours(ex, e.neighbours, e.neighbour_windows) if e.style == "contrastive" else None
            bar = live_progress(cfg, "explain", backend, progress, total=len(latents),
                                initial=len(latents) - sum(len(batches[b]) for b in todo), desc="explain", unit="latent")
            for b in todo:
                records, prompts, slots = [], [], []
                for latent in batches[b]:
                    windows = ex.activating(latent, e.examples_per_decile)
                    if not windows:
                        records.append({"latent": latent, "explanation": None, "skipped": "no activating examples"})
                        continue
                    toks, acts = ex.windows(windows, latent)
                    shown = [(P.token_strings(tok, t), a) for t, a in zip(toks, acts)]
                    extra = {}
                    if neighbours:
                        nbs, counter, passed = neighbours(latent)
                        counter_toks = ex.rows.window_tokens(np.asarray(counter), ex.width)
                        messages = P.explainer_contrastive_messages(
                            shown, [P.token_strings(tok, t) for t in counter_toks])
                        extra = {"neighbours": nbs, "counter_examples": len(counter), "neighbours_passed_over": passed}
                    else:
                        messages = P.explainer_messages(shown)
                    ids = backend.render(messages, P.EXPLANATION_PREFIX)
                    records.append({"latent": latent, "prompt_hash": hashlib.sha256(
                        json.dumps(ids).encode()).hexdigest()[:16], "examples": len(windows), **extra})
                    prompts.append(ids)
                    slots.append(len(records) - 1)
                texts = backend.generate(prompts, e.max_tokens) if prompts else []
                for slot, text in zip(slots, texts):
                    records[slot].update(explanation=P.parse_explanation(text), raw=text)
                for r in records:
                    r.update(batch=b, model=stage_llm(cfg, "explain").model)
                append_batch(path, records)
                bar.update(len(batches[b]))
            bar.close()
    return path


def import_delphi(cfg: Config) -> Path:
    """explain.from_delphi: eai-delphi's explanation files as this run's explanations, no LLM. Every
    latent the folder explains is imported; one the coder does not have is refused."""
    folder = Path(cfg.explain.from_delphi)
    _, meta, coder_hash = load_coder(cfg)
    n = meta["num_latents"]
    found, digest, hook = D.read_explanations(folder, D.hookpoint_for(meta["kind"], cfg.model.layer))
    bad = [i for i in sorted(found) if i >= n]
    if bad:
        raise UserError(f"config key explain.from_delphi: {folder} explains {len(bad)} latents the coder does not "
                        f"have ({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}; it has 0..{n - 1})")
    run = run_folder(cfg)
    ident = {**model_identity(cfg), "coder": coder_hash, "explain": identity(cfg.explain), "delphi": digest}
    with run.claim("explain", ident):
        path = run.explanations
        batches, _, todo = latent_batches(path, sorted(found), cfg.explain.latents_per_batch)
        for b in todo:
            records = []
            for latent in batches[b]:
                r = {"latent": latent, "explanation": found[latent], "model": "delphi",
                     "source": D.explanation_name(hook, latent), "batch": b}
                if found[latent] is None:
                    r["skipped"] = "delphi could not parse its explainer's answer"
                records.append(r)
            append_batch(path, records)
    return path


def export_delphi(cfg: Config, out: Path, progress: bool = True) -> dict:
    """The examples of the explained latents (or, before `nlrw explain`, of the latents it would
    explain) and their explanations, in eai-delphi's layout under `out` (a new folder):
    out/latents/<hookpoint>/ (its latent cache) and out/explanations/ (its explanation files).

    The cache's token rows are every example window of those latents, activating and non-activating;
    it records every firing of those latents on every row, so delphi's examples of a latent are its
    windows here plus any other row it fires on, and its non-activating rows are truly silent."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; give a new folder to export to")
    ex = load_examples(cfg)
    explanations = load_explanations(cfg) if run_folder(cfg).explanations.exists() else {}
    latents = sorted(explanations) or chosen_latents(cfg, ex.num_latents)
    per_decile = ex.data["act_window"].shape[2]
    windows = np.asarray(sorted({w for i in latents for w in
                                 ex.activating(i, per_decile) + ex.non_activating(i, ex.data["neg_window"].shape[1])}),
                         np.int64)
    width, wanted = ex.width, np.asarray(latents)
    enc = encoder(ex.meta["k"], ex.meta["kind"])
    locations, activations = [], []
    for first in tqdm(range(0, len(windows), 256), desc="export-delphi", unit="chunk", disable=not progress):
        chunk = windows[first:first + 256]
        acts, idx = (np.asarray(a) for a in enc(ex.params, ex.rows.window_inputs(chunk, width)))
        t, j = np.nonzero((acts > 0) & np.isin(idx, wanted))
        locations.append(np.stack([first + t // width, t % width, idx[t, j]], 1))
        activations.append(acts[t, j])
    hook = D.hookpoint_for(ex.meta["kind"], cfg.model.layer)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    config = {"dataset_repo": f"nlrw_jax examples of {cfg.run_dir}", "dataset_split": "", "dataset_name": "",
              "dataset_column": "text", "batch_size": 256, "cache_ctx_len": width,
              "n_tokens": int(windows.size * width),
              "n_splits": D.SPLITS, "model_name": cfg.model.checkpoint}
    D.write_cache(tmp / "latents", hook, ex.rows.window_tokens(windows, width),
                  np.concatenate(locations) if locations else np.zeros((0, 3), np.int64),
                  np.concatenate(activations) if activations else np.zeros(0, np.float32), ex.num_latents, config)
    written = D.write_explanations(tmp / "explanations", hook, explanations)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {"out": str(out), "hookpoint": hook, "latents": len(latents), "windows": len(windows),
            "explanations": written}
