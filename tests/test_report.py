"""`nlrw report` on a synthetic run folder: results.json / values.npz as nlrw_jax/stages/evaluate.py writes them."""

import json
import re

import numpy as np
import pytest

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.report.plots import PLOTS
from nlrw_jax.report.stats import spearman
from nlrw_jax.stages.report import run as report_from_config

FRACTIONS = [0.25, 0.5, 1.0]
SIZES = [4, 8]  # calibrate sizes; 8 = every calibration context (the main "normalised")


def _ci(x):
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def make_run(run_dir, *, raw_all=4.6, norm_all=4.3, n_sentences=24, latents_simulated=8, seed=0):
    """A run folder with evaluate/{results.json, values.npz} in evaluate.py's schema. CE per sentence is a
    condition level plus shared per-sentence noise; raw_all / norm_all are the levels with every latent replaced."""
    rng = np.random.default_rng(seed)
    levels = {"clean": 4.0, "transcoder": 4.05, "zero_ablation": 4.4, "mean_ablation": 4.35, "coder_zero": 4.1,
              "latent_means": 4.12}
    names = [{"name": n} for n in levels]
    variants = ["raw", "normalised", "normalised:empirical:4", "normalised:empirical:8", "normalised:type8:4"]
    mask_meta = [{"selection": s, "fraction": f, "n_selected": int(np.ceil(f * latents_simulated))}
                 for s in ("top", "random") for f in FRACTIONS]
    lv = list(levels.values())
    for v in variants:
        full = raw_all if v == "raw" else norm_all + (0.02 if ":" in v else 0.0)
        for m in mask_meta:
            # top degrades less than random at partial fractions; at 1.0 both select every latent
            slope = 1.0 if m["selection"] == "random" or m["fraction"] == 1.0 else 0.6
            lv.append(4.05 + slope * m["fraction"] * (full - 4.05))
        names += [{"name": v, **m} for m in mask_meta]
    noise = rng.normal(0, 0.3, n_sentences)
    ce = np.array(lv)[:, None] + noise[None] + rng.normal(0, 0.01, (len(lv), n_sentences))
    idx = rng.integers(0, n_sentences, (200, n_sentences))
    boot = ce[:, idx].mean(-1).T
    delta = boot - boot[:, :1]
    curve = [{"name": "step60", "fraction": 0.1, "ce": 5.2}, {"name": "step300", "fraction": 0.5, "ce": 4.5},
             {"name": "final", "fraction": 1.0, "ce": float(ce[0].mean())}]
    kl = np.abs(ce - ce[:1]) * 0.5  # 0 for clean, larger for the worse conditions
    boot_kl = kl[:, idx].mean(-1).T
    conditions = [{**c, "ce": float(ce[i].mean()), "ce_ci": _ci(boot[:, i]),
                   "delta_vs_clean": float((ce[i] - ce[0]).mean()), "delta_ci": _ci(delta[:, i]),
                   "kl": float(kl[i].mean()), "kl_ci": _ci(boot_kl[:, i]),
                   "equivalent_fraction": 0.5, "equivalent_note": "0.500"} for i, c in enumerate(names)]
    latents = np.arange(0, 2 * latents_simulated, 2)
    true = np.where(rng.random((n_sentences, latents_simulated)) < 0.2,
                    rng.gamma(2, 1, (n_sentences, latents_simulated)), 0).astype(np.float32)
    true[:, 0] = 0  # a latent that never fires: no sensitivity
    raw = (rng.random((n_sentences, latents_simulated)) * 3).astype(np.float32)
    norm = np.where(raw > 2.2, raw - 2, 0).astype(np.float32)
    explained = np.ones(latents_simulated, bool)
    explained[-1] = False
    raw[:, -1] = norm[:, -1] = 0
    per_latent = []
    for j, lat in enumerate(latents):
        t = true[:, j] > 0
        row = {"latent": int(lat), "explained": bool(explained[j]), "true_active": int(t.sum())}
        if j != 1:  # latent 1 has no detection score
            row.update(detection_auc=float(0.5 + 0.05 * j), detection_balanced_accuracy=0.5)
        for v, arr in (("raw", raw), ("normalised", norm)):
            p = arr[:, j] > 0.3
            row[f"{v}_specificity"] = float((~p & ~t).sum() / (~t).sum()) if (~t).any() else None
            row[f"{v}_sensitivity"] = float((p & t).sum() / t.sum()) if t.any() else None
        per_latent.append(row)
    sweep = [{"variant": v, "pooled_specificity": 0.5 if v == "raw" else 0.9,
              "pooled_sensitivity": 0.8 if v == "raw" else 0.4 + 0.01 * i,
              "ce_top_all": next(c["ce"] for c in conditions if c["name"] == v and c.get("selection") == "top"
                                 and c["fraction"] == 1.0)} for i, v in enumerate(variants)]
    result = {"sentences": n_sentences, "calibration_contexts": SIZES[-1], "latents_total": 64,
              "latents_simulated": latents_simulated, "latents_explained": int(explained.sum()),
              "unexplained_simulated_as_zero": int((~explained).sum()), "readout": "renormalised",
              "estimator": "type8", "fractions": FRACTIONS, "layer": 5, "kind": "transcoder",
              "checkpoints": curve, "conditions": conditions, "calibration_sweep": sweep, "latents": per_latent}
    out = run_dir / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    np.savez(out / "values.npz", latents=latents, true=true, ce=ce, kl=kl, window=np.arange(n_sentences),
             positions=np.full(n_sentences, 40), raw=raw,
             normalised=norm,
             **{v.replace(":", "_"): norm for v in variants[2:]})
    return result


def _cfg(tmp_path):
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path}"])


