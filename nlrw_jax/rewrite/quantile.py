"""Quantile normalisation of predicted latent activations.

An LLM predicts, per latent j, an activation for a context ("raw prediction").  Its scale is
arbitrary, so we map a prediction p through F_true_j^{-1}(F_pred_j(p)):

* F_pred_j: the distribution of latent j's raw predictions on a small calibration set
  (C contexts, 16..10000), estimated at a fixed grid of quantile levels;
* F_true_j^{-1}: the quantile function of latent j's TRUE activations over many tokens,
  zeros included.  A latent fires on ~1% of tokens, so ~99% of its true values are 0; only the
  non-zero values are stored, and `true_quantiles` computes the dense quantiles without
  materialising the zeros.

Both sides are tabulated on the same grid of levels (`quantile_levels`), giving per latent a
piecewise-linear, non-decreasing map (pred_knots[j] -> true_knots[j]) applied with `jnp.interp`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.io import save_npz

# Config name -> numpy `np.quantile(method=...)`.  "empirical" is R/Hyndman-Fan type 7
# (numpy's default); "type8" is Hyndman-Fan type 8, whose estimates are approximately
# median-unbiased whatever the distribution.  The difference only matters for small calibration
# sets (C = 16..100), where type 7 is biased toward the sample's centre at the extreme levels.
METHODS = {"empirical": "linear", "type8": "median_unbiased"}

_ARRAYS = ("levels", "pred_knots", "true_knots", "latents", "meta")


def _numpy_method(method: str) -> str:
    try:
        return METHODS[method]
    except KeyError:
        raise UserError(f"unknown quantile method {method!r}; use one of {sorted(METHODS)}") from None


def quantile_levels(n_linear: int = 101, n_tail: int = 100, tail_max: float = 0.1,
                    tail_min: float = 1e-6) -> np.ndarray:
    """Grid of quantile levels in [0, 1], float64, strictly increasing.

    A uniform grid alone wastes almost every level on the zeros of a sparse latent: its firing
    tail is the top ~1%, so we add levels 1 - geomspace(tail_max, tail_min) that get denser
    toward 1 (0.9, ..., 0.999, ..., 1 - 1e-6).
    """
    if n_linear < 2 or n_tail < 0 or not 0 < tail_min < tail_max < 1:
        raise UserError(
            f"bad quantile grid: need n_linear >= 2, n_tail >= 0 and 0 < tail_min < tail_max < 1, "
            f"got n_linear={n_linear}, n_tail={n_tail}, tail_max={tail_max}, tail_min={tail_min}")
    tail = 1.0 - np.geomspace(tail_max, tail_min, n_tail) if n_tail else np.zeros(0)
    levels = np.unique(np.concatenate([np.linspace(0.0, 1.0, n_linear), tail]))
    # Drop near-duplicates (e.g. a tail level equal to a linear level up to rounding): two knots
    # a few ulps apart add nothing and make the grid look non-strict to a reader.
    keep = np.concatenate([[True], np.diff(levels) > 1e-12])
    return levels[keep].astype(np.float64)


def _check_levels(levels: np.ndarray, where: str) -> np.ndarray:
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or levels.size < 2:
        raise UserError(f"{where}: levels must be a 1-D grid of at least 2 values, got shape {levels.shape}")
    if not np.all(np.isfinite(levels)) or levels[0] < 0 or levels[-1] > 1:
        raise UserError(f"{where}: levels must lie in [0, 1]")
    if np.any(np.diff(levels) <= 0):
        g = int(np.argmax(np.diff(levels) <= 0)) + 1
        raise UserError(f"{where}: levels must be strictly increasing (not at grid index {g})")
    return levels


def true_quantiles(nonzero: np.ndarray, n_total: int, levels: np.ndarray, method: str) -> np.ndarray:
    """Quantiles of (n_total - len(nonzero) zeros) + `nonzero`, without building the zeros.

    Equal to `np.quantile(dense, levels, method=METHODS[method])`: we reproduce numpy's own
    position formula and interpolation (`_lerp`) on the conceptual sorted vector
    [0] * n_zeros + sorted(nonzero), which is sorted because every value is >= 0.
      type 7: h = (n - 1) q                       (0-based)
      type 8: h = (n + 1/3) q + 1/3 - 1            (0-based; 1-based clamped to [1, n])
    Returns float64 [G].
    """
    numpy_method = _numpy_method(method)
    levels = np.asarray(levels, dtype=np.float64)
    values = np.sort(np.asarray(nonzero, dtype=np.float64).ravel())
    n = int(n_total)
    if n <= 0:
        raise UserError(f"true_quantiles: n_total must be positive, got {n_total}")
    if values.size > n:
        raise UserError(f"true_quantiles: {values.size} non-zero values but n_total is only {n}")
    if not np.all(np.isfinite(values)):
        raise UserError("true_quantiles: non-finite true activation value")
    if values.size and values[0] < 0:
        raise UserError(f"true_quantiles: negative true activation {values[0]} (activations must be >= 0)")
    n_zeros = n - values.size

    # The same float operations as numpy's `_QuantileMethods`, so results match bit for bit.
    if numpy_method == "linear":
        virtual = (n - 1) * levels
    else:
        alpha = beta = 1 / 3.0
        virtual = n * levels + (alpha + levels * (1 - alpha - beta)) - 1
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1  # clamp to the maximum
    prev[above] = nxt[above] = n - 1
    below = virtual < 0  # clamp to the minimum
    prev[below] = nxt[below] = 0
    gamma = virtual - prev
    prev, nxt = prev.astype(np.int64), nxt.astype(np.int64)

    def value_at(i: np.ndarray) -> np.ndarray:
        # Positions below n_zeros are the implicit zeros.
        out = np.zeros(i.shape, dtype=np.float64)
        hit = i >= n_zeros
        out[hit] = values[i[hit] - n_zeros]
        return out

    a, b = value_at(prev), value_at(nxt)
    # numpy's `_lerp`: interpolate from whichever end is nearer (keeps q monotone and exact ends).
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def fit_quantile_map(calib_preds: np.ndarray, true_q: np.ndarray, levels: np.ndarray,
                     method: str) -> tuple[np.ndarray, np.ndarray]:
    """Knots (pred_knots [L, G], true_knots [L, G]), float32, of the per-latent quantile map.

    pred_knots[j] are the calibration predictions' quantiles at `levels`; true_knots[j] the
    true quantiles at the same levels, except on ties.  Mid-rank tie rule: the predictions are
    often tied (many identical predictions, e.g. 0.0 for a latent that rarely fires, or the
    maximum repeated over all top levels), so pred_knots[j] has runs of equal values at grid
    indices g..h.  One x can only map to one y, and a prediction equal to the tied value sits
    at every rank of the run, so it gets the true quantile at the run's middle level
    (levels[g] + levels[h]) / 2 - not the bottom (which would map a common prediction to 0 too
    eagerly) nor the top.
    """
    numpy_method = _numpy_method(method)
    levels = _check_levels(levels, "fit_quantile_map")
    calib = np.asarray(calib_preds, dtype=np.float64)
    true_q = np.asarray(true_q, dtype=np.float64)
    if calib.ndim != 2:
        raise UserError(f"calibration predictions must be [contexts, latents], got shape {calib.shape}")
    n_ctx, n_lat = calib.shape
    if true_q.shape != (n_lat, levels.size):
        raise UserError(f"true quantiles have shape {true_q.shape}, expected {(n_lat, levels.size)}")
    if n_lat and n_ctx < 2:
        raise UserError(f"latent 0 has {n_ctx} calibration prediction(s); a quantile map needs at least 2")
    bad = np.isnan(calib).any(axis=0)
    if bad.any():
        raise UserError(f"calibration predictions of latent {int(np.argmax(bad))} contain NaN")
    if np.isnan(true_q).any():
        raise UserError(f"true quantiles of latent {int(np.argmax(np.isnan(true_q).any(axis=1)))} contain NaN")
    if n_lat == 0:
        return np.zeros((0, levels.size), np.float32), np.zeros((0, levels.size), np.float32)

    # np.quantile is monotone up to rounding (its lerp switches ends at gamma = 0.5, which can
    # cost an ulp); the running maximum removes such ulp-level dips.  Real decreases in true_q
    # are a bug upstream and are refused by check_monotone below.
    pred = np.quantile(calib, levels, axis=0, method=numpy_method).T
    pred = np.maximum.accumulate(pred, axis=1).astype(np.float32)
    # true_q may carry the same ulp-level dips; anything bigger is a real error, named here.
    fixed = np.maximum.accumulate(true_q, axis=1)
    if np.any(fixed - true_q > 1e-9 * np.maximum(np.abs(fixed), 1e-30)):
        check_monotone(pred, true_q, where="fit_quantile_map: true quantiles")
    true_q = fixed

    # Runs of equal pred knots (on the float32 values actually used by interp): start[j, g] and
    # end[j, g] are the first and last grid indices of the run holding g.
    n_grid = levels.size
    idx = np.broadcast_to(np.arange(n_grid), pred.shape)
    new_run = np.concatenate([np.ones((n_lat, 1), bool), pred[:, 1:] != pred[:, :-1]], axis=1)
    start = np.maximum.accumulate(np.where(new_run, idx, 0), axis=1)
    run_ends = np.concatenate([pred[:, 1:] != pred[:, :-1], np.ones((n_lat, 1), bool)], axis=1)
    end = np.minimum.accumulate(np.where(run_ends, idx, n_grid - 1)[:, ::-1], axis=1)[:, ::-1]

    # True quantile at each run's middle level, linearly interpolated in true_q over levels
    # (np.interp per row, vectorised over latents since the level grid is shared).
    mid = (levels[start] + levels[end]) / 2
    seg = np.clip(np.searchsorted(levels, mid, side="right") - 1, 0, n_grid - 2)
    w = (mid - levels[seg]) / (levels[seg + 1] - levels[seg])
    lo = np.take_along_axis(true_q, seg, axis=1)
    hi = np.take_along_axis(true_q, seg + 1, axis=1)
    tied = np.where(start != end, lo + w * (hi - lo), true_q)
    # Running max again for rounding only: mid levels increase run to run, so the exact values do.
    true_knots = np.maximum.accumulate(tied, axis=1).astype(np.float32)
    return pred, true_knots


@jax.jit
def apply_quantile_map(pred_knots: jax.Array, true_knots: jax.Array, preds: jax.Array) -> jax.Array:
    """Map raw predictions [N, L] to the true scale: column j through (pred_knots[j], true_knots[j]).

    Outside the knot range values clamp to the end knots (jnp.interp's behaviour).  Duplicate
    x knots are fine: fit_quantile_map gives them identical y, so the map is a function.
    """
    return jax.vmap(jnp.interp, in_axes=(1, 0, 0), out_axes=1)(preds, pred_knots, true_knots)


def apply_quantile_map_numpy(pred_knots: np.ndarray, true_knots: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """NumPy reference for `apply_quantile_map` (float64)."""
    preds = np.asarray(preds, dtype=np.float64)
    out = np.empty_like(preds)
    for j in range(preds.shape[1]):
        out[:, j] = np.interp(preds[:, j], np.asarray(pred_knots[j], np.float64),
                              np.asarray(true_knots[j], np.float64))
    return out


def check_monotone(pred_knots: np.ndarray, true_knots: np.ndarray, where: str, latents=None) -> None:
    """Raise UserError naming `where`, the first bad latent (its id in `latents`, else its row) and
    the array unless both knot grids are [L, G] arrays, free of NaN and non-decreasing along G."""
    pred_knots, true_knots = np.asarray(pred_knots), np.asarray(true_knots)
    if pred_knots.ndim != 2 or pred_knots.shape != true_knots.shape:
        raise UserError(f"{where}: pred_knots {pred_knots.shape} and true_knots {true_knots.shape} "
                        f"must both be [latents, levels] of the same shape")
    problems = []  # (latent, order, message) per array; report the lowest latent
    for order, (name, arr) in enumerate((("pred_knots", pred_knots), ("true_knots", true_knots))):
        nan = np.isnan(arr).any(axis=1)
        if nan.any():
            j = int(np.argmax(nan))
            problems.append((j, order, f"{name} of latent {j} contain NaN"))
        dec = np.diff(arr, axis=1) < 0
        dec_rows = dec.any(axis=1)
        if dec_rows.any():
            j = int(np.argmax(dec_rows))
            g = int(np.argmax(dec[j])) + 1
            problems.append((j, order, f"{name} of latent {j} decrease at grid index {g}"))
    if problems:
        j, _, msg = min(problems)
        if latents is not None and len(latents) == len(pred_knots):
            msg = msg.replace(f"latent {j} ", f"latent {int(latents[j])} ")
        raise UserError(f"{where}: {msg} (a quantile grid must be non-decreasing)")


def save_quantile_map(path, levels: np.ndarray, pred_knots: np.ndarray, true_knots: np.ndarray,
                      latents: np.ndarray, meta: dict) -> None:
    """Write the map to an .npz atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    check_monotone(pred_knots, true_knots, where=str(path))
    save_npz(path, dict(levels=np.asarray(levels, np.float64), pred_knots=np.asarray(pred_knots, np.float32),
                        true_knots=np.asarray(true_knots, np.float32), latents=np.asarray(latents, np.int64),
                        meta=np.array(json.dumps(meta, sort_keys=True))))


def load_quantile_map(path) -> dict:
    """Load and validate a map written by `save_quantile_map`; bad files raise UserError naming path."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _ARRAYS if k not in z.files]
            if missing:
                raise UserError(f"{path}: not a quantile map, missing array(s) {', '.join(missing)}")
            out = {k: z[k] for k in _ARRAYS}
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: quantile map file not found") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: cannot read quantile map ({type(e).__name__}: {e})") from None
    try:
        out["meta"] = json.loads(str(out["meta"]))
    except ValueError:
        raise UserError(f"{path}: meta is not valid JSON") from None
    check_monotone(out["pred_knots"], out["true_knots"], where=str(path), latents=out["latents"])
    out["levels"] = _check_levels(out["levels"], str(path))
    n_lat, n_grid = out["pred_knots"].shape
    if out["levels"].shape != (n_grid,):
        raise UserError(f"{path}: {out['levels'].size} levels but knot grids have {n_grid} columns")
    if out["latents"].shape != (n_lat,):
        raise UserError(f"{path}: {out['latents'].size} latent ids but knot grids have {n_lat} rows")
    return out
