"""`nlrw report`: report.md with the tables of `nlrw evaluate` and PNG plots, in run_dir/report.

Reads run_dir/evaluate/{results.json, values.npz} (values.npz is optional: without it there is no
distribution plot and the orderings compare the conditions' own CIs instead of paired differences),
plus, where present, run_dir/scores/summary.json, run_dir/sparse/summary.json and run_dir/eval.json.

Every file is written to a temporary name in the same folder and renamed; report.md is written last
(and removed first on a rerun), so a report.md present means the report is complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.io import read_json_object, read_npz, write_text

VARIANTS = ("raw", "normalised")
SELECTIONS = ("top", "random")
FIXED = ("clean", "transcoder", "zero_ablation")
FIXED_LABELS = {"clean": "clean", "transcoder": "transcoder", "zero_ablation": "zero ablation"}
PLOTS = ("loss_vs_fraction.png", "distributions.png", "specificity_sensitivity.png", "calibration_sweep.png")
DPI = 120


def report_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "report"


# ----------------------------------------------------------------------------- small helpers


def _isnum(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _f(x, d: int = 4) -> str:
    return f"{x:.{d}f}" if _isnum(x) else "n/a"


def _ci(ci, d: int = 4) -> str:
    return f"[{_f(ci[0], d)}, {_f(ci[1], d)}]" if ci and len(ci) == 2 else "n/a"


def _pm(c: dict | None, key: str = "ce", d: int = 4) -> str:
    """A condition's CE (key="ce") or its increase over clean (key="delta_vs_clean") as mean ± half
    the 95% CI width."""
    if c is None:
        return "—"
    fmt = _f if key == "ce" else _signed
    lo, hi = (c.get("ce_ci" if key == "ce" else "delta_ci") or [None, None])[:2]
    if _isnum(lo) and _isnum(hi):
        return f"{fmt(c[key], d)} ± {(hi - lo) / 2:.{d}f}"
    return fmt(c.get(key), d)


def _signed(x, d: int = 4) -> str:
    return f"{x:+.{d}f}" if _isnum(x) else "n/a"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return out


def _frac(f) -> str:
    if not _isnum(f):
        return str(f)
    s = f"{f:g}"
    return s if any(ch in s for ch in ".e") else s + ".0"


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _condition_label(c: dict) -> str:
    if c["name"] in FIXED_LABELS:
        return FIXED_LABELS[c["name"]]
    return f"{c['name']} ({c.get('selection')}, {_frac(c.get('fraction'))})"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name("." + path.stem + ".tmp.png")
    fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    os.replace(tmp, path)


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")  # no pyplot: no global state, Agg canvas
    FigureCanvasAgg(fig)
    return fig


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0
    return avg[inv]


def spearman(x, y) -> float:
    """Spearman's rank correlation over the finite pairs (NaN when fewer than 3 or constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(x, y).statistic)
    except ImportError:
        return float(np.corrcoef(_rank(x), _rank(y))[0, 1])


def _col(latents: list[dict], key: str) -> np.ndarray:
    return np.array([lat.get(key) if _isnum(lat.get(key)) else np.nan for lat in latents], float)


# ----------------------------------------------------------------------------- the run's numbers


