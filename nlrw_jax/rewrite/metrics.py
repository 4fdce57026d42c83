"""What `nlrw evaluate` computes from the patched forward's CEs: the selection masks (top-scoring
and random fractions of the simulated latents), paired bootstrap CIs, the equivalent training
fraction on the curve of the model's intermediate checkpoints, and per-latent specificity and
sensitivity of the predictions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SELECTIONS = ("top", "random")


def selection_masks(ranking: list[int], latents: np.ndarray, num_latents: int, fractions: list[float],
                    seed: int) -> tuple[np.ndarray, list[dict]]:
    """[2F + 1, num_latents] masks: per fraction, the top ceil(f L) simulated latents by the score
    ranking (unscored ones last), then as many chosen at random (seed), then all latents."""
    rank = {lat: i for i, lat in enumerate(ranking)}
    top = sorted(latents, key=lambda lat: (rank.get(int(lat), len(rank)), int(lat)))
    rand = np.random.default_rng(seed).permutation(latents)
    masks, meta = [], []
    for sel, order in zip(SELECTIONS, (top, rand)):
        for f in fractions:
            n = min(len(latents), math.ceil(f * len(latents)))
            m = np.zeros(num_latents, bool)
            m[np.asarray(order[:n], np.int64)] = True
            masks.append(m)
            meta.append({"selection": sel, "fraction": f, "n_selected": n})
    # The paper's full rewrite when not every latent is explained: all latents take simulated
    # values, and the ones never simulated (no explanation chosen) are zero.
    masks.append(np.ones(num_latents, bool))
    meta.append({"selection": "all_latents", "fraction": 1.0, "n_selected": num_latents})
    return np.stack(masks), meta


def baseline_means(params, meta: dict, rows, limit: int = 0, progress: bool = True) -> dict:
    """The baselines' statistics over the first `limit` tokens of the coder's rows (0: all), in one
    streaming pass: {"out": [d] the mean of what the coder replaces (the MLP output for a
    transcoder, the residual for an SAE), "latents": [n] each latent's mean activation (zeros
    included), "tokens"}."""
    from tqdm import tqdm

    from nlrw_jax.interpret.examples import encoder
    from nlrw_jax.sparse.coder import points_for

    in_point, out_point = points_for(meta["kind"])
    n = params["W_enc"].shape[0]
    limit = limit or rows.num_tokens
    chunks = [(a, min(b, limit)) for a, b in rows.chunks if a < limit]
    out_sum, lat_sum, seen = 0.0, np.zeros(n), 0
    for a, b in tqdm(chunks, desc="evaluate (baseline means)", unit="chunk", disable=not progress):
        x = rows.inputs(a, b)
        acts, idx = encoder(meta["k"], meta["kind"])(params, x)
        lat_sum += np.bincount(np.asarray(idx).ravel(), np.asarray(acts, np.float64).ravel(), minlength=n)
        out = x if out_point == in_point else rows.read(out_point, a, b)
        out_sum = out_sum + np.asarray(out, np.float64).sum(0)
        seen += b - a
    return {"out": (out_sum / seen).astype(np.float32), "latents": (lat_sum / seen).astype(np.float32),
            "tokens": seen}


def bootstrap(x: np.ndarray, n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """[n, C] condition means of x [C, N] over resampled contexts, the same resample for every
    condition (so differences are paired). `groups` [N] (the contexts' windows) resamples whole
    windows: positions of one window are correlated, so they move together (a cluster bootstrap)."""
    rng = np.random.default_rng(seed)
    inv = np.arange(x.shape[1]) if groups is None else np.unique(groups, return_inverse=True)[1]
    g = int(inv.max()) + 1
    sums = np.stack([np.bincount(inv, weights=row, minlength=g) for row in x.astype(np.float64)])  # [C, G]
    counts = np.bincount(inv, minlength=g).astype(np.float64)
    picks = np.zeros((n, g))  # how often each window is drawn, per resample: means by matmul
    np.add.at(picks, (np.arange(n)[:, None], rng.integers(0, g, (n, g))), 1.0)
    return (picks @ sums.T) / (picks @ counts)[:, None]


def ci(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def checkpoint_curve(checkpoints: list[dict], final_name: str, dtype: str, windows: np.ndarray,
                     window: np.ndarray, positions: np.ndarray, clean_ce: float, batch_size: int) -> list[dict]:
    """CE at the evaluated (window, position) contexts of the model's partially trained
    `checkpoints` ([{name, fraction, folder}]), sorted by training fraction; the final model is
    fraction 1 with `clean_ce`. windows [W, S]; window, positions [N]: each context's window and position."""
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoX, token_cross_entropy

    curve = [{"name": final_name, "fraction": 1.0, "ce": clean_ce}]
    dtype = jnp.dtype(dtype)
    used = np.unique(window)  # each window runs once; all its positions are read from that run
    compiled = {}  # one jitted CE function per architecture: the checkpoints share it
    for point in checkpoints:
        config, params = hf.load(point["folder"], dtype=dtype)
        if repr(config) not in compiled:
            model = GPTNeoX(config, dtype=dtype)
            compiled[repr(config)] = jax.jit(lambda p, w, model=model: token_cross_entropy(
                model.apply({"params": p}, w)[0], w))
        ce_all = compiled[repr(config)]
        per_window = np.concatenate([np.asarray(ce_all(params, windows[used[i:i + batch_size]]))
                                     for i in range(0, len(used), batch_size)])
        ces = per_window[np.searchsorted(used, window), positions]
        curve.append({"name": point["name"], "fraction": float(point["fraction"]), "ce": float(ces.mean())})
    return sorted(curve, key=lambda c: c["fraction"])


def equivalent_fraction(ce: float, curve: list[dict]) -> tuple[float, str]:
    """The training fraction whose checkpoint has this CE (linear between checkpoints)."""
    fr, ces = [c["fraction"] for c in curve], [c["ce"] for c in curve]
    if ce <= ces[-1]:
        return 1.0, ">= 1"
    if ce >= ces[0]:
        return fr[0], f"<= {fr[0]:g}"
    for i in range(len(fr) - 1):
        lo, hi = ces[i + 1], ces[i]
        if lo <= ce <= hi:
            t = (hi - ce) / (hi - lo) if hi > lo else 0.0
            f = fr[i] + t * (fr[i + 1] - fr[i])
            return f, f"{f:.3f}"
    return float("nan"), "not monotone"


def active_rates(pred: np.ndarray, true: np.ndarray, threshold: np.ndarray) -> dict:
    """Per latent: specificity (inactive contexts predicted inactive) and sensitivity (active ones
    predicted active); a prediction is active above half a rating step (max activation / 18)."""
    return rates_from_counts(active_counts(pred, true, threshold))


def active_counts(pred: np.ndarray, true: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """What active_rates counts, [4, L] int64 per latent: inactive contexts predicted inactive,
    inactive contexts, active contexts predicted active, active contexts. Counts of blocks of rows
    add up to those of all rows, so the rates of [contexts, latents] can be streamed."""
    p, t = pred > threshold, true > 0
    return np.stack([(~p & ~t).sum(0), (~t).sum(0), (p & t).sum(0), t.sum(0)]).astype(np.int64)


def rates_from_counts(counts: np.ndarray) -> dict:
    """active_rates from the (summed) active_counts."""
    tn, neg, tp, pos = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = tn / neg
        sens = tp / pos
    return {"specificity": spec, "sensitivity": sens,
            "pooled_specificity": float(tn.sum() / max(neg.sum(), 1)),
            "pooled_sensitivity": float(tp.sum() / pos.sum()) if pos.sum() else float("nan")}


def finite_or_none(x) -> float | None:
    return None if not np.isfinite(x) else float(x)
