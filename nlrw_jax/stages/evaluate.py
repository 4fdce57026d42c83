"""`nlrw evaluate`: the rewritten layer's loss for every condition, and the predictions' quality.

Conditions (METHOD.md, "Evaluation"): clean, transcoder, zero ablation, then the simulated values
(raw, and quantile-normalised by each calibrate map) for the top-scoring and a random fraction of
the simulated latents, at every `evaluate.fractions`. Fractions are of the simulated latents (all
explained ones; in the paper every latent was explained, so it is the same), the others keeping
their true values; "all_latents" also replaces the never-simulated latents, by zero (the paper's
full rewrite when only some latents are explained). All conditions come from one compiled patched
forward (nlrw_jax.rewrite.patched) per batch of sentences, sharded over `data`.

Writes evaluate/{results.json, table.csv, values.npz}: mean CE with bootstrap 95% CIs (paired
over sentences, also for the difference to clean), each condition's equivalent training fraction
on the curve of the model's intermediate checkpoints (CE at the same positions), and per latent
the specificity / sensitivity of the raw and normalised predictions (nlrw_jax.rewrite.metrics).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.io import save_npz, write_json, write_text
from nlrw_jax.rewrite.calibrate import normalised_values, raw_values
from nlrw_jax.rewrite.metrics import active_rates, bootstrap, checkpoint_curve, ci, equivalent_fraction, \
    finite_or_none, selection_masks
from nlrw_jax.rewrite.patched import FIXED_CONDITIONS, check_shapes, make_patched_ce
from nlrw_jax.rewrite.quantile import METHODS
from nlrw_jax.rewrite.simulate import true_values
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.calibrate import calibrate_identity, calibration_sizes
from nlrw_jax.stages.common import load_examples, model_folder, model_identity, run_folder
from nlrw_jax.stages.simulate import load_predictions


def run(cfg: Config, progress: bool = True) -> Path:
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoX
    from nlrw_jax.parallel import batch_sharding, make_mesh, replicated

    e = cfg.evaluate
    run = run_folder(cfg)
    preds = load_predictions(cfg)
    run.check("calibrate", calibrate_identity(cfg))
    ex = load_examples(cfg)
    ranking = run.read_ranking()
    ident = {**model_identity(cfg), "coder": ex.coder_hash, "predictions": run.identity_hash("simulate"),
             "maps": run.identity_hash("calibrate"), "scores": file_digest(run.score_table),
             "ranking": file_digest(run.ranking), "evaluate": identity(e), "readout": cfg.simulate.readout,
             "estimator": cfg.calibrate.estimator}
    with run.claim("evaluate", ident) as out:
        if run.results.exists():
            return out
        latents, explained, contexts = preds["latents"], preds["explained"], preds["contexts"]
        n_eval = int(contexts["n_eval"])
        raw = raw_values(preds, ex.data["max_act"], cfg.simulate.readout)[:n_eval]
        sizes = calibration_sizes(cfg)
        variants = {"raw": raw}
        main = (cfg.calibrate.estimator, sizes[-1])
        for est, size in [main] + [(x, n) for x in sorted(METHODS) for n in sizes if (x, n) != main]:
            variants["normalised" if (est, size) == main else f"normalised:{est}:{size}"] = \
                normalised_values(run.quantile_map(est, size), raw, latents, explained)
        num_latents = ex.num_latents
        masks, mask_meta = selection_masks(ranking, latents, num_latents, e.fractions, e.seed)
        values = np.zeros((len(variants), n_eval, num_latents), np.float32)
        for v, arr in enumerate(variants.values()):
            values[v][:, latents] = arr
        check_shapes(values, masks, num_latents)

        folder = model_folder(cfg)
        dtype = jnp.dtype(cfg.model.dtype)
        config, lm_params = hf.load(folder, dtype=dtype)
        fn = make_patched_ce(GPTNeoX(config, dtype=dtype), cfg.model.layer, ex.meta["kind"], ex.meta["k"])
        # Single-host work: in a multi-host run process 0 does it on its own devices.
        mesh = make_mesh(cfg.mesh.data, 1) if jax.process_count() == 1 else make_mesh(-1, 1, jax.local_devices())
        rep, data = replicated(mesh), batch_sharding(mesh)
        lm_params, coder, masks_d = jax.device_put((lm_params, ex.params, masks), rep)
        bs = e.batch_size
        if bs % mesh.shape["data"]:
            raise UserError(f"config key evaluate.batch_size: {bs} must be a multiple of the {mesh.shape['data']} "
                            f"data-parallel devices")
        windows, positions = contexts["windows"][:n_eval], contexts["positions"][:n_eval]
        ces = []
        for lo in tqdm(range(0, n_eval, bs), desc="evaluate (patched forward)", unit="batch", disable=not progress):
            w, p, v = windows[lo:lo + bs], positions[lo:lo + bs], values[:, lo:lo + bs]
            pad = bs - len(w)  # one compiled shape for every batch
            w, p = np.pad(w, ((0, pad), (0, 0))), np.pad(p, (0, pad), constant_values=positions[0])
            v = np.pad(v, ((0, 0), (0, pad), (0, 0)))
            got = fn(lm_params, coder, jax.device_put(w, data), jax.device_put(p, data),
                     jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))),
                     masks_d)
            ces.append(np.asarray(got)[:, :bs - pad])
        ce = np.concatenate(ces, axis=1)  # [conditions, sentences]

        names = [{"name": n} for n in FIXED_CONDITIONS] + [{"name": v, **m} for v in variants for m in mask_meta]
        boot = bootstrap(ce, e.bootstrap, e.seed)
        delta = boot - boot[:, :1]
        curve = checkpoint_curve(folder, cfg.model.dtype, windows, positions, float(ce[0].mean()), e.batch_size)
        conditions = []
        for i, cond in enumerate(names):
            f, note = equivalent_fraction(float(ce[i].mean()), curve)
            conditions.append({**cond, "ce": float(ce[i].mean()), "ce_ci": ci(boot[:, i]),
                               "delta_vs_clean": float((ce[i] - ce[0]).mean()), "delta_ci": ci(delta[:, i]),
                               "equivalent_fraction": f, "equivalent_note": note})
        true = true_values(contexts, latents)[:n_eval]
        threshold = ex.data["max_act"][latents] / 18.0
        rates = {v: active_rates(arr, true, threshold) for v, arr in variants.items()}
        scores = _detection_scores(run.score_table)
        per_latent = [{"latent": int(lat), "explained": bool(explained[j]), "true_active": int((true[:, j] > 0).sum()),
                       **scores.get(int(lat), {}),
                       **{f"{v}_{k}": finite_or_none(rates[v][k][j]) for v in ("raw", "normalised")
                          for k in ("specificity", "sensitivity")}}
                      for j, lat in enumerate(latents)]
        sweep = [{"variant": v, "pooled_specificity": r["pooled_specificity"],
                  "pooled_sensitivity": r["pooled_sensitivity"],
                  "ce_top_all": next(c["ce"] for c in conditions if c["name"] == v and c.get("selection") == "top"
                                     and c["fraction"] == max(e.fractions))}
                 for v, r in rates.items()]
        save_npz(run.values, dict(latents=latents, true=true, ce=ce, **{v.replace(":", "_"): a
                                                                       for v, a in variants.items()}))
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["condition", "selection", "fraction", "n_selected", "ce", "ce_lo", "ce_hi", "delta_vs_clean",
                    "equivalent_fraction"])
        for c in conditions:
            w.writerow([c["name"], c.get("selection", ""), c.get("fraction", ""), c.get("n_selected", ""),
                        f"{c['ce']:.4f}", f"{c['ce_ci'][0]:.4f}", f"{c['ce_ci'][1]:.4f}",
                        f"{c['delta_vs_clean']:.4f}", c["equivalent_note"]])
        write_text(run.results_table, buf.getvalue())
        # results.json last: its presence says the stage is complete
        write_json(run.results, {
            "sentences": n_eval, "calibration_contexts": len(contexts["positions"]) - n_eval,
            "latents_total": num_latents, "latents_simulated": len(latents),
            "latents_explained": int(explained.sum()), "unexplained_simulated_as_zero": int((~explained).sum()),
            "readout": cfg.simulate.readout, "estimator": cfg.calibrate.estimator, "fractions": e.fractions,
            "layer": cfg.model.layer, "kind": ex.meta["kind"], "checkpoints": curve, "conditions": conditions,
            "calibration_sweep": sweep, "latents": per_latent})
    return out


def _detection_scores(table: Path) -> dict[int, dict]:
    if not table.exists():
        return {}
    with open(table) as f:
        return {int(r["latent"]): {"detection_auc": finite_or_none(float(r["detection_auc"] or "nan")),
                                   "detection_balanced_accuracy":
                                       finite_or_none(float(r["detection_balanced_accuracy"] or "nan"))}
                for r in csv.DictReader(f)}