def _ordering(md: str, tag: str) -> str:
    section = md.split("## Orderings", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in section.splitlines() if ln.startswith(f"- **({tag})**")]
    return line


def _check_pngs(folder):
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024, name
    assert not list(folder.glob(".*tmp*"))


def test_report_tables_orderings_plots(tmp_path):
    make_run(tmp_path, raw_all=4.6, norm_all=4.3)
    path = report_from_config(_cfg(tmp_path), progress=False)
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    # wide table: one row per fraction, four conditions
    assert "| fraction | n_selected | raw top | raw random | normalised top | normalised random |" in md
    assert re.search(r"^\| 1\.0 \| 8 \| \d\.\d{4} ± \d\.\d{4} \|", md, re.M)
    assert re.search(r"^\| 0\.25 \| 2 \|", md, re.M)
    for row in ("| clean |", "| transcoder |", "| zero ablation |"):
        assert row in md
    # the answer first: the setting, the rewrite against the baselines, the claims; then the plot
    head = md.split("## ", 1)[0]
    assert head.startswith("# Natural-language rewrite of layer 5: report\n\n**Setting:** the transcoder at layer 5;")
    assert "| **best rewrite**: normalised (top, 1.0) |" in head and "| zero ablation |" in head
    assert "The best rewrite **beats zero ablation** (CE difference" in head
    assert "**beats mean ablation**" in head and "**is worse than coder, every latent at 0 (b_dec + skip)**" in head
    assert "| mean ablation |" in head and "| coder, every latent at its mean |" in head
    assert "(b) normalisation helps: **holds**" in head and "(d) normalised ≈ zero ablation, not better: " \
        "**does not hold**" in head
    assert md.index("](loss_vs_fraction.png)") < md.index("## Loss of the rewritten layer")
    assert "### KL(clean || patched) by fraction" in md
    assert "| normalised:empirical:4 | top |" not in md  # the every-condition listing is in table.csv, linked
    assert "table.csv`](" in md
    assert "| step300 | 0.500 | 4.5000 |" in md
    assert "| normalised:type8:4 | type8 | 4 |" in md  # calibration sweep table
    assert "with any true activation in the evaluation contexts: **7**" in md  # latent 0 never fires
    assert "## Orderings" in md
    assert "**holds**" in _ordering(md, "a")
    assert "**holds**" in _ordering(md, "b")  # normalised 4.3 < raw 4.6
    assert "**holds**" in _ordering(md, "c")  # raw 4.6 > zero 4.4
    assert "**does not hold**" in _ordering(md, "d")  # normalised 4.3 beats zero 4.4 beyond the paired CI
    assert "**holds**" in _ordering(md, "e1") and "Lower at 2 of 2 fractions" in _ordering(md, "e1")
    assert "**holds**" in _ordering(md, "f")
    for name in PLOTS:
        assert f"]({name})" in md
    _check_pngs(tmp_path / "report")


def test_report_b_does_not_hold_and_rerun(tmp_path):
    make_run(tmp_path, raw_all=4.3, norm_all=4.6)
    cfg = _cfg(tmp_path)
    md = report_from_config(cfg, progress=False).read_text()
    assert "**does not hold**" in _ordering(md, "b")  # normalised 4.6 > raw 4.3
    assert "**does not hold**" in _ordering(md, "c")  # raw 4.3 < zero 4.4
    assert "**holds**" in _ordering(md, "d")  # normalised worse than zero ablation
    assert "excludes 0" in _ordering(md, "b")
    # unchanged results: nothing to do (the file is not rewritten)
    mtime = (tmp_path / "report" / "report.md").stat().st_mtime_ns
    report_from_config(cfg, progress=False)
    assert (tmp_path / "report" / "report.md").stat().st_mtime_ns == mtime
    # other results: the report is made anew
    make_run(tmp_path, raw_all=4.6, norm_all=4.3, seed=1)
    path = report_from_config(cfg, progress=False)
    md2 = path.read_text()
    assert "**holds**" in _ordering(md2, "b") and md2 != md
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([*PLOTS, "report.md", "identity.json", ".lock"])
    _check_pngs(path.parent)


def test_an_interrupted_report_leaves_the_previous_one(tmp_path, monkeypatch):
    from nlrw_jax.report import plots

    make_run(tmp_path, raw_all=4.6, norm_all=4.3)
    cfg = _cfg(tmp_path)
    path = report_from_config(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()}
    make_run(tmp_path, raw_all=4.3, norm_all=4.6, seed=1)  # new results: the report will be made anew

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a crash) after some of the new plots were drawn

    monkeypatch.setattr(plots, "plot_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report_from_config(cfg, progress=False)
    after = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()}
    assert after == before  # every old file as it was, its identity too
    monkeypatch.undo()
    md = report_from_config(cfg, progress=False).read_text()  # the rerun completes it
    assert md != before["report.md"].decode()
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == []  # no half-made report left behind


def test_report_missing_results(tmp_path):
    with pytest.raises(UserError) as e:
        report_from_config(_cfg(tmp_path), progress=False)
    msg = str(e.value)
    assert str(tmp_path / "evaluate" / "results.json") in msg and "nlrw evaluate" in msg and "\n" not in msg
    assert not (tmp_path / "report" / "report.md").exists()


def test_spearman_fallback_matches_scipy():
    from nlrw_jax.report import stats as R

    x = np.array([1, 2, 2, 3, 5, np.nan, 4.0])
    y = np.array([2, 1, 3, 3, 6, 1.0, np.nan])
    ok = np.isfinite(x) & np.isfinite(y)
    fb = np.corrcoef(R._rank(x[ok]), R._rank(y[ok]))[0, 1]
    assert abs(spearman(x, y) - fb) < 1e-12
    assert np.isnan(spearman([1, 2], [3, 4]))
