"""`nlrw score`: detection and fuzzing scores of each explanation (METHOD.md), resumable.

Each scoring window is one prompt (system prompt, explanation, then the window) answered by
one generation step after a forced "[": P(1) / (P(0) + P(1)) from the log-probs gives the AUC,
P(1) > P(0) the label for balanced accuracy. Scoring windows are disjoint from the explainer's.

run_dir/scores/: scores.jsonl (per latent, per batch), table.csv, ranking.json (latents by
detection balanced accuracy, then AUC: the order "top-scoring first" rewriting uses),
summary.json.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.config import config_hash
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret.examples import Examples
from nlrw_jax.interpret.explain import latent_batches, llm_identity, load_explanations, subject_tokenizer
from nlrw_jax.io import append_batch, claim_run_folder, file_hash, read_batches, write_json


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    pos, neg = labels == 1, labels == 0
    tpr = predicted[pos].mean() if pos.any() else np.nan
    tnr = (1 - predicted[neg]).mean() if neg.any() else np.nan
    return float(np.nanmean([tpr, tnr]))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with mid-ranks for ties; NaN without both classes."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):  # mid-ranks over runs of equal values
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def probability_of_yes(logprobs: np.ndarray) -> np.ndarray:
    """[n, 2] log-probs of ("0", "1") -> P(1) / (P(0) + P(1)); 0.5 when neither is in the top N."""
    p = np.exp(logprobs.astype(np.float64))
    total = p.sum(1)
    return np.where(total > 0, p[:, 1] / np.where(total > 0, total, 1), 0.5)


def summarize(labels, logprobs) -> dict:
    prob = probability_of_yes(logprobs)
    return {"balanced_accuracy": balanced_accuracy(labels, (prob > 0.5).astype(float)), "auc": auc(labels, prob),
            "n_activating": int((labels == 1).sum()), "n_non_activating": int((labels == 0).sum()),
            "p_yes": [round(float(x), 5) for x in prob]}


def _fuzz_marks(rng, acts_windows, width: int, n_neg: int):
    """Real marks of the activating windows; as many random marks (their mean count) for the others."""
    real = [P.marked_tokens(a) for a in acts_windows]
    count = max(1, int(round(np.mean([m.sum() for m in real])))) if real else 1
    fake = []
    for _ in range(n_neg):
        m = np.zeros(width, bool)
        m[rng.choice(width, min(count, width), replace=False)] = True
        fake.append(m)
    return real, fake


def score_from_config(cfg, progress: bool = True, backend=None) -> Path:
    from nlrw_jax.llm.backends import make_backend

    s, e = cfg.score, cfg.explain
    ex = Examples(cfg)
    per_decile = ex.data["act_window"].shape[2]
    if s.activating_per_decile <= 0 or e.examples_per_decile + s.activating_per_decile > per_decile:
        raise UserError(f"config key score.activating_per_decile: {s.activating_per_decile} + "
                        f"explain.examples_per_decile {e.examples_per_decile} must be in 1..examples.per_decile "
                        f"({per_decile}): scoring windows are disjoint from the explainer's")
    if not 0 < s.non_activating <= ex.data["neg_window"].shape[1]:
        raise UserError(f"config key score.non_activating: {s.non_activating} must be in "
                        f"1..examples.non_activating ({ex.data['neg_window'].shape[1]})")
    explanations = load_explanations(cfg)
    latents = sorted(explanations)
    out = Path(cfg.run_dir) / "scores"
    claim_run_folder(out, {"coder": ex.coder_hash, "examples": ex.manifest["examples"], "score": config_hash(s),
                           "explanations": file_hash(Path(cfg.run_dir) / "explain" / "explanations.jsonl"),
                           **llm_identity(cfg)})
    path = out / "scores.jsonl"
    batches, done, todo = latent_batches(path, latents, s.latents_per_batch)
    if todo:
        tok = subject_tokenizer(cfg)
        backend = backend or make_backend(cfg.llm, progress)
        backend.candidate_ids(P.BINARY)
        per_latent = 10 * s.activating_per_decile + s.non_activating
        total = sum(2 * per_latent for b in todo for _ in batches[b])
        bar = tqdm(total=total, desc="score (detection + fuzzing)", unit="prompt", disable=not progress,
                   smoothing=0.1)
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
                rng = np.random.default_rng([cfg.explain.seed, latent])
                real, fake = _fuzz_marks(rng, acts[:len(act_ids)], ex.width, len(neg_ids))
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
    _write_tables(out, [r for b in sorted(done) for r in done[b]], len(latents))
    return path


def _write_tables(out: Path, records: list[dict], num_latents: int) -> None:
    scored = [r for r in records if "detection" in r]
    rows = [{"latent": r["latent"],
             **{f"{kind}_{m}": r[kind][m] for kind in ("detection", "fuzzing") for m in ("balanced_accuracy", "auc")}}
            for r in scored]
    tmp = out / "table.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["latent", "detection_balanced_accuracy", "detection_auc",
                                          "fuzzing_balanced_accuracy", "fuzzing_auc"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "table.csv")
    key = lambda r: (-r["detection_balanced_accuracy"], -np.nan_to_num(r["detection_auc"], nan=0.0), r["latent"])
    write_json(out / "ranking.json", [r["latent"] for r in sorted(rows, key=key)])
    skipped = [r for r in records if "skipped" in r]

    def mean(col):
        vals = [r[col] for r in rows if not np.isnan(r[col])]
        return float(np.mean(vals)) if vals else None

    write_json(out / "summary.json", {
        "latents": num_latents, "scored": len(rows), "skipped": len(skipped),
        "skipped_reasons": {reason: sum(r["skipped"] == reason for r in skipped)
                            for reason in sorted({r["skipped"] for r in skipped})},
        **{f"mean_{c}": mean(c) for c in ("detection_balanced_accuracy", "detection_auc",
                                          "fuzzing_balanced_accuracy", "fuzzing_auc")}})


def load_ranking(cfg) -> list[int]:
    path = Path(cfg.run_dir) / "scores" / "ranking.json"
    if not path.exists():
        raise UserError(f"{path}: no ranking; run `nlrw score` first")
    try:
        ranking = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ranking ({type(e).__name__}); rerun `nlrw score`") from None
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
        raise UserError(f"{path}: not a list of latent ids; rerun `nlrw score`")
    return ranking
