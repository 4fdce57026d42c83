"""`nlrw evaluate`: the rewritten layer's loss for every condition, and the predictions' quality.

Conditions (METHOD.md, "Evaluation"): clean, transcoder, the baselines (zero ablation, mean
ablation, the coder with every latent at zero, every latent at its mean; the means over the first
`evaluate.baseline_tokens` tokens of the activation store), then the simulated values
(raw, and normalised by each calibrate map: quantile, isotonic, abstaining) for the top-scoring and a random fraction of
the simulated latents, at every `evaluate.fractions`. Fractions are of the simulated latents (all
explained ones; in the paper every latent was explained, so it is the same), the others keeping
their true values; "all_latents" also replaces the never-simulated latents, by zero (the paper's
full rewrite when only some latents are explained). All conditions come from one compiled patched
forward (nlrw_jax.rewrite.patched, KV-cached) per batch of windows, sharded over `data`.

The evaluated contexts are the simulation's (window, position) pairs: one per window in the
paper's one-at-a-time protocol, every read position of the window with all-at-once simulation.
`evaluate.modes`: "each" patches each position alone, "whole_layer" all of a window's positions
at once; the first mode is the main one (results.json "conditions"), others go to "other_modes".

Writes evaluate/{results.json, table.csv, values.npz}: per condition the mean CE and KL(clean ||
patched) with bootstrap 95% CIs (resampling windows, the same resample for every condition, so
the CE difference to clean is paired), each condition's equivalent training fraction on the
curve of the model's intermediate checkpoints (CE at the same contexts), and per latent the
specificity / sensitivity of the raw and normalised predictions (nlrw_jax.rewrite.metrics).
values.npz holds the true and predicted values [contexts, simulated latents] of every variant
while they are small, else (the paper's widths) of "raw" and "normalised" only: results.json
"values_saved" names them (":" written "_" in the file). Nothing [contexts, latents] is held but
the raw values: each variant is made for a batch's contexts only.
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
from nlrw_jax.rewrite.calibrate import CALIBRATIONS, apply_map, load_map, map_meta, raw_values
from nlrw_jax.rewrite.metrics import active_counts, baseline_means, bootstrap, checkpoint_curve, ci, \
    equivalent_fraction, finite_or_none, rates_from_counts, selection_masks
from nlrw_jax.rewrite.patched import FIXED_CONDITIONS, check_positions, check_shapes, make_patched_eval
from nlrw_jax.rewrite.simulate import true_values
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.calibrate import calibrate_identity, calibration_sizes
from nlrw_jax.stages.common import load_examples, model_folder, model_identity, run_folder, training_curve
from nlrw_jax.stages.simulate import load_predictions


SAVE_ALL_VARIANTS = 1 << 27  # values.npz holds every variant up to this many values (512 MB), else two


def window_slots(window: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contexts grouped by window: (windows used [W], slots [W, R] context index or -1, positions [W, R]),
    each window's positions ascending, the windows ordered by their last position so that a batch's
    clean run (up to its largest position) wastes little."""
    used, inv = np.unique(window, return_inverse=True)
    r = int(np.bincount(inv).max())
    slots = np.full((len(used), r), -1, np.int64)
    fill = np.zeros(len(used), np.int64)
    for c in np.lexsort((positions, inv)):
        slots[inv[c], fill[inv[c]]] = c
        fill[inv[c]] += 1
    pos = np.where(slots >= 0, positions[np.maximum(slots, 0)], -1)
    order = np.argsort(pos.max(1), kind="stable")
    return used[order], slots[order], pos[order]


