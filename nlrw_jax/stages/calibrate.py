"""`nlrw calibrate`: per-latent quantile maps from raw simulated values to true activations, one per
estimator ("empirical", "type8") and per calibration size (`calibrate.sizes` plus all contexts):
calibrate/maps/{estimator}_{size}.npz (latents x quantile grid, see nlrw_jax.rewrite.quantile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlrw_jax.config import Config, calibration_contexts, identity
from nlrw_jax.io import save_npz
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite.calibrate import raw_values, true_nonzero
from nlrw_jax.stages.common import load_coder, load_examples, model_identity, run_folder
from nlrw_jax.stages.simulate import load_predictions


def calibration_sizes(cfg: Config) -> list[int]:
    """The calibration-size sweep in contexts: `calibrate.sizes` and all of them (checked at load).
    In all_at_once mode the first n contexts are whole windows' read positions (window-major)."""
    return sorted(set(cfg.calibrate.sizes) | {calibration_contexts(cfg.simulate)})


def calibrate_identity(cfg: Config) -> dict:
    run = run_folder(cfg)
    return {**model_identity(cfg), "coder": load_coder(cfg)[2], "predictions": run.identity_hash("simulate"),
            "calibrate": identity(cfg.calibrate), "readout": cfg.simulate.readout}


def run(cfg: Config, progress: bool = True) -> Path:
    preds = load_predictions(cfg)
    run = run_folder(cfg)
    with run.claim("calibrate", calibrate_identity(cfg)) as out:
        sizes = calibration_sizes(cfg)
        todo = [(e, n) for e in sorted(Q.METHODS) for n in sizes if not run.quantile_map(e, n).exists()]
        if not todo:
            return out
        ex = load_examples(cfg)
        latents, n_eval = preds["latents"], int(preds["contexts"]["n_eval"])
        calib = raw_values(preds, ex.data["max_act"], cfg.simulate.readout)[n_eval:]
        nonzero, n_tokens = true_nonzero(ex.params, ex.meta, ex.rows, latents, cfg.calibrate.true_tokens, progress)
        levels = Q.quantile_levels()
        (out / "maps").mkdir(exist_ok=True)
        true_q = {e: np.stack([Q.true_quantiles(v, n_tokens, levels, e) for v in nonzero]) for e, _ in todo}
        for estimator, size in todo:
            pred_knots, true_knots = Q.fit_quantile_map(calib[:size], true_q[estimator], levels, estimator)
            Q.save_quantile_map(run.quantile_map(estimator, size), levels, pred_knots, true_knots, latents,
                                {"estimator": estimator, "contexts": size, "true_tokens": n_tokens})
        save_npz(run.true_frequency, dict(latents=latents, firing=np.array([len(v) for v in nonzero]),
                                          tokens=np.int64(n_tokens)))
    return out