class _Run:
    def __init__(self, res: dict, values: dict | None):
        self.res, self.values = res, values
        self.conditions = res.get("conditions", [])
        self.fractions = sorted({c["fraction"] for c in self.conditions if "fraction" in c})
        self.fmax = max(self.fractions) if self.fractions else None
        ce = values.get("ce") if values else None
        self.ce = ce if ce is not None and len(ce) == len(self.conditions) else None

    def find(self, name: str, selection: str | None = None, fraction: float | None = None) -> dict | None:
        for c in self.conditions:
            if c["name"] == name and (selection is None or c.get("selection") == selection) and \
                    (fraction is None or c.get("fraction") == fraction):
                return c
        return None

    def index(self, c: dict) -> int:
        return next(i for i, x in enumerate(self.conditions) if x is c)

    def paired_diff(self, a: dict, b: dict, n: int = 1000, seed: int = 0) -> tuple[float, list[float]] | None:
        """Mean CE(a) - CE(b) over the same sentences, with a bootstrap 95% CI (needs values.npz)."""
        if self.ce is None:
            return None
        d = self.ce[self.index(a)] - self.ce[self.index(b)]
        d = d[np.isfinite(d)]
        if not len(d):
            return None
        idx = np.random.default_rng(seed).integers(0, len(d), (n, len(d)))
        boot = d[idx].mean(-1)
        return float(d.mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def _compare(run: _Run, a: dict, b: dict) -> str:
    """Words for how certain 'CE(a) vs CE(b)' is: the paired difference's CI, else CI overlap."""
    pd = run.paired_diff(a, b)
    if pd is not None:
        m, (lo, hi) = pd
        where = "excludes 0" if lo > 0 or hi < 0 else "includes 0: the difference is within the CI"
        return f"paired difference {_signed(m)} nats, 95% CI [{_f(lo)}, {_f(hi)}] ({where})"
    (alo, ahi), (blo, bhi) = a["ce_ci"], b["ce_ci"]
    overlap = _isnum(alo) and _isnum(bhi) and alo <= bhi and blo <= ahi
    return "the 95% CIs overlap (within the CI)" if overlap else "the 95% CIs do not overlap"


def _verdict(ok: bool | None) -> str:
    return "**n/a**" if ok is None else ("**holds**" if ok else "**does not hold**")


def _sweep_entries(res: dict) -> list[dict]:
    """calibration_sweep rows with the estimator and size parsed from the variant name."""
    out = []
    for s in res.get("calibration_sweep", []):
        v = s["variant"]
        if v == "raw":
            est, size = None, None
        elif v == "normalised":
            est, size = res.get("estimator"), res.get("calibration_contexts")
        else:
            parts = v.split(":")
            est, size = (parts[1], int(parts[2])) if len(parts) == 3 and parts[2].isdigit() else (None, None)
        out.append({**s, "estimator": est, "size": size})
    return out


# ----------------------------------------------------------------------------- markdown


def _header(res: dict, cfg) -> list[str]:
    rows = [
        ("run folder", f"`{cfg.run_dir}`"),
        ("layer", res.get("layer")),
        ("kind", res.get("kind")),
        ("evaluation sentences", res.get("sentences")),
        ("calibration contexts", res.get("calibration_contexts")),
        ("latents (total / simulated / explained)",
         f"{res.get('latents_total')} / {res.get('latents_simulated')} / {res.get('latents_explained')}"),
        ("unexplained simulated latents (set to zero)", res.get("unexplained_simulated_as_zero")),
        ("readout", res.get("readout")),
        ("quantile estimator (normalised)", f"{res.get('estimator')}, {res.get('calibration_contexts')} contexts"),
        ("fractions replaced", ", ".join(_frac(f) for f in res.get("fractions", []))),
    ]
    return ["# Natural-language rewrite of the layer: report", "",
            *_table(["setting", "value"], [[k, v] for k, v in rows], "ll"), "",
            "CE is the mean next-token cross-entropy (nats) at one position per evaluation sentence; 95% CIs "
            "are bootstrap over sentences (paired with clean for Δ). Fractions are of the simulated latents; "
            "\"top\" takes the best-scoring latents, \"random\" a random set of the same size.", ""]


def _main_tables(run: _Run) -> list[str]:
    lines = ["## Loss of the rewritten layer", "",
             "### CE by fraction replaced (mean ± half the 95% CI width)", ""]
    rows = []
    for f in run.fractions:
        cells = [_pm(run.find(v, s, f)) for v in VARIANTS for s in SELECTIONS]
        n = next((c.get("n_selected") for c in run.conditions if c.get("fraction") == f), "")
        rows.append([_frac(f), n, *cells])
    lines += _table(["fraction", "n_selected", "raw top", "raw random", "normalised top", "normalised random"], rows)
    lines += ["", "### Increase over clean by fraction (Δ CE, mean ± half the paired 95% CI width)", "",
              "The sentences' spread cancels in the difference to clean, so these intervals are much narrower.", ""]
    rows = []
    for f in run.fractions:
        cells = [_pm(run.find(v, s, f), "delta_vs_clean") for v in VARIANTS for s in SELECTIONS]
        n = next((c.get("n_selected") for c in run.conditions if c.get("fraction") == f), "")
        rows.append([_frac(f), n, *cells])
    lines += _table(["fraction", "n_selected", "raw top", "raw random", "normalised top", "normalised random"], rows)
    lines += ["", "### Fixed conditions", ""]
    rows = []
    full = [(f"{v}, every latent (never-explained ones = 0)", run.find(v, "all_latents")) for v in VARIANTS]
    for label, c in [(FIXED_LABELS[name], run.find(name)) for name in FIXED] + full:
        if c is not None:
            rows.append([label, _f(c["ce"]), _ci(c["ce_ci"]),
                         f"{_signed(c['delta_vs_clean'])} {_ci(c['delta_ci'])}", c.get("equivalent_note", "")])
    lines += _table(["condition", "CE", "95% CI", "Δ vs clean (95% CI)", "equivalent training fraction"], rows)
    lines += ["", "### Every condition", "",
              "Variants `normalised:<estimator>:<contexts>` are the calibration sweep; `normalised` is the main "
              "estimator with every calibration context.", ""]
    rows = [[c["name"], c.get("selection", ""), _frac(c["fraction"]) if "fraction" in c else "",
             c.get("n_selected", ""), _f(c["ce"]), _ci(c["ce_ci"]), _signed(c["delta_vs_clean"]),
             _ci(c["delta_ci"]), c.get("equivalent_note", "")] for c in run.conditions]
    lines += _table(["condition", "selection", "fraction", "n_selected", "CE", "95% CI", "Δ vs clean",
                     "Δ 95% CI", "equivalent training fraction"], rows, "lllrrrrrr")
    return lines + [""]


def _checkpoint_table(res: dict) -> list[str]:
    curve = res.get("checkpoints", [])
    lines = ["## Checkpoint curve", "",
             "CE of the subject model's intermediate checkpoints at the evaluated positions: the scale for the "
             "equivalent training fraction.", ""]
    if not curve:
        return lines + ["No checkpoints recorded.", ""]
    lines += _table(["checkpoint", "training fraction", "CE"],
                    [[c["name"], _f(c["fraction"], 3), _f(c["ce"])] for c in curve])
    if len(curve) == 1:
        lines += ["", "Only the final model: every equivalent fraction is \">= 1\" or at the curve's end."]
    return lines + [""]


def _sweep_table(res: dict, plotted: bool) -> list[str]:
    rows = _sweep_entries(res)
    lines = ["## Calibration sweep", "",
             "Pooled over latents and evaluation contexts; a prediction counts as active above half a rating step "
             "(max activation / 18). CE with every simulated latent replaced (top selection, largest fraction).", ""]
    if not rows:
        return lines + ["No calibration sweep in results.json.", ""]
    lines += _table(["variant", "estimator", "calibration contexts", "pooled specificity", "pooled sensitivity",
                     "CE (top, all)"],
                    [[s["variant"], s["estimator"] or "—", s["size"] if s["size"] is not None else "—",
                      _f(s["pooled_specificity"], 3), _f(s["pooled_sensitivity"], 3), _f(s["ce_top_all"])]
                     for s in rows], "lllrrr")
    if plotted:
        lines += ["", "![calibration sweep](calibration_sweep.png)"]
    return lines + [""]


def _predictions_section(res: dict) -> list[str]:
    lat = res.get("latents", [])
    lines = ["## Predictions vs detection score", ""]
    if not lat:
        return lines + ["No per-latent results.", ""]
    explained = [x for x in lat if x.get("explained")]
    active = sum(1 for x in lat if (x.get("true_active") or 0) > 0)
    rows = []
    for v in VARIANTS:
        for k in ("specificity", "sensitivity"):
            col = _col(lat, f"{v}_{k}")
            rows.append([f"{v} {k}", _f(np.nanmean(col), 3) if np.isfinite(col).any() else "n/a",
                         int(np.isfinite(col).sum())])
    lines += _table(["mean over latents", "value", "latents defined"], rows)
    auc = _col(lat, "detection_auc")
    lines += ["", f"- Simulated latents: {len(lat)} ({len(explained)} explained); with any true activation in the "
                  f"evaluation contexts: **{active}** (the others have no sensitivity).",
              f"- Latents with a detection AUC: {int(np.isfinite(auc).sum())}"
              + (f" (mean {_f(np.nanmean(auc), 3)})." if np.isfinite(auc).any() else ".")]
    for k in ("specificity", "sensitivity"):
        y = _col(lat, f"normalised_{k}")
        ok = np.isfinite(auc) & np.isfinite(y)
        rho = spearman(auc, y)
        why = "" if _isnum(rho) else " (undefined: fewer than 3 latents or a constant value)"
        lines.append(f"- Spearman correlation of detection AUC with normalised {k}: "
                     f"**{_f(rho, 3)}** over {int(ok.sum())} latents{why}.")
    return lines + ["", "![specificity and sensitivity vs detection AUC](specificity_sensitivity.png)", ""]


def _orderings(run: _Run, res: dict) -> list[str]:
    f = run.fmax
    fl = _frac(f) if f is not None else "?"
    tc, zero = run.find("transcoder"), run.find("zero_ablation")
    norm, raw = run.find("normalised", "top", f), run.find("raw", "top", f)
    scope = f"At fraction {fl} (every simulated latent replaced) unless stated."
    if res.get("latents_simulated", 0) < res.get("latents_total", 0) and run.find("normalised", "all_latents"):
        # Only some latents were explained: (a)-(d) are about the whole layer rewritten, as in the paper.
        norm, raw = run.find("normalised", "all_latents"), run.find("raw", "all_latents")
        scope = (f"Only {res['latents_simulated']} of {res['latents_total']} latents were simulated, so (a)-(d) use "
                 f"the full rewrite (`all_latents`: every latent replaced, never-explained ones by 0); (e) uses "
                 f"the fractions of the simulated latents.")
    lines = ["## Orderings (the paper's claims, checked)", "", scope, ""]

    def item(tag: str, claim: str, a: dict | None, b: dict | None, ok_fn) -> None:
        if a is None or b is None:
            lines.append(f"- **({tag})** {claim}: {_verdict(None)} (condition missing).")
            return
        ok = ok_fn(a["ce"], b["ce"]) if _isnum(a["ce"]) and _isnum(b["ce"]) else None
        lines.append(f"- **({tag})** {claim}: {_verdict(ok)}. {_condition_label(a)} {_f(a['ce'])} vs "
                     f"{_condition_label(b)} {_f(b['ce'])}; {_compare(run, a, b)}.")

    item("a", "transcoder CE < normalised (top) CE", tc, norm, lambda x, y: x < y)
    item("b", "normalised (top) CE < raw (top) CE: normalisation helps", norm, raw, lambda x, y: x < y)
    item("c", "raw (top) CE > zero ablation CE: raw predictions are worse than deleting the layer's output",
         raw, zero, lambda x, y: x > y)
    if norm is None or zero is None or not (_isnum(norm["ce"]) and _isnum(zero["ce"])):
        lines.append(f"- **(d)** normalised (top) does not beat zero ablation (paper: similar): {_verdict(None)}.")
    else:
        pd = run.paired_diff(norm, zero)
        # holds unless normalised is lower beyond the noise (the paired CI, else the conditions' own CIs)
        ok = norm["ce"] >= zero["ce"] or (pd[1][1] >= 0 if pd is not None else
                                          _isnum(norm["ce_ci"][1]) and norm["ce_ci"][1] >= zero["ce_ci"][0])
        similar = ""
        if pd is not None:
            similar = " They are similar (the difference is within the CI)." if pd[1][0] <= 0 <= pd[1][1] else \
                " They differ beyond the CI."
        lines.append(f"- **(d)** normalised (top) does not beat zero ablation beyond the CI (paper: similar): "
                     f"{_verdict(ok)}. "
                     f"{_condition_label(norm)} {_f(norm['ce'])} vs zero ablation {_f(zero['ce'])}; "
                     f"{_compare(run, norm, zero)}.{similar}")
    total = res.get("latents_simulated")
    for tag, v in (("e1", "normalised"), ("e2", "raw")):
        better, n, sig = 0, 0, 0
        for fr in run.fractions:
            t, r = run.find(v, "top", fr), run.find(v, "random", fr)
            if t is None or r is None or t.get("n_selected") == total or not (_isnum(t["ce"]) and _isnum(r["ce"])):
                continue  # every latent selected: the same set either way
            n += 1
            better += t["ce"] < r["ce"]
            pd = run.paired_diff(t, r)
            sig += pd is not None and pd[1][1] < 0
        ok = None if n == 0 else better > n / 2
        extra = f"; at {sig} of them the paired difference's CI excludes 0" if run.ce is not None else ""
        lines.append(f"- **({tag})** {v}: top selection has lower CE than random at most fractions: {_verdict(ok)}. "
                     f"Lower at {better} of {n} fractions (fractions selecting every latent left out){extra}.")
    sweep = {s["variant"]: s for s in res.get("calibration_sweep", [])}
    r, nm = sweep.get("raw"), sweep.get("normalised")
    if r is None or nm is None:
        lines.append(f"- **(f)** specificity rises and sensitivity falls with normalisation: {_verdict(None)}.")
    else:
        sp = (nm["pooled_specificity"] > r["pooled_specificity"]) if _isnum(nm["pooled_specificity"]) and \
            _isnum(r["pooled_specificity"]) else None
        se = (nm["pooled_sensitivity"] < r["pooled_sensitivity"]) if _isnum(nm["pooled_sensitivity"]) and \
            _isnum(r["pooled_sensitivity"]) else None
        ok = None if sp is None or se is None else sp and se
        lines.append(f"- **(f)** pooled specificity rises and sensitivity falls with normalisation: {_verdict(ok)}. "
                     f"Specificity {_f(r['pooled_specificity'], 3)} → {_f(nm['pooled_specificity'], 3)} "
                     f"({'rises' if sp else 'does not rise' if sp is not None else 'n/a'}); sensitivity "
                     f"{_f(r['pooled_sensitivity'], 3)} → {_f(nm['pooled_sensitivity'], 3)} "
                     f"({'falls' if se else 'does not fall' if se is not None else 'n/a'}).")
    return lines + [""]


def _other_stages(run_dir: Path) -> list[str]:
    rows = []
    ev = _read_json(run_dir / "eval.json")
    if ev:
        rows.append(["subject model validation CE", _f(ev.get("val_ce"))])
        rows.append(["unigram validation CE", _f(ev.get("unigram_val_ce"))])
    sp = _read_json(run_dir / "sparse" / "summary.json")
    if sp:
        for k in ("ce_clean", "ce_spliced", "ce_zero_ablated", "loss_recovered"):
            if k in sp:
                rows.append([f"sparse coder training: {k.replace('_', ' ')}", _f(sp[k])])
    sc = _read_json(run_dir / "scores" / "summary.json")
    if sc:
        rows.append(["explanations scored / skipped", f"{sc.get('scored')} / {sc.get('skipped')}"])
        for k in ("mean_detection_auc", "mean_detection_balanced_accuracy", "mean_fuzzing_auc"):
            if k in sc:
                rows.append([k.replace("_", " "), _f(sc[k], 3)])
    if not rows:
        return []
    return ["## Earlier stages", "", *_table(["quantity", "value"], rows), ""]


# ----------------------------------------------------------------------------- plots


def _log_fraction_axis(ax, fractions: list[float]) -> None:
    if len(fractions) < 2 or min(fractions) <= 0:
        return
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    if len(fractions) <= 12:  # label the fractions themselves, skipping ones too close to read
        shown, last = [], None
        for f in sorted(fractions, reverse=True):
            if last is None or math.log10(last / f) >= 0.2:
                shown.append(f)
                last = f
        ax.set_xticks(sorted(fractions))
        ax.set_xticklabels([_frac(f) if f in shown else "" for f in sorted(fractions)])
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_loss(run: _Run, path: Path) -> None:
    """Left: mean CE with its 95% CI; right: CE - clean CE with the paired 95% CI (the between-sentence
    spread cancels, so this is the panel that separates the conditions)."""
    fig = _new_figure(13, 4.8)
    axes = fig.subplots(1, 2, sharex=True)
    colours = {"raw": "tab:red", "normalised": "tab:blue"}
    refs = {"clean": ("black", ":"), "transcoder": ("tab:green", "-."), "zero_ablation": ("tab:gray", "-")}
    for ax, (key, ci_key) in zip(axes, (("ce", "ce_ci"), ("delta_vs_clean", "delta_ci"))):
        for v in VARIANTS:
            for s in SELECTIONS:
                cs = [run.find(v, s, f) for f in run.fractions]
                pts = [(f, c[key], c[ci_key]) for f, c in zip(run.fractions, cs) if c is not None and _isnum(c[key])]
                if not pts:
                    continue
                x = np.array([p[0] for p in pts])
                y = np.array([p[1] for p in pts])
                lo = np.array([p[2][0] if _isnum(p[2][0]) else p[1] for p in pts])
                hi = np.array([p[2][1] if _isnum(p[2][1]) else p[1] for p in pts])
                ax.plot(x, y, "-" if s == "top" else "--", marker="o" if s == "top" else "s", ms=4,
                        color=colours[v], label=f"{v}, {s}")
                ax.fill_between(x, lo, hi, color=colours[v], alpha=0.12 if s == "top" else 0.06, lw=0)
        for name, (col, ls) in refs.items():
            c = run.find(name)
            if c is not None and _isnum(c[key]):
                ax.axhline(c[key], color=col, ls=ls, lw=1.2, label=f"{FIXED_LABELS[name]} ({c[key]:+.3f})"
                           if key != "ce" else f"{FIXED_LABELS[name]} ({c[key]:.3f})")
        _log_fraction_axis(ax, run.fractions)
        ax.set_xlabel("fraction of simulated latents replaced (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean CE (nats)")
    axes[0].set_title("mean CE (bands: 95% CI over sentences)")
    axes[1].set_ylabel("CE - clean CE (nats)")
    axes[1].set_title("increase over clean (bands: paired 95% CI)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("Loss of the rewritten layer vs fraction of latents replaced by their simulations")
    _save_fig(fig, path)


def plot_distributions(values: dict, res: dict, path: Path) -> str:
    """Pooled histograms of the non-zero predicted vs true activations; returns a note for report.md."""
    true = np.asarray(values["true"], float)
    cols = np.ones(true.shape[1], bool)
    lat = res.get("latents", [])
    if len(lat) == true.shape[1]:
        cols = np.array([bool(x.get("explained", True)) for x in lat])
        if not cols.any():
            cols[:] = True
    series = {"true": true[:, cols]}
    for v in VARIANTS:
        if v in values:
            series[v] = np.asarray(values[v], float)[:, cols]
    nz = [a[np.isfinite(a) & (a != 0)] for a in series.values()]
    hi = max((float(x.max()) for x in nz if len(x)), default=1.0)
    lo = min((float(x.min()) for x in nz if len(x)), default=0.0)
    lo = min(lo, 0.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 61)
    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)

    def zeros(a):
        a = a[np.isfinite(a)]
        return 100.0 * float((a == 0).mean()) if a.size else float("nan")

    t = series["true"]
    for ax, v, col in zip(axes, VARIANTS, ("tab:red", "tab:blue")):
        ax.hist(t[np.isfinite(t) & (t != 0)], bins=bins, color="black", alpha=0.35,
                label=f"true (exact zeros {zeros(t):.1f}%)")
        if v in series:
            p = series[v]
            ax.hist(p[np.isfinite(p) & (p != 0)], bins=bins, histtype="step", lw=1.6, color=col,
                    label=f"{v} prediction (exact zeros {zeros(p):.1f}%)")
        ax.set_yscale("log")
        ax.set_title(f"{v} vs true")
        ax.set_xlabel("activation (non-zero values)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("count (log scale)")
    n_ctx, n_lat = t.shape
    fig.suptitle(f"Predicted vs true activations, pooled over {n_lat} explained latents x {n_ctx} evaluation contexts")
    _save_fig(fig, path)
    return (f"Pooled over {n_lat} explained latents and {n_ctx} evaluation contexts; exact zeros: true "
            f"{zeros(t):.1f}%, " + ", ".join(f"{v} {zeros(series[v]):.1f}%" for v in VARIANTS if v in series) + ".")


def plot_spec_sens(res: dict, path: Path) -> str:
    lat = res.get("latents", [])
    auc = _col(lat, "detection_auc")
    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    notes = []
    for ax, v in zip(axes, VARIANTS):
        sp, se = _col(lat, f"{v}_specificity"), _col(lat, f"{v}_sensitivity")
        ok_sp, ok_se = np.isfinite(auc) & np.isfinite(sp), np.isfinite(auc) & np.isfinite(se)
        ax.scatter(auc[ok_sp], sp[ok_sp], s=18, marker="o", color="tab:blue", alpha=0.7,
                   label=f"specificity (n={int(ok_sp.sum())}, rho={_f(spearman(auc, sp), 2)})")
        ax.scatter(auc[ok_se], se[ok_se], s=22, marker="^", color="tab:orange", alpha=0.7,
                   label=f"sensitivity (n={int(ok_se.sum())}, rho={_f(spearman(auc, se), 2)})")
        skipped_sp, skipped_se = len(lat) - int(ok_sp.sum()), len(lat) - int(ok_se.sum())
        ax.set_title(f"{v} predictions\n(skipped: {skipped_sp} specificity, {skipped_se} sensitivity: "
                     f"no AUC or undefined)", fontsize=10)
        ax.set_xlabel("detection AUC of the explanation")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        notes.append(f"{v}: {_n(skipped_sp, 'latent')} skipped for specificity, {skipped_se} for sensitivity")
    axes[0].set_ylabel("per-latent rate")
    if not np.isfinite(auc).any():
        for ax in axes:
            ax.text(0.5, 0.5, "no detection scores in results.json", ha="center", va="center", transform=ax.transAxes)
        axes[0].set_xlim(0, 1)
    fig.suptitle("Per-latent specificity and sensitivity vs detection AUC")
    _save_fig(fig, path)
    return "; ".join(notes) + " (no detection AUC, or no true (in)activations in the evaluation contexts)."


def plot_sweep(res: dict, path: Path) -> bool:
    """Pooled specificity / sensitivity / CE vs calibration contexts per estimator; False if one size only."""
    rows = _sweep_entries(res)
    sizes = sorted({s["size"] for s in rows if s["size"] is not None})
    if len(sizes) < 2:
        return False
    raw = next((s for s in rows if s["variant"] == "raw"), None)
    fig = _new_figure(13, 4)
    axes = fig.subplots(1, 3, sharex=True)
    keys = (("pooled_specificity", "pooled specificity"), ("pooled_sensitivity", "pooled sensitivity"),
            ("ce_top_all", "CE, top, every latent (nats)"))
    ests = sorted({s["estimator"] for s in rows if s["estimator"]})
    for ax, (k, label) in zip(axes, keys):
        for i, est in enumerate(ests):
            pts = sorted((s["size"], s[k]) for s in rows if s["estimator"] == est and s["size"] is not None
                         and _isnum(s[k]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i % 4], label=est)
        if raw is not None and _isnum(raw.get(k)):
            ax.axhline(raw[k], color="tab:red", ls="--", lw=1, label="raw (no calibration)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("calibration contexts")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Calibration sweep (main: {res.get('estimator')}, {res.get('calibration_contexts')} contexts)")
    _save_fig(fig, path)
    return True


# ----------------------------------------------------------------------------- entry point


def _check_results(res: dict, path: Path) -> None:
    """What every part of the report needs: a list of conditions, each named and with its CE (the
    rest of results.json may be missing; those parts of the report then say n/a)."""
    conditions = res.get("conditions")
    if not isinstance(conditions, list) or not conditions:
        raise UserError(f"{path}: no conditions (field 'conditions' missing or empty); rerun `nlrw evaluate`")
    for i, c in enumerate(conditions):
        ce = c.get("ce") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(ce, (int, float)) \
                or isinstance(ce, bool):
            raise UserError(f"{path}: conditions[{i}] lacks a name or a numeric ce; rerun `nlrw evaluate`")


def report_from_config(cfg, progress: bool = True) -> Path:
    run_dir = Path(cfg.run_dir)
    ev = run_dir / "evaluate"
    res_path = ev / "results.json"
    if not res_path.exists():
        raise UserError(f"{res_path} does not exist; run `nlrw evaluate` first")
    res = read_json_object(res_path, "rerun `nlrw evaluate`")
    _check_results(res, res_path)
    values = None
    if (ev / "values.npz").exists():
        values = read_npz(ev / "values.npz", "rerun `nlrw evaluate` or delete it (the report is then made "
                                             "without the distribution plot)")
    run = _Run(res, values)

    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "report.md"
    md_path.unlink(missing_ok=True)  # present again only once this report is complete

    made: dict[str, str | bool] = {}
    steps = tqdm(total=5, desc="report", unit="file", disable=not progress)
    plot_loss(run, out / "loss_vs_fraction.png")
    made["loss_vs_fraction.png"] = True
    steps.update()
    if values is not None and "true" in values:
        made["distributions.png"] = plot_distributions(values, res, out / "distributions.png")
    steps.update()
    made["specificity_sensitivity.png"] = plot_spec_sens(res, out / "specificity_sensitivity.png")
    steps.update()
    if plot_sweep(res, out / "calibration_sweep.png"):
        made["calibration_sweep.png"] = True
    steps.update()
    for name in PLOTS:  # a plot this run cannot make must not survive from an earlier one
        if name not in made:
            (out / name).unlink(missing_ok=True)

    lines = _header(res, cfg)
    lines += _main_tables(run)
    lines += ["![CE vs fraction replaced](loss_vs_fraction.png)", ""]
    lines += _checkpoint_table(res)
    lines += _sweep_table(res, "calibration_sweep.png" in made)
    lines += _predictions_section(res)
    if "specificity_sensitivity.png" in made:
        lines += [f"Plot: {made['specificity_sensitivity.png']}", ""]
    lines += ["## Predicted vs true activations", ""]
    if "distributions.png" in made:
        lines += [str(made["distributions.png"]), "", "![activation distributions](distributions.png)", ""]
    else:
        lines += [f"No {ev / 'values.npz'}: no distribution plot.", ""]
    lines += _orderings(run, res)
    lines += _other_stages(run_dir)
    lines += ["## Plots", ""] + [f"- [{n}]({n})" for n in PLOTS if n in made] + \
        ["", f"Source: `{res_path}` (table: `{ev / 'table.csv'}`).", ""]
    write_text(md_path, "\n".join(lines))
    steps.update()
    steps.close()
    return md_path
