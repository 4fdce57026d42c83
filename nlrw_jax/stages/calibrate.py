"""`nlrw calibrate`: per-latent maps from raw simulated values to true activations, one per
calibration (nlrw_jax.rewrite.calibrate.CALIBRATIONS: the quantile maps "empirical" and "type8",
and "isotonic" and "abstain", fit on (prediction, true activation) pairs) and per calibration size
(`calibrate.sizes` plus all contexts): calibrate/maps/{calibration}_{size}.npz (latents x knots,
see nlrw_jax.rewrite.quantile), each fit on the first `size` calibration contexts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlrw_jax.config import Config, calibration_contexts, identity
from nlrw_jax.io import save_npz
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite.calibrate import CALIBRATIONS, fit_paired_map, raw_values, true_nonzero
from nlrw_jax.rewrite.simulate import true_values
from nlrw_jax.stages.common import load_coder, load_examples, model_identity, run_folder
from nlrw_jax.stages.simulate import load_predictions


def calibration_sizes(cfg: Config) -> list[int]:
    """The calibration-size sweep in contexts: `calibrate.sizes` and all of them (checked at load).
    In all_at_once mode the first n contexts are whole windows' read positions (window-major)."""
    return sorted(set(cfg.calibrate.sizes) | {calibration_contexts(cfg.simulate)})


def calibrate_identity(cfg: Config) -> dict:
    run = run_folder(cfg)
    return {**model_identity(cfg), "coder": load_coder(cfg)[2], "predictions": run.identity_hash("simulate"),
            "calibrate": identity(cfg.calibrate), "readout": cfg.simulate.readout,
            "calibrations": list(CALIBRATIONS)}


def run(cfg: Config, progress: bool = True) -> Path:
    preds = load_predictions(cfg, rows="calibration")  # expected ratings of the calibration contexts only
    run = run_folder(cfg)
    with run.claim("calibrate", calibrate_identity(cfg)) as out:
        sizes = calibration_sizes(cfg)
        todo = [(e, n) for e in CALIBRATIONS for n in sizes if not run.quantile_map(e, n).exists()]
        if not todo:
            return out
        ex = load_examples(cfg)
        latents = preds["latents"]
        max_act = ex.data["max_act"]
        calib = raw_values(preds.pop("expected"), preds["explained"], max_act[latents])
        (out / "maps").mkdir(exist_ok=True)
        quantile = sorted({e for e, _ in todo if e in Q.METHODS})
        stream = bool(quantile) or not run.true_frequency.exists()
        if stream:  # one streaming pass over the store
            nonzero, n_tokens = true_nonzero(ex.params, ex.meta, ex.rows, latents, cfg.calibrate.true_tokens,
                                             progress)
            levels = Q.quantile_levels()
            true_q = {e: np.stack([Q.true_quantiles(v, n_tokens, levels, e) for v in nonzero]) for e in quantile}
        true = true_values(preds["contexts"], latents, preds["rows"])  # paired with calib, context by context
        for estimator, size in todo:
            path = run.quantile_map(estimator, size)
            if estimator in Q.METHODS:
                pred_knots, true_knots = Q.fit_quantile_map(calib[:size], true_q[estimator], levels, estimator)
                Q.save_quantile_map(path, levels, pred_knots, true_knots, latents,
                                    {"estimator": estimator, "contexts": size, "true_tokens": n_tokens})
                continue
            m = fit_paired_map(estimator, calib[:size], true[:size], max_act[latents], cfg.calibrate.min_nonzero,
                               pool=preds["explained"])
            fell, t = latents[m["fallback"]], m["pooled_threshold"]
            Q.save_quantile_map(path, m["levels"], m["pred_knots"], m["true_knots"], latents, {
                "estimator": estimator, "contexts": size, "min_nonzero": cfg.calibrate.min_nonzero,
                "pooled_fallback": int(len(fell)), "pooled_fallback_latents": [int(x) for x in fell],
                "pooled_all_zero": m["pooled_all_zero"],
                "pooled_threshold_relative": t if t is None or np.isfinite(t) else "inf",
                "note": "levels are a placeholder (knot index / (K-1)): a paired map has no quantile levels"
                        + ("; no calibration pair of any pooled latent fires, so the pooled map is 0"
                           if m["pooled_all_zero"] else "")})
        if stream:
            save_npz(run.true_frequency, dict(latents=latents, firing=np.array([len(v) for v in nonzero]),
                                              tokens=np.int64(n_tokens)))
    return out
