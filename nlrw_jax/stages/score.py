"""`nlrw score`: detection and fuzzing scores of each explanation on windows the explainer never
saw; scores/{scores.jsonl, table.csv, ranking.json, summary.json}, resumable per batch of latents."""

from __future__ import annotations

import numpy as np

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret.explain import latent_batches
from nlrw_jax.interpret.score import fuzz_marks, summarize, write_tables
from nlrw_jax.io import append_batch, read_batches, read_json_object
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.common import LazyBackend, llm_identity, load_examples, load_explanations, model_identity, \
    run_folder, subject_tokenizer
from nlrw_jax.stages.live import live_progress


def run(cfg: Config, progress: bool = True, backend=None) -> dict:
    """Scores every explanation (resuming); returns the summary (scored, skipped, mean AUCs)."""
    s, e = cfg.score, cfg.explain
    ex = load_examples(cfg)
    per_decile = ex.data["act_window"].shape[2]
    if e.examples_per_decile + s.activating_per_decile > per_decile:
        raise UserError(f"config key score.activating_per_decile: {s.activating_per_decile} + "
                        f"explain.examples_per_decile {e.examples_per_decile} must be in 1..examples.per_decile "
                        f"({per_decile}) of the examples: scoring windows are disjoint from the explainer's")
    if s.non_activating > ex.data["neg_window"].shape[1]:
        raise UserError(f"config key score.non_activating: {s.non_activating} must be in "
                        f"1..examples.non_activating ({ex.data['neg_window'].shape[1]}) of the examples")
    explanations = load_explanations(cfg)
    latents = sorted(explanations)
    run = run_folder(cfg)
    ident = {**model_identity(cfg), "coder": ex.coder_hash, "examples": run.identity_hash("examples"),
             "explanations": file_digest(run.explanations), "score": identity(s),
             "explain": {"examples_per_decile": e.examples_per_decile, "seed": e.seed}, **llm_identity(cfg, "score")}
    with run.claim("score", ident):
        path = run.scores
        batches, done, todo = latent_batches(path, latents, s.latents_per_batch)
        if todo:
            tok = subject_tokenizer(cfg)
            backend = backend or LazyBackend(cfg, progress, "score")
            backend.candidate_ids(P.BINARY)
            per_latent = 10 * s.activating_per_decile + s.non_activating
            total = sum(2 * per_latent for b in todo for _ in batches[b])
            bar = live_progress(cfg, "score", backend, progress, total=total, desc="score (detection + fuzzing)",
                                unit="prompt", smoothing=0.1)
            for b in todo:
                records, prompts, spans = [], [], []
                for latent in batches[b]:
                    expl = explanations[latent]
                    act_ids = [int(w) for w in ex.data["act_window"][latent, ::-1,
                                                                    e.examples_per_decile:][:, :s.activating_per_decile]
                               .reshape(-1) if w >= 0]
                    neg_ids = ex.non_activating(latent, s.non_activating)
                    if expl is None or not act_ids:
                        records.append({"latent": latent, "skipped": "no explanation" if expl is None
                                        else "no activating examples for scoring"})
                        bar.total -= 2 * per_latent
                        continue
                    toks, acts = ex.windows(act_ids + neg_ids, latent)
                    pieces = [P.token_strings(tok, t) for t in toks]
                    labels = np.array([1] * len(act_ids) + [0] * len(neg_ids))
                    rng = np.random.default_rng([e.seed, latent])
                    real, fake = fuzz_marks(rng, acts[:len(act_ids)], ex.width, len(neg_ids))
                    det = [backend.render(P.detection_messages(expl, pc), P.ANSWER_PREFIX) for pc in pieces]
                    fuz = [backend.render(P.fuzzing_messages(expl, pc, m), P.ANSWER_PREFIX)
                           for pc, m in zip(pieces, real + fake)]
                    records.append({"latent": latent, "labels": labels.tolist()})
                    spans.append((len(records) - 1, len(prompts), len(det)))
                    prompts += det + fuz
                    bar.total += 2 * len(labels) - 2 * per_latent
                logprobs = backend.next_token_logprobs(prompts, P.BINARY, bar=bar) if prompts else None
                for slot, start, n in spans:
                    labels = np.array(records[slot].pop("labels"))
                    records[slot]["detection"] = summarize(labels, logprobs[start:start + n])
                    records[slot]["fuzzing"] = summarize(labels, logprobs[start + n:start + 2 * n])
                for r in records:
                    r["batch"] = b
                append_batch(path, records)
            bar.close()
            done = read_batches(path, {b: len(ls) for b, ls in enumerate(batches)})
        write_tables(run.score_table, run.ranking, run.score_summary, [r for b in sorted(done) for r in done[b]],
                     len(latents))
    return read_json_object(run.score_summary, "rerun `nlrw score`")
