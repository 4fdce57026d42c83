"""Calibration of simulated values: raw predictions, the true activations' quantiles, and the maps.

Every calibration is a per-latent piecewise-linear map, knots pred_knots[j] -> true_knots[j]
applied by `quantile.apply_quantile_map` (jnp.interp, clamped at the end knots), fit on the
calibration contexts only (never the evaluation ones), and stored in one .npz format
(`quantile.save_quantile_map`). `CALIBRATIONS` lists them:

* "empirical", "type8" (quantile.METHODS): quantile matching F_true^-1(F_pred(p)). F_true^-1
  comes from the coder's activations over the activation store's tokens (zeros included); F_pred
  from the raw predictions on the calibration contexts. They use no pairing: the maps themselves
  are in quantile.py.
* "isotonic", "abstain" (PAIRED): fit on the (raw prediction, true activation) pairs of the same
  calibration contexts. "isotonic" is the least-squares non-decreasing map prediction ->
  E[true activation | prediction]; "abstain" is that map set to 0 below a per-latent threshold.
  A latent with too few firing pairs uses a map pooled over latents in units of max activation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite import simulate as S

# The calibrations fit on (prediction, true activation) pairs; CALIBRATIONS is every calibration
# `nlrw calibrate` fits and `nlrw evaluate` sweeps, in that order (calibrate.estimator: one of them).
PAIRED = ("isotonic", "abstain")
CALIBRATIONS = (*Q.METHODS, *PAIRED)


def raw_values(expected: np.ndarray, explained: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """[R, L] raw simulated activations from the expected ratings [R, L] (S.expected_digit), 0 for
    a latent without an explanation; max_act [L] of these latents. Made in place of `expected`
    (float32), block by block: at the paper's widths it is the largest array a stage holds."""
    raw = np.asarray(expected, np.float32)
    step = max(1, (1 << 24) // max(1, raw.shape[1]))
    for lo in range(0, len(raw), step):
        raw[lo:lo + step] = np.where(explained, S.raw_activation(raw[lo:lo + step], max_act), 0.0)
    return raw


def true_nonzero(params, meta: dict, rows, latents: np.ndarray, limit: int = 0,
                 progress: bool = True) -> tuple[list[np.ndarray], int]:
    """Each latent's non-zero activations over the first `limit` tokens of `rows` (0: all; one
    streaming pass), and the token count."""
    from nlrw_jax.interpret.examples import encoder

    limit = limit or rows.num_tokens
    slot = np.full(params["W_enc"].shape[0], -1, np.int64)
    slot[latents] = np.arange(len(latents))
    found_slot, found_val, seen = [], [], 0
    chunks = [(a, min(b, limit)) for a, b in rows.chunks if a < limit]
    for a, b in tqdm(chunks, desc="calibrate (true activations)", unit="chunk", disable=not progress):
        acts, idx = encoder(meta["k"], meta["kind"])(params, rows.inputs(a, b))
        acts, idx = np.asarray(acts, np.float32).ravel(), slot[np.asarray(idx).ravel()]
        hit = (idx >= 0) & (acts > 0)
        found_slot.append(idx[hit])
        found_val.append(acts[hit])
        seen += b - a
    found_slot, found_val = np.concatenate(found_slot), np.concatenate(found_val)
    order = np.argsort(found_slot, kind="stable")
    bounds = np.searchsorted(found_slot[order], np.arange(len(latents) + 1))
    return [found_val[order][bounds[j]:bounds[j + 1]] for j in range(len(latents))], seen


def load_map(path: Path, latents: np.ndarray) -> dict:
    """The calibration map at `path` (quantile.load_quantile_map), checked to be for `latents`."""
    m = Q.load_quantile_map(path)
    if not np.array_equal(m["latents"], latents):
        raise UserError(f"{path}: a quantile map for other latents than the predictions'; rerun `nlrw calibrate`")
    return m


def apply_map(m: dict, raw: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """raw [R, L] (any rows) through the map `m` (jitted interpolation); latents without an
    explanation stay 0. In blocks of rows: the interpolation's temporaries are ~6x its input."""
    out = np.empty(raw.shape, np.float32)
    step = max(1, (1 << 22) // max(1, raw.shape[1]))
    for lo in range(0, len(raw), step):
        mapped = np.asarray(Q.apply_quantile_map(m["pred_knots"], m["true_knots"], raw[lo:lo + step]))
        out[lo:lo + step] = np.where(explained, mapped, 0.0)
    return out


def normalised_values(path: Path, raw: np.ndarray, latents: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """raw [R, L] through the map at `path`; latents without an explanation stay 0."""
    return apply_map(load_map(path, latents), raw, explained)


def map_meta(path: Path) -> dict:
    """The `meta` of a calibration map file (only that member is read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: cannot read the calibration map's meta ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------ maps fit on (prediction, true) pairs


def isotonic_knots(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (float64) of the isotonic regression of y on x, read as a piecewise-linear map.

    The same function as scikit-learn's IsotonicRegression(increasing=True, out_of_bounds="clip"):
    y averaged over tied x, the pool-adjacent-violators fit on the unique x weighted by their
    counts (scipy.optimize.isotonic_regression), linear interpolation between the unique x and
    clamping outside them (jnp.interp's own behaviour). Inside a flat block only its first and
    last x are kept (scikit-learn's trim), so a latent needs ~2 knots per block, not one per
    prediction. No pairs: the single knot (0, 0), i.e. the map 0.
    """
    from scipy.optimize import isotonic_regression

    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size == 0:
        return np.zeros(1), np.zeros(1)
    ux, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    mean_y = np.bincount(inv, weights=y, minlength=ux.size) / counts
    fit = isotonic_regression(mean_y, weights=counts.astype(np.float64), increasing=True).x
    keep = np.ones(ux.size, bool)
    keep[1:-1] = (fit[1:-1] != fit[:-2]) | (fit[1:-1] != fit[2:])
    return ux[keep], fit[keep]


def abstain_threshold(x: np.ndarray, fires: np.ndarray) -> float:
    """The threshold t for "prediction >= t means the latent fires" that maximises balanced
    accuracy, (specificity + sensitivity) / 2, against `fires` (true activation > 0).

    Candidates: 0 (everything fires), every prediction, +inf (nothing fires); ties go to the
    smallest. Why balanced accuracy and not calibration error: the isotonic map is already the
    least-squares non-decreasing map, so zeroing part of it can only raise the calibration MSE on
    these pairs. Abstaining is for something else: keeping a sparse latent's zeros, i.e. firing
    detection, where a latent that fires on ~1% of tokens would otherwise get a small positive
    value almost everywhere. Balanced accuracy weighs its rare firings and its many zeros equally
    (plain accuracy would choose +inf, never firing). Compared as the exact integer
    tp * n_neg + tn * n_pos (= 2 n_pos n_neg balanced accuracy), so ties are exact; a class without
    members contributes a constant 0, so the other class's rate decides alone.
    """
    x = np.asarray(x, np.float64).ravel()
    fires = np.asarray(fires, bool).ravel()
    cand = np.unique(np.concatenate([[0.0], x, [np.inf]]))  # sorted: argmax takes the smallest of ties
    pos, neg = np.sort(x[fires]), np.sort(x[~fires])
    n_pos, n_neg = np.int64(pos.size), np.int64(neg.size)
    tp = n_pos - np.searchsorted(pos, cand, side="left")  # firing pairs predicted >= t
    tn = np.searchsorted(neg, cand, side="left").astype(np.int64)  # silent pairs predicted < t
    return float(cand[int(np.argmax(tp * n_neg + tn * n_pos))])


def abstain_knots(xk: np.ndarray, yk: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """The map (xk -> yk) set to 0 below t, as knots: (t-, 0) (t-: the float32 just below t, so
    no float32 prediction falls between) then (t, map(t)) then the knots above t. t = +inf: the
    map 0; t <= 0: the map unchanged (predictions are never negative, so all of them fire)."""
    xk, yk = np.asarray(xk, np.float64), np.asarray(yk, np.float64)
    if t == np.inf:
        return xk[:1], np.zeros(1)
    if t <= 0:
        return xk, yk
    t32 = np.float32(t)
    below = np.nextafter(t32, np.float32(-np.inf))
    above = xk > t32
    return (np.concatenate([[below, t32], xk[above]]).astype(np.float64),
            np.concatenate([[0.0, np.interp(np.float64(t32), xk, yk)], yk[above]]))


def pad_knots(maps: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent knot lists as [L, K] float32 arrays (K >= 2), each padded by repeating its last
    knot: jnp.interp returns the last of repeated x knots' y at that x, and they share it."""
    k = max([2, *(len(x) for x, _ in maps)])
    pk, tk = np.zeros((len(maps), k), np.float32), np.zeros((len(maps), k), np.float32)
    for j, (x, y) in enumerate(maps):
        pk[j] = np.pad(np.asarray(x, np.float32), (0, k - len(x)), mode="edge")
        tk[j] = np.pad(np.asarray(y, np.float32), (0, k - len(y)), mode="edge")
    return pk, tk


def fit_paired_map(method: str, raw: np.ndarray, true: np.ndarray, max_act: np.ndarray, min_nonzero: int,
                   pool: np.ndarray | None = None) -> dict:
    """Fit an "isotonic" or "abstain" map on calibration pairs: raw [C, L] predictions, true [C, L]
    activations at the same contexts, max_act [L] (the unit of the raw mapping).

    A latent with fewer than `min_nonzero` pairs whose true activation is > 0 (none at all
    included) cannot support a fit of its own; it uses the map (and, for abstain, the threshold)
    fit on the pairs of every latent in `pool` (default: all) pooled in relative units, x =
    raw / max_act, y = true / max_act, scaled back by its own max_act. Latents with max_act <= 0
    are left out of the pool. If no pooled pair fires, the pooled map is 0.

    Returns {"levels": [K] placeholder grid (a paired map has no quantile levels; the file format
    wants one), "pred_knots", "true_knots": [L, K] float32, "fallback": [L] bool (used the pooled
    map), "thresholds": [L] (abstain; +inf: never fires), "pooled_all_zero": bool,
    "pooled_threshold": float | None (relative units)}.
    """
    if method not in PAIRED:
        raise UserError(f"unknown paired calibration {method!r}; use one of {list(PAIRED)}")
    raw = np.asarray(raw, np.float64)
    true = np.asarray(true, np.float64)
    max_act = np.asarray(max_act, np.float64).ravel()
    if raw.ndim != 2 or raw.shape != true.shape or max_act.shape != (raw.shape[1],):
        raise UserError(f"paired calibration: predictions {raw.shape}, true activations {true.shape} and max "
                        f"activations {max_act.shape} must be [contexts, latents], the same, and [latents]")
    for name, arr in (("predictions", raw), ("true activations", true)):
        bad = ~np.isfinite(arr).all(axis=0)
        if bad.any():
            raise UserError(f"calibration {name} of latent {int(np.argmax(bad))} are not all finite")
    n_lat = raw.shape[1]
    fires = true > 0
    fallback = fires.sum(axis=0) < min_nonzero
    pool = np.ones(n_lat, bool) if pool is None else np.asarray(pool, bool)
    pool = pool & (max_act > 0)
    px = (raw[:, pool] / max_act[pool]).ravel()
    py = (true[:, pool] / max_act[pool]).ravel()
    pooled = isotonic_knots(px, py)
    pooled_t = abstain_threshold(px, py > 0) if method == "abstain" else None

    maps, thresholds = [], np.full(n_lat, np.nan)
    for j in range(n_lat):
        if fallback[j]:
            xk, yk = pooled[0] * max_act[j], pooled[1] * max_act[j]
            t = (pooled_t * max_act[j] if np.isfinite(pooled_t) else np.inf) if method == "abstain" else None
        else:
            xk, yk = isotonic_knots(raw[:, j], true[:, j])
            t = abstain_threshold(raw[:, j], fires[:, j]) if method == "abstain" else None
        if method == "abstain":
            thresholds[j] = t
            xk, yk = abstain_knots(xk, yk, t)
        maps.append((xk, yk))
    pred_knots, true_knots = pad_knots(maps)
    return {"levels": np.linspace(0.0, 1.0, pred_knots.shape[1]), "pred_knots": pred_knots,
            "true_knots": true_knots, "fallback": fallback, "thresholds": thresholds,
            "pooled_all_zero": not bool((py > 0).any()), "pooled_threshold": pooled_t}
