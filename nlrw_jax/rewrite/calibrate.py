"""`nlrw calibrate`: per-latent quantile maps from raw simulated values to true activations.

F_true^-1 comes from the transcoder's activations over the activation store (zeros included,
`calibrate.true_tokens` tokens, default all); F_pred from the raw predictions on the calibration
contexts (never the evaluation ones). One map per estimator ("empirical", "type8") and per
calibration size: `calibrate.sizes` (the paper's 1K-vs-10K sweep, scaled) plus all contexts.
Maps are run_dir/calibrate/maps/{estimator}_{size}.npz (latents x quantile grid, see quantile.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.config import config_hash
from nlrw_jax.errors import UserError
from nlrw_jax.io import claim_run_folder, file_hash, save_npz
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite import simulate as S


def calibrate_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "calibrate"


def raw_values(cfg, preds: dict, examples=None) -> np.ndarray:
    """[N, L] raw simulated activations (0 for a latent without an explanation)."""
    from nlrw_jax.interpret.examples import Examples

    max_act = (examples or Examples(cfg)).data["max_act"][preds["latents"]]
    e = S.expected_digit(preds["logprobs"], cfg.simulate.readout)
    return np.where(preds["explained"], S.raw_activation(e, max_act), 0.0).astype(np.float32)


def calibration_sizes(cfg) -> list[int]:
    c = cfg.simulate.calibration
    bad = [n for n in cfg.calibrate.sizes if not 2 <= n <= c]
    if bad:
        raise UserError(f"config key calibrate.sizes: {bad} must be in 2..simulate.calibration ({c})")
    if c < 2:
        raise UserError(f"config key simulate.calibration: {c} contexts cannot fit a quantile map (need >= 2)")
    return sorted(set(cfg.calibrate.sizes) | {c})


def map_path(cfg, estimator: str, size: int) -> Path:
    return calibrate_dir(cfg) / "maps" / f"{estimator}_{size}.npz"


def true_nonzero(cfg, latents: np.ndarray, progress: bool = True) -> tuple[list[np.ndarray], int]:
    """Each latent's non-zero activations over the store's tokens (one streaming pass), and the token count."""
    from nlrw_jax.interpret.examples import _encoder, load_coder, open_rows

    params, meta, _ = load_coder(cfg)
    rows = open_rows(cfg)
    limit = cfg.calibrate.true_tokens or rows.num_tokens
    slot = np.full(params["W_enc"].shape[0], -1, np.int64)
    slot[latents] = np.arange(len(latents))
    found_slot, found_val, seen = [], [], 0
    chunks = [(a, min(b, limit)) for a, b in rows.chunks if a < limit]
    for a, b in tqdm(chunks, desc="calibrate (true activations)", unit="chunk", disable=not progress):
        acts, idx = _encoder(meta["k"], meta["kind"])(params, rows.inputs(a, b))
        acts, idx = np.asarray(acts, np.float32).ravel(), slot[np.asarray(idx).ravel()]
        hit = (idx >= 0) & (acts > 0)
        found_slot.append(idx[hit])
        found_val.append(acts[hit])
        seen += b - a
    found_slot, found_val = np.concatenate(found_slot), np.concatenate(found_val)
    order = np.argsort(found_slot, kind="stable")
    bounds = np.searchsorted(found_slot[order], np.arange(len(latents) + 1))
    return [found_val[order][bounds[j]:bounds[j + 1]] for j in range(len(latents))], seen


def calibrate_from_config(cfg, progress: bool = True) -> Path:
    if cfg.calibrate.estimator not in Q.METHODS:  # config first: no need for the predictions to say so
        raise UserError(f"config key calibrate.estimator: {cfg.calibrate.estimator!r} is not one of "
                        f"{sorted(Q.METHODS)}")
    sizes = calibration_sizes(cfg)
    preds = S.load_predictions(cfg)
    out = calibrate_dir(cfg)
    claim_run_folder(out, {"predictions": file_hash(S.sim_dir(cfg) / "manifest.json"),
                           "calibrate": config_hash(cfg.calibrate), "readout": cfg.simulate.readout})
    todo = [(e, n) for e in sorted(Q.METHODS) for n in sizes if not map_path(cfg, e, n).exists()]
    if not todo:
        return out
    latents, n_eval = preds["latents"], int(preds["contexts"]["n_eval"])
    calib = raw_values(cfg, preds)[n_eval:]
    nonzero, n_tokens = true_nonzero(cfg, latents, progress)
    levels = Q.quantile_levels()
    (out / "maps").mkdir(exist_ok=True)
    true_q = {e: np.stack([Q.true_quantiles(v, n_tokens, levels, e) for v in nonzero]) for e, _ in todo}
    for estimator, size in todo:
        pred_knots, true_knots = Q.fit_quantile_map(calib[:size], true_q[estimator], levels, estimator)
        Q.save_quantile_map(map_path(cfg, estimator, size), levels, pred_knots, true_knots, latents,
                            {"estimator": estimator, "contexts": size, "true_tokens": n_tokens})
    save_npz(out / "true_frequency.npz", dict(latents=latents, firing=np.array([len(v) for v in nonzero]),
                                              tokens=np.int64(n_tokens)))
    return out


def normalised_values(cfg, raw: np.ndarray, latents: np.ndarray, explained: np.ndarray, estimator: str,
                      size: int) -> np.ndarray:
    """raw [N, L] through the stored map (jitted interpolation); latents without an explanation stay 0."""
    path = map_path(cfg, estimator, size)
    m = Q.load_quantile_map(path)
    if not np.array_equal(m["latents"], latents):
        raise UserError(f"{path}: a quantile map for other latents than the predictions'; rerun `nlrw calibrate`")
    mapped = np.asarray(Q.apply_quantile_map(m["pred_knots"], m["true_knots"], raw))
    return np.where(explained, mapped, 0.0).astype(np.float32)