def run(cfg: Config, progress: bool = True) -> Path:
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoX
    from nlrw_jax.parallel import batch_sharding, make_mesh, replicated

    e = cfg.evaluate
    run = run_folder(cfg)
    preds = load_predictions(cfg, rows="evaluation")
    run.check("calibrate", calibrate_identity(cfg))
    ex = load_examples(cfg)
    ranking = run.read_ranking()
    folder = model_folder(cfg)
    config = hf.read_config(folder)
    if cfg.data.ctx_len > config.max_position_embeddings:
        raise UserError(f"config key data.ctx_len: {cfg.data.ctx_len}-token windows are longer than the model's "
                        f"max_position_embeddings ({config.max_position_embeddings}, {folder})")
    ident = {**model_identity(cfg), "coder": ex.coder_hash, "predictions": run.identity_hash("simulate"),
             "maps": run.identity_hash("calibrate"), "scores": file_digest(run.score_table),
             "ranking": file_digest(run.ranking), "evaluate": identity(e), "readout": cfg.simulate.readout,
             "estimator": cfg.calibrate.estimator}
    with run.claim("evaluate", ident) as out:
        if run.results.exists():
            return out
        latents, explained, contexts = preds["latents"], preds["explained"], preds["contexts"]
        n_eval = int(contexts["n_eval"])
        window, positions = contexts["window"][:n_eval], contexts["positions"][:n_eval]
        # The one [evaluation contexts, simulated latents] array held whole (4 GB at the paper's 32K
        # x 32K): the raw values. The windows are batched by their last position, not in shard
        # order, so each batch needs contexts from everywhere; the calibrated variants are made from
        # it for a batch's contexts only (`values`), never for all contexts at once.
        raw = raw_values(preds.pop("expected"), explained, ex.data["max_act"][latents])
        sizes = calibration_sizes(cfg)
        main = (cfg.calibrate.estimator, sizes[-1])
        maps, fallback = {}, {}  # fallback: variant -> latents on the pooled map (paired calibrations only)
        for est, size in [main] + [(x, n) for x in CALIBRATIONS for n in sizes if (x, n) != main]:
            name = "normalised" if (est, size) == main else f"normalised:{est}:{size}"
            maps[name] = load_map(run.quantile_map(est, size), latents)
            fallback[name] = map_meta(run.quantile_map(est, size)).get("pooled_fallback")
        variants = ["raw", *maps]

        def values(rows, names=variants) -> np.ndarray:
            """[variants, rows, simulated latents] at the evaluation contexts `rows`."""
            r = raw[rows]
            out = np.empty((len(names), *r.shape), np.float32)
            for i, v in enumerate(names):
                out[i] = r if v == "raw" else apply_map(maps[v], r, explained)
            return out

        num_latents = ex.num_latents
        masks, mask_meta = selection_masks(ranking, latents, num_latents, e.fractions, e.seed)
        check_shapes(np.zeros((len(variants), 1, num_latents)), masks, num_latents)
        means = baseline_means(ex.params, ex.meta, ex.rows, e.baseline_tokens, progress)

        dtype = jnp.dtype(cfg.model.dtype)
        config, lm_params = hf.load(folder, dtype=dtype)
        model = GPTNeoX(config, dtype=dtype)
        # Single-host work: in a multi-host run process 0 does it on its own devices.
        mesh = make_mesh(cfg.mesh.data, 1) if jax.process_count() == 1 else make_mesh(-1, 1, jax.local_devices())
        rep, data = replicated(mesh), batch_sharding(mesh)
        along_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
        lm_params, coder, masks_d, means_d = jax.device_put(
            (lm_params, ex.params, masks, {k: means[k] for k in ("out", "latents")}), rep)
        bs = e.batch_size
        if bs % mesh.shape["data"]:
            raise UserError(f"config key evaluate.batch_size: {bs} must be a multiple of the {mesh.shape['data']} "
                            f"data-parallel devices")
        used, slots, pos = window_slots(window, positions)
        all_windows = contexts["windows"]
        check_positions(pos, all_windows.shape[1], real=slots >= 0)  # before any compile
        fns = {mode: make_patched_eval(model, cfg.model.layer, ex.meta["kind"], ex.meta["k"], mode) for mode in e.modes}
        n_cond = len(FIXED_CONDITIONS) + len(variants) * len(masks)
        results = {mode: (np.full((n_cond, n_eval), np.nan, np.float32), np.full((n_cond, n_eval), np.nan, np.float32))
                   for mode in e.modes}
        threshold = ex.data["max_act"][latents] / 18.0
        counts = np.zeros((len(variants), 4, len(latents)), np.int64)  # per variant, summed over the batches
        for lo in tqdm(range(0, len(used), bs), desc=f"evaluate ({', '.join(e.modes)}, patched forward)",
                       unit="batch", disable=not progress):
            sl = slots[lo:lo + bs]
            pad = bs - len(sl)  # one compiled shape per run length
            sl = np.pad(sl, ((0, pad), (0, 0)), constant_values=-1)
            w = all_windows[np.pad(used[lo:lo + bs], (0, pad), mode="edge")]
            p = np.pad(pos[lo:lo + bs], ((0, pad), (0, 0)), constant_values=0)
            real = sl >= 0
            p = np.where(real, p, 0)
            vals = values(np.maximum(sl, 0).ravel())  # [V, bs x positions, L]; padding reads context 0
            # Each evaluation context is real in exactly one batch: its specificity / sensitivity
            # counts are added here (integers: the same as counted over all contexts at once).
            true = true_values(contexts, latents, sl[real])
            counts += np.stack([active_counts(x[real.ravel()], true, threshold) for x in vals])
            v = np.zeros((len(variants), bs, sl.shape[1], num_latents), np.float32)
            v[..., latents] = vals.reshape(len(variants), *sl.shape, -1)
            del vals
            batch = (jax.device_put(w, data), jax.device_put(p, data), jax.device_put(real, data),
                     jax.device_put(v, along_data))
            for mode, fn in fns.items():  # the modes share the batch's inputs
                got_ce, got_kl = fn(lm_params, coder, *batch, masks_d, means_d)
                ce, kl = results[mode]
                ce[:, sl[real]] = np.asarray(got_ce)[:, real]
                kl[:, sl[real]] = np.asarray(got_kl)[:, real]

        names = [{"name": n} for n in FIXED_CONDITIONS] + [{"name": v, **m} for v in variants for m in mask_meta]
        ce, kl = results[e.modes[0]]
        curve = checkpoint_curve(training_curve(cfg), cfg.model.revision or folder.name, cfg.model.dtype, all_windows,
                                 window, positions, float(ce[0].mean()), e.batch_size)
        conditions = {mode: summarise(names, *results[mode], window, curve, e) for mode in e.modes}
        main_conditions = conditions[e.modes[0]]
        rates = {v: rates_from_counts(c) for v, c in zip(variants, counts)}
        scores = _detection_scores(run.score_table)
        per_latent = [{"latent": int(lat), "explained": bool(explained[j]), "true_active": int(counts[0, 3, j]),
                       **scores.get(int(lat), {}),
                       **{f"{v}_{k}": finite_or_none(rates[v][k][j]) for v in ("raw", "normalised")
                          for k in ("specificity", "sensitivity")}}
                      for j, lat in enumerate(latents)]
        top_all = next(c for c in main_conditions if c.get("selection") == "top" and c["fraction"] == max(e.fractions))
        sweep = [{"variant": v, "pooled_specificity": r["pooled_specificity"],
                  "pooled_sensitivity": r["pooled_sensitivity"], "pooled_fallback": fallback.get(v),
                  **{f"{k}_top_all": next(c[k] for c in main_conditions if c["name"] == v and c.get("selection") ==
                                          "top" and c["fraction"] == top_all["fraction"]) for k in ("ce", "kl")}}
                 for v, r in rates.items()]
        extra = {f"{k}_{mode}": results[mode][i] for mode in e.modes[1:] for i, k in enumerate(("ce", "kl"))}
        # Every variant's values while they are small; at the paper's widths (4 GB each) only what the
        # report reads. Written block by block: no [contexts, latents] array beyond `raw` is made.
        saved = variants if n_eval * len(latents) * len(variants) <= SAVE_ALL_VARIANTS else ["raw", "normalised"]
        shape, step = (n_eval, len(latents)), max(1, (1 << 24) // max(1, len(latents)))
        blocks = [slice(lo, min(lo + step, n_eval)) for lo in range(0, n_eval, step)]

        def in_blocks(f):  # (shape, dtype, f's row blocks), made one at a time as save_npz writes them
            return shape, np.float32, (f(r) for r in blocks)

        save_npz(run.values, dict(latents=latents, ce=ce, kl=kl, window=window, positions=positions, **extra), {
            "true": in_blocks(lambda r: true_values(contexts, latents, r)),
            **{v.replace(":", "_"): in_blocks(lambda r, v=v: values(r, [v])[0]) for v in saved}})
        write_text(run.results_table, conditions_csv(conditions))
        # results.json last: its presence says the stage is complete
        write_json(run.results, {
            "sentences": int(len(used)), "contexts": n_eval, "positions_per_window": int(slots.shape[1]),
            "simulate_mode": cfg.simulate.mode, "mode": e.modes[0],
            "calibration_contexts": len(contexts["positions"]) - n_eval,
            "latents_total": num_latents, "latents_simulated": len(latents),
            "latents_explained": int(explained.sum()), "unexplained_simulated_as_zero": int((~explained).sum()),
            "readout": cfg.simulate.readout, "estimator": cfg.calibrate.estimator, "fractions": e.fractions,
            "layer": cfg.model.layer, "kind": ex.meta["kind"], "baseline_tokens": means["tokens"],
            "checkpoints": curve, "conditions": main_conditions, "values_saved": saved,
            "other_modes": {mode: conditions[mode] for mode in e.modes[1:]},
            "calibration_sweep": sweep, "latents": per_latent})
    return out


def summarise(names: list[dict], ce: np.ndarray, kl: np.ndarray, window: np.ndarray, curve: list[dict], e) -> list[dict]:
    """Per condition: mean CE and KL with 95% CIs (resampling whole windows), the CE difference to
    clean with its paired CI, and the equivalent training fraction."""
    boot = bootstrap(np.concatenate([ce, kl]), e.bootstrap, e.seed, window)
    boot_ce, boot_kl = boot[:, :len(ce)], boot[:, len(ce):]
    delta = boot_ce - boot_ce[:, :1]
    out = []
    for i, cond in enumerate(names):
        f, note = equivalent_fraction(float(ce[i].mean()), curve)
        out.append({**cond, "ce": float(ce[i].mean()), "ce_ci": ci(boot_ce[:, i]),
                    "delta_vs_clean": float((ce[i] - ce[0]).mean()), "delta_ci": ci(delta[:, i]),
                    "kl": float(kl[i].mean()), "kl_ci": ci(boot_kl[:, i]),
                    "equivalent_fraction": f, "equivalent_note": note})
    return out


def conditions_csv(conditions: dict[str, list[dict]]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["mode", "condition", "selection", "fraction", "n_selected", "ce", "ce_lo", "ce_hi", "delta_vs_clean",
                "delta_lo", "delta_hi", "kl", "kl_lo", "kl_hi", "equivalent_fraction"])
    for mode, conds in conditions.items():
        for c in conds:
            w.writerow([mode, c["name"], c.get("selection", ""), c.get("fraction", ""), c.get("n_selected", ""),
                        *(f"{x:.4f}" for x in (c["ce"], *c["ce_ci"], c["delta_vs_clean"], *c["delta_ci"], c["kl"],
                                               *c["kl_ci"])), c["equivalent_note"]])
    return buf.getvalue()


def _detection_scores(table: Path) -> dict[int, dict]:
    if not table.exists():
        return {}
    with open(table) as f:
        return {int(r["latent"]): {"detection_auc": finite_or_none(float(r["detection_auc"] or "nan")),
                                   "detection_balanced_accuracy":
                                       finite_or_none(float(r["detection_balanced_accuracy"] or "nan"))}
                for r in csv.DictReader(f)}
