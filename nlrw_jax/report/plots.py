"""The report's PNG plots (matplotlib's Agg canvas, no pyplot: no global state)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from nlrw_jax.report.format import FIXED_LABELS, SELECTIONS, VARIANTS, frac, isnum, num, plural
from nlrw_jax.report.stats import RunResults, column, spearman, sweep_entries

PLOTS = ("loss_vs_fraction.png", "distributions.png", "specificity_sensitivity.png", "calibration_sweep.png")
DPI = 120


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
        ax.set_xticklabels([frac(f) if f in shown else "" for f in sorted(fractions)])
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_loss(run: RunResults, path: Path) -> None:
    """Left: mean CE with its 95% CI; middle: CE - clean CE with the paired 95% CI (the
    between-sentence spread cancels, so this is the panel that separates the conditions); right:
    KL(clean || patched) of the next-token distribution, on a log axis (it spans decades)."""
    panels = [("ce", "ce_ci"), ("delta_vs_clean", "delta_ci")]
    if any(isnum(c.get("kl")) for c in run.conditions):
        panels.append(("kl", "kl_ci"))
    fig = _new_figure(6.5 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), sharex=True)
    colours = {"raw": "tab:red", "normalised": "tab:blue"}
    refs = {"clean": ("black", ":"), "transcoder": ("tab:green", "-."), "zero_ablation": ("tab:gray", "-"),
            "mean_ablation": ("tab:purple", "-"), "coder_zero": ("tab:olive", "--"), "latent_means": ("tab:brown", ":")}
    for ax, (key, ci_key) in zip(axes, panels):
        for v in VARIANTS:
            for s in SELECTIONS:
                cs = [run.find(v, s, f) for f in run.fractions]
                pts = [(f, c[key], c[ci_key]) for f, c in zip(run.fractions, cs) if c is not None and isnum(c.get(key))]
                if not pts:
                    continue
                x = np.array([p[0] for p in pts])
                y = np.array([p[1] for p in pts])
                lo = np.array([p[2][0] if isnum(p[2][0]) else p[1] for p in pts])
                hi = np.array([p[2][1] if isnum(p[2][1]) else p[1] for p in pts])
                ax.plot(x, y, "-" if s == "top" else "--", marker="o" if s == "top" else "s", ms=4,
                        color=colours[v], label=f"{v}, {s}")
                ax.fill_between(x, lo, hi, color=colours[v], alpha=0.12 if s == "top" else 0.06, lw=0)
        for name, (col, ls) in refs.items():
            c = run.find(name)
            if c is not None and isnum(c.get(key)) and not (key == "kl" and c[key] <= 0):
                ax.axhline(c[key], color=col, ls=ls, lw=1.2, label=f"{FIXED_LABELS[name]} ({c[key]:+.3f})"
                           if key == "delta_vs_clean" else f"{FIXED_LABELS[name]} ({c[key]:.3f})")
        _log_fraction_axis(ax, run.fractions)
        ax.set_xlabel("fraction of simulated latents replaced (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean CE (nats)")
    axes[0].set_title("mean CE (bands: 95% CI over windows)")
    axes[1].set_ylabel("CE - clean CE (nats)")
    axes[1].set_title("increase over clean (bands: paired 95% CI)")
    if len(panels) == 3:
        axes[2].set_yscale("log")
        axes[2].set_ylabel("KL(clean || patched) (nats, log scale)")
        axes[2].set_title("KL to the clean next-token distribution")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    mode = run.res.get("mode", "each")
    fig.suptitle(f"Loss of the rewritten layer vs fraction of latents replaced by their simulations ({mode} mode)")
    _save_fig(fig, path)


# Values per streamed block of a [contexts, latents] array: ~4 MB read, ~25 MB at most in float64
# copies, however large the array (4 GB each at the paper's widths).
BLOCK_VALUES = 1 << 20


def distribution_counts(series: dict, cols: np.ndarray | None = None):
    """Histogram of each series' non-zero finite values (of the columns `cols`, default every one)
    and its exact zeros in % of its finite values, in two passes over its row blocks: the value
    range of every series first, then the counts in 60 shared bins from min(lo, 0) to hi.
    series: name -> a function returning a fresh iterable of row blocks. Returns (bins, counts,
    zero %); as float64 as the whole-array code was, so the counts are the same."""
    def finite(block):
        a = np.asarray(block if cols is None else block[:, cols], float)
        return a[np.isfinite(a)]

    lo = hi = None
    n_finite, n_zero = dict.fromkeys(series, 0), dict.fromkeys(series, 0)
    for name, blocks in series.items():
        for block in blocks():
            a = finite(block)
            nz = a[a != 0]
            n_finite[name] += a.size
            n_zero[name] += a.size - nz.size
            if nz.size:
                lo = float(nz.min()) if lo is None else min(lo, float(nz.min()))
                hi = float(nz.max()) if hi is None else max(hi, float(nz.max()))
    lo = min(0.0 if lo is None else lo, 0.0)
    hi = 1.0 if hi is None else hi
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 61)
    counts = {name: np.zeros(60, np.int64) for name in series}
    for name, blocks in series.items():
        for block in blocks():
            a = finite(block)
            counts[name] += np.histogram(a[a != 0], bins)[0]
    zeros = {name: 100.0 * (n_zero[name] / n_finite[name]) if n_finite[name] else float("nan") for name in series}
    return bins, counts, zeros


def plot_distributions(values: Path, res: dict, path: Path, fix: str) -> str:
    """Pooled histograms of the non-zero predicted vs true activations, streamed from values.npz a
    block of rows at a time (never a whole [contexts, latents] array); returns a note for report.md.
    fix: what to tell the user if values.npz is damaged."""
    from nlrw_jax.io import npz_members, npz_row_blocks

    members = npz_members(values, fix)
    n_ctx, n_lat = members["true"][0]
    cols = None
    lat = res.get("latents", [])
    if len(lat) == n_lat:
        cols = np.array([bool(x.get("explained", True)) for x in lat])
        if cols.all() or not cols.any():
            cols = None
    step = max(1, BLOCK_VALUES // max(1, n_lat))
    names = ["true"] + [v for v in VARIANTS if v in members]
    bins, counts, zeros = distribution_counts(
        {n: (lambda n=n: npz_row_blocks(values, n, step, fix)) for n in names}, cols)
    n_lat = n_lat if cols is None else int(cols.sum())
    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, v, col in zip(axes, VARIANTS, ("tab:red", "tab:blue")):
        # each bin's left edge weighted by its count: the same bars as ax.hist of the values themselves
        ax.hist(bins[:-1], bins, weights=counts["true"], color="black", alpha=0.35,
                label=f"true (exact zeros {zeros['true']:.1f}%)")
        if v in counts:
            ax.hist(bins[:-1], bins, weights=counts[v], histtype="step", lw=1.6, color=col,
                    label=f"{v} prediction (exact zeros {zeros[v]:.1f}%)")
        ax.set_yscale("log")
        ax.set_title(f"{v} vs true")
        ax.set_xlabel("activation (non-zero values)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("count (log scale)")
    fig.suptitle(f"Predicted vs true activations, pooled over {n_lat} explained latents x {n_ctx} evaluation contexts")
    _save_fig(fig, path)
    return (f"Pooled over {n_lat} explained latents and {n_ctx} evaluation contexts; exact zeros: true "
            f"{zeros['true']:.1f}%, " + ", ".join(f"{v} {zeros[v]:.1f}%" for v in VARIANTS if v in counts) + ".")


def plot_spec_sens(res: dict, path: Path) -> str:
    lat = res.get("latents", [])
    auc = column(lat, "detection_auc")
    fig = _new_figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    notes = []
    for ax, v in zip(axes, VARIANTS):
        sp, se = column(lat, f"{v}_specificity"), column(lat, f"{v}_sensitivity")
        ok_sp, ok_se = np.isfinite(auc) & np.isfinite(sp), np.isfinite(auc) & np.isfinite(se)
        ax.scatter(auc[ok_sp], sp[ok_sp], s=18, marker="o", color="tab:blue", alpha=0.7,
                   label=f"specificity (n={int(ok_sp.sum())}, rho={num(spearman(auc, sp), 2)})")
        ax.scatter(auc[ok_se], se[ok_se], s=22, marker="^", color="tab:orange", alpha=0.7,
                   label=f"sensitivity (n={int(ok_se.sum())}, rho={num(spearman(auc, se), 2)})")
        skipped_sp, skipped_se = len(lat) - int(ok_sp.sum()), len(lat) - int(ok_se.sum())
        ax.set_title(f"{v} predictions\n(skipped: {skipped_sp} specificity, {skipped_se} sensitivity: "
                     f"no AUC or undefined)", fontsize=10)
        ax.set_xlabel("detection AUC of the explanation")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        notes.append(f"{v}: {plural(skipped_sp, 'latent')} skipped for specificity, {skipped_se} for sensitivity")
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
    rows = sweep_entries(res)
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
                         and isnum(s[k]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i % 4], label=est)
        if raw is not None and isnum(raw.get(k)):
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
