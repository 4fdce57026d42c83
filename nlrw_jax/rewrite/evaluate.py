"""`nlrw evaluate`: the rewritten layer's loss for every condition, and the predictions' quality.

Conditions (METHOD.md, "Evaluation"): clean, transcoder, zero ablation, then the simulated values
(raw, and quantile-normalised by each calibrate map) for the top-scoring and a random fraction of
the simulated latents, at every `evaluate.fractions`. Fractions are of the simulated latents (all
explained ones; in the paper every latent was explained, so it is the same), the others keeping
their true values; "all_latents" also replaces the never-simulated latents, by zero (the paper's
full rewrite when only some latents are explained). All conditions come from one compiled patched
forward (patched.py) per batch of sentences, sharded over `data`.

Writes run_dir/evaluate/{results.json, table.csv, values.npz}: mean CE with bootstrap 95% CIs
(paired over sentences, also for the difference to clean), each condition's equivalent training
fraction on the curve of the model's intermediate checkpoints (CE at the same positions), and
per latent the specificity / sensitivity of the raw and normalised predictions.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.io import save_npz, write_json
from nlrw_jax.rewrite import calibrate as C
from nlrw_jax.rewrite import simulate as S
from nlrw_jax.rewrite.quantile import METHODS
from nlrw_jax.rewrite.patched import FIXED_CONDITIONS, check_shapes, make_patched_ce

SELECTIONS = ("top", "random")


def evaluate_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "evaluate"


def selection_masks(cfg, latents: np.ndarray, num_latents: int) -> tuple[np.ndarray, list[dict]]:
    """[2F + 1, num_latents] masks: per fraction, the top ceil(f L) simulated latents by the score
    ranking (unscored ones last), then as many chosen at random (evaluate.seed), then all latents."""
    from nlrw_jax.interpret.score import load_ranking

    fractions = cfg.evaluate.fractions
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"config key evaluate.fractions: {fractions} must be non-empty and in (0, 1]")
    rank = {lat: i for i, lat in enumerate(load_ranking(cfg))}
    top = sorted(latents, key=lambda lat: (rank.get(int(lat), len(rank)), int(lat)))
    rand = np.random.default_rng(cfg.evaluate.seed).permutation(latents)
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


def _bootstrap(ce: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n, C] condition means over resampled sentences (the same resample for every condition)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ce.shape[1], (n, ce.shape[1]))
    return ce[:, idx].mean(-1).T


def _ci(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def checkpoint_curve(cfg, windows: np.ndarray, positions: np.ndarray, clean_ce: float) -> list[dict]:
    """CE at the evaluated positions of the model's partially trained checkpoints (checkpoints.json
    next to a local checkpoint), sorted by training fraction; the final model is fraction 1."""
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoX, token_cross_entropy

    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    index = folder.parent / "checkpoints.json"
    curve = [{"name": folder.name, "fraction": 1.0, "ce": clean_ce}]
    if not index.exists():
        return curve
    dtype = jnp.dtype(cfg.model.dtype)
    compiled = {}  # one jitted CE function per architecture: the checkpoints share it
    for name, entry in json.loads(index.read_text())["checkpoints"].items():
        if name == folder.name or not (folder.parent / name).is_dir():
            continue
        config, params = hf.load(folder.parent / name, dtype=dtype)
        if repr(config) not in compiled:
            model = GPTNeoX(config, dtype=dtype)
            compiled[repr(config)] = jax.jit(lambda p, w, pos, model=model: token_cross_entropy(
                model.apply({"params": p}, w)[0], w)[jnp.arange(w.shape[0]), pos])
        ce_at = compiled[repr(config)]
        bs = cfg.evaluate.batch_size
        ces = np.concatenate([np.asarray(ce_at(params, windows[i:i + bs], positions[i:i + bs]))
                              for i in range(0, len(windows), bs)])
        curve.append({"name": name, "fraction": float(entry["fraction"]), "ce": float(ces.mean())})
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
    p, t = pred > threshold, true > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = (~p & ~t).sum(0) / (~t).sum(0)
        sens = (p & t).sum(0) / t.sum(0)
    return {"specificity": spec, "sensitivity": sens,
            "pooled_specificity": float((~p & ~t).sum() / max((~t).sum(), 1)),
            "pooled_sensitivity": float((p & t).sum() / t.sum()) if t.sum() else float("nan")}


def evaluate_from_config(cfg, progress: bool = True) -> Path:
    from nlrw_jax.interpret.examples import Examples
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoX
    from nlrw_jax.parallel import batch_sharding, make_mesh, replicated

    e = cfg.evaluate
    preds = S.load_predictions(cfg)
    latents, explained, contexts = preds["latents"], preds["explained"], preds["contexts"]
    n_eval = int(contexts["n_eval"])
    ex = Examples(cfg)
    raw = C.raw_values(cfg, preds, ex)[:n_eval]
    sizes = C.calibration_sizes(cfg)
    variants = {"raw": raw}
    main = (cfg.calibrate.estimator, sizes[-1])
    for est, size in [main] + [(x, n) for x in sorted(METHODS) for n in sizes if (x, n) != main]:
        variants["normalised" if (est, size) == main else f"normalised:{est}:{size}"] = \
            C.normalised_values(cfg, raw, latents, explained, est, size)
    num_latents = ex.num_latents
    masks, mask_meta = selection_masks(cfg, latents, num_latents)
    values = np.zeros((len(variants), n_eval, num_latents), np.float32)
    for v, arr in enumerate(variants.values()):
        values[v][:, latents] = arr
    check_shapes(values, masks, num_latents)

    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
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
    boot = _bootstrap(ce, e.bootstrap, e.seed)
    delta = boot - boot[:, :1]
    curve = checkpoint_curve(cfg, windows, positions, float(ce[0].mean()))
    conditions = []
    for i, cond in enumerate(names):
        f, note = equivalent_fraction(float(ce[i].mean()), curve)
        conditions.append({**cond, "ce": float(ce[i].mean()), "ce_ci": _ci(boot[:, i]),
                           "delta_vs_clean": float((ce[i] - ce[0]).mean()), "delta_ci": _ci(delta[:, i]),
                           "equivalent_fraction": f, "equivalent_note": note})
    true = S.true_values(contexts, latents)[:n_eval]
    threshold = ex.data["max_act"][latents] / 18.0
    rates = {v: active_rates(arr, true, threshold) for v, arr in variants.items()}
    scores = _detection_scores(cfg)
    per_latent = [{"latent": int(lat), "explained": bool(explained[j]), "true_active": int((true[:, j] > 0).sum()),
                   **scores.get(int(lat), {}),
                   **{f"{v}_{k}": _num(rates[v][k][j]) for v in ("raw", "normalised")
                      for k in ("specificity", "sensitivity")}}
                  for j, lat in enumerate(latents)]
    sweep = [{"variant": v, "pooled_specificity": r["pooled_specificity"],
              "pooled_sensitivity": r["pooled_sensitivity"],
              "ce_top_all": next(c["ce"] for c in conditions if c["name"] == v and c.get("selection") == "top"
                                 and c["fraction"] == max(e.fractions))}
             for v, r in rates.items()]
    out = evaluate_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_npz(out / "values.npz", dict(latents=latents, true=true, ce=ce, **{v.replace(":", "_"): a
                                                                              for v, a in variants.items()}))
    result = {"sentences": n_eval, "calibration_contexts": len(contexts["positions"]) - n_eval,
              "latents_total": num_latents, "latents_simulated": len(latents),
              "latents_explained": int(explained.sum()), "unexplained_simulated_as_zero": int((~explained).sum()),
              "readout": cfg.simulate.readout, "estimator": cfg.calibrate.estimator, "fractions": e.fractions,
              "layer": cfg.model.layer, "kind": ex.meta["kind"], "checkpoints": curve, "conditions": conditions,
              "calibration_sweep": sweep, "latents": per_latent}
    write_json(out / "results.json", result)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "selection", "fraction", "n_selected", "ce", "ce_lo", "ce_hi", "delta_vs_clean",
                    "equivalent_fraction"])
        for c in conditions:
            w.writerow([c["name"], c.get("selection", ""), c.get("fraction", ""), c.get("n_selected", ""),
                        f"{c['ce']:.4f}", f"{c['ce_ci'][0]:.4f}", f"{c['ce_ci'][1]:.4f}",
                        f"{c['delta_vs_clean']:.4f}", c["equivalent_note"]])
    return out


def _num(x) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _detection_scores(cfg) -> dict[int, dict]:
    path = Path(cfg.run_dir) / "scores" / "table.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        return {int(r["latent"]): {"detection_auc": _num(float(r["detection_auc"] or "nan")),
                                   "detection_balanced_accuracy": _num(float(r["detection_balanced_accuracy"] or "nan"))}
                for r in csv.DictReader(f)}
