"""Detection and fuzzing scores of explanations (METHOD.md): the statistics and the tables.

Each scoring window is one prompt (system prompt, explanation, then the window) answered by
one generation step after a forced "[": P(1) / (P(0) + P(1)) from the log-probs gives the AUC,
P(1) > P(0) the label for balanced accuracy. Scoring windows are disjoint from the explainer's.

`write_tables`: the per-latent table, the ranking (latents by detection balanced accuracy, then
AUC: the order "top-scoring first" rewriting uses) and the summary.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from nlrw_jax.interpret import prompts as P
from nlrw_jax.io import write_json, write_text


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


def fuzz_marks(rng, acts_windows, width: int, n_neg: int):
    """Real marks of the activating windows; as many random marks (their mean count) for the others."""
    real = [P.marked_tokens(a) for a in acts_windows]
    count = max(1, int(round(np.mean([m.sum() for m in real])))) if real else 1
    fake = []
    for _ in range(n_neg):
        m = np.zeros(width, bool)
        m[rng.choice(width, min(count, width), replace=False)] = True
        fake.append(m)
    return real, fake


def write_tables(table: Path, ranking: Path, summary: Path, records: list[dict], num_latents: int) -> None:
    """The per-latent table (csv), the ranking of latents by detection score (best first) and the summary."""
    scored = [r for r in records if "detection" in r]
    rows = [{"latent": r["latent"],
             **{f"{kind}_{m}": r[kind][m] for kind in ("detection", "fuzzing") for m in ("balanced_accuracy", "auc")}}
            for r in scored]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["latent", "detection_balanced_accuracy", "detection_auc",
                                        "fuzzing_balanced_accuracy", "fuzzing_auc"])
    w.writeheader()
    w.writerows(rows)
    write_text(table, buf.getvalue())
    key = lambda r: (-r["detection_balanced_accuracy"], -np.nan_to_num(r["detection_auc"], nan=0.0), r["latent"])
    write_json(ranking, [r["latent"] for r in sorted(rows, key=key)])
    skipped = [r for r in records if "skipped" in r]

    def mean(col):
        vals = [r[col] for r in rows if not np.isnan(r[col])]
        return float(np.mean(vals)) if vals else None

    write_json(summary, {
        "latents": num_latents, "scored": len(rows), "skipped": len(skipped),
        "skipped_reasons": {reason: sum(r["skipped"] == reason for r in skipped)
                            for reason in sorted({r["skipped"] for r in skipped})},
        **{f"mean_{c}": mean(c) for c in ("detection_balanced_accuracy", "detection_auc",
                                          "fuzzing_balanced_accuracy", "fuzzing_auc")}})
