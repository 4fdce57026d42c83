"""Two runs of the same coder side by side (e.g. plain against contrastive explanations): the
explainers' detection and fuzzing AUC paired over the latents both scored, and each
rewrite's CE and KL (every simulated latent replaced) paired over the evaluation contexts both runs
share."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlrw_jax.report.format import FIXED_LABELS, ci_text, condition_label, num, signed, table
from nlrw_jax.report.markdown import any_beats
from nlrw_jax.report.stats import RunResults, paired_between, rewrite_variants

SCORES = ("detection_auc", "fuzzing_auc")


def every_simulated(run: RunResults, variant: str) -> dict | None:
    """The variant with every simulated latent replaced (top selection at the largest fraction), the
    others keeping their true values: the whole layer when every latent was simulated, and otherwise
    still a like-for-like comparison of two runs that simulated the same latents."""
    return run.find(variant, "top", run.fmax)


def paired_latents(a: dict[int, dict], b: dict[int, dict], key: str, n: int = 1000, seed: int = 0) -> dict | None:
    """key's mean in each run over the latents with a finite value in both, B - A with a bootstrap
    95% CI resampling latents, and on how many B is higher / lower."""
    common = sorted(k for k in a.keys() & b.keys() if np.isfinite(a[k].get(key, np.nan))
                    and np.isfinite(b[k].get(key, np.nan)))
    if not common:
        return None
    xa = np.array([a[k][key] for k in common])
    xb = np.array([b[k][key] for k in common])
    d = xb - xa
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return {"n": len(common), "a": float(xa.mean()), "b": float(xb.mean()), "diff": float(d.mean()),
            "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "b_higher": int((d > 0).sum()), "b_lower": int((d < 0).sum()), "xa": xa, "xb": xb}


def _ci_verdict(ci: list[float]) -> str:
    return "excludes 0" if ci[0] > 0 or ci[1] < 0 else "includes 0"


def compare_report(a: RunResults, b: RunResults, scores_a: dict, scores_b: dict, labels: tuple[str, str],
                   names: tuple[str, str], plotted: bool) -> list[str]:
    la, lb = labels
    auc = {k: paired_latents(scores_a, scores_b, k) for k in SCORES}
    # Rewrites compare like for like only when both runs simulated the same latents.
    same = [x.get("latent") for x in a.res.get("latents", [])] == [x.get("latent") for x in b.res.get("latents", [])]
    why = "other contexts" if same else "different latents simulated"
    rows, best = [], {}
    for v in rewrite_variants(a):
        ca, cb = every_simulated(a, v), every_simulated(b, v)
        if ca is None or cb is None:
            continue
        pce, pkl = (paired_between(a, ca, b, cb, "ce"), paired_between(a, ca, b, cb, "kl")) if same else (None, None)
        rows.append([condition_label(ca), f"{signed(ca['delta_vs_clean'])} {ci_text(ca['delta_ci'])}",
                     f"{signed(cb['delta_vs_clean'])} {ci_text(cb['delta_ci'])}",
                     f"{signed(pce[0])} {ci_text(pce[1])}" if pce else f"n/a ({why})",
                     f"{num(ca.get('kl'))} / {num(cb.get('kl'))}",
                     f"{signed(pkl[0])} {ci_text(pkl[1])}" if pkl else f"n/a ({why})"])
        for lab, c in ((la, ca), (lb, cb)):
            if lab not in best or c["ce"] < best[lab]["ce"]:
                best[lab] = c
    det = auc["detection_auc"]
    lines = [f"# {lb} against {la} explanations", ""]
    answer = []
    if det is not None:
        answer.append(f"detection AUC {num(det['a'], 3)} ({la}) vs {num(det['b'], 3)} ({lb}) over {det['n']} latents "
                      f"scored in both: {lb} − {la} = {signed(det['diff'], 3)}, 95% CI {ci_text(det['ci'], 3)} "
                      f"({_ci_verdict(det['ci'])})")
    if la in best and lb in best and not same:
        answer.append(f"the rewrites are not compared: the runs simulated different latents ({a.res.get('latents_simulated')} "
                      f"and {b.res.get('latents_simulated')})")
    elif la in best and lb in best:
        pd = paired_between(a, best[la], b, best[lb])
        answer.append(f"best rewrite (every simulated latent replaced) CE {num(best[la]['ce'])} ({la}, `{best[la]['name']}`) vs "
                      f"{num(best[lb]['ce'])} ({lb}, `{best[lb]['name']}`)"
                      + (f": {lb} − {la} = {signed(pd[0])} nats, 95% CI {ci_text(pd[1])} ({_ci_verdict(pd[1])})"
                         if pd else ""))
    lines += ["**Answer:** " + ("; ".join(answer) if answer else "nothing to compare") + ".", ""]
    for lab, run in ((la, a), (lb, b)):
        lines += any_beats(run, f"{lab}: ")
    lines += ["", f"Runs: {la} = `{names[0]}`, {lb} = `{names[1]}` (the same coder; the same evaluation contexts "
                  "where a paired CI is given).", ""]
    if plotted:
        lines += ["![detection AUC per latent, and Δ CE with every simulated latent replaced](compare.png)", ""]
    lines += ["## Explanation scores (paired over latents)", "",
              *table(["score", f"{la} mean", f"{lb} mean", f"{lb} − {la} (95% CI, resampling latents)",
                      f"{lb} higher / lower", "latents"],
                     [[k.replace("_", " "), num(s["a"], 3), num(s["b"], 3), f"{signed(s['diff'], 3)} "
                       f"{ci_text(s['ci'], 3)}", f"{s['b_higher']} / {s['b_lower']}", s["n"]]
                      for k, s in auc.items() if s is not None]), ""]
    lines += ["## Every simulated latent replaced", "",
              "Each variant with every simulated latent replaced by its simulation (the whole layer when every "
              "latent was simulated; otherwise the rest keep their true values). Δ CE over clean with its paired "
              "95% CI in each run; then the difference between the runs on the same contexts (resampling "
              "windows); KL(clean || patched).", "",
              *table(["condition", f"Δ CE {la}", f"Δ CE {lb}", f"CE {lb} − {la}", f"KL {la} / {lb}",
                      f"KL {lb} − {la}"], rows), ""]
    base_rows = []
    for name, label in FIXED_LABELS.items():
        ca, cb = a.find(name), b.find(name)
        if ca is not None and cb is not None:
            base_rows.append([label, num(ca["ce"]), num(cb["ce"])])
    lines += ["## Fixed conditions (the same in both runs when the contexts are)", "",
              *table(["condition", f"CE {la}", f"CE {lb}"], base_rows), ""]
    return lines


def plot_compare(a: RunResults, b: RunResults, scores_a: dict, scores_b: dict, labels: tuple[str, str],
                 path: Path) -> bool:
    """Left: each latent's detection AUC, one run against the other (the diagonal: no change).
    Right: Δ CE over clean of each variant with every simulated latent replaced, in both runs, with
    the baselines as lines."""
    from nlrw_jax.report.plots import _new_figure, _save_fig

    det = paired_latents(scores_a, scores_b, "detection_auc")
    variants = [v for v in rewrite_variants(a) if every_simulated(a, v) and every_simulated(b, v)]
    if det is None and not variants:
        return False
    fig = _new_figure(13, 5)
    left, right = fig.subplots(1, 2)
    if det is not None:
        jitter = np.random.default_rng(0).normal(0, 0.004, (2, det["n"]))
        left.scatter(det["xa"] + jitter[0], det["xb"] + jitter[1], s=8, alpha=0.5)
        left.plot([0, 1], [0, 1], color="gray", lw=1, ls=":")
        left.set_xlabel(f"detection AUC, {labels[0]}")
        left.set_ylabel(f"detection AUC, {labels[1]}")
        left.set_title(f"{det['n']} latents; mean {labels[1]} − {labels[0]} = {det['diff']:+.3f} "
                       f"[{det['ci'][0]:+.3f}, {det['ci'][1]:+.3f}]", fontsize=9)
    y = np.arange(len(variants))
    for k, (run, lab, colour) in enumerate(((a, labels[0], "tab:blue"), (b, labels[1], "tab:orange"))):
        cs = [every_simulated(run, v) for v in variants]
        mid = np.array([c["delta_vs_clean"] for c in cs])
        err = np.array([[c["delta_vs_clean"] - c["delta_ci"][0], c["delta_ci"][1] - c["delta_vs_clean"]]
                        for c in cs]).T
        right.errorbar(mid, y + (k - 0.5) * 0.3, xerr=err, fmt="o", color=colour, label=lab, ms=4)
    for name, colour in (("zero_ablation", "gray"), ("mean_ablation", "tab:brown"), ("transcoder", "tab:green")):
        c = a.find(name)
        if c is not None:
            right.axvline(c["delta_vs_clean"], color=colour, ls="--", lw=1, label=FIXED_LABELS[name])
    right.set_yticks(y)
    right.set_yticklabels(variants, fontsize=8)
    right.set_xlabel("Δ CE over clean (nats), every simulated latent replaced; 95% CI")
    right.legend(fontsize=8)
    _save_fig(fig, path)
    return True
