"""The report's markdown sections, from results.json (and values.npz through RunResults)."""

from __future__ import annotations

import numpy as np

from nlrw_jax.report.format import BASELINES, FIXED, FIXED_LABELS, SELECTIONS, VARIANTS, ci_text, condition_label, \
    frac, isnum, num, pm, signed, table
from nlrw_jax.report.stats import RunResults, beats, column, compare, rewrite_variants, spearman, sweep_entries, \
    whole_layer


def verdict(ok: bool | None) -> str:
    return "**n/a**" if ok is None else ("**holds**" if ok else "**does not hold**")


def summary(run: RunResults, res: dict, claims: list[tuple[str, str, bool | None]]) -> list[str]:
    """The first screen: the setting in one line, the rewrite against the baselines in CE and KL, the
    equivalent training fraction, and which of the paper's claims hold."""
    mode = res.get("mode", "each")
    per = res.get("positions_per_window", 1)
    where = ("one position per window" if per == 1 else f"up to {per} positions per window") + \
        (", each patched alone" if mode == "each" else ", all patched at once (the whole layer)")
    lines = [f"# Natural-language rewrite of layer {res.get('layer')}: report", "",
             f"**Setting:** the {res.get('kind')} at layer {res.get('layer')}; {res.get('latents_simulated')} of "
             f"{res.get('latents_total')} latents simulated from their explanations; "
             f"{res.get('contexts', res.get('sentences'))} evaluation contexts in {res.get('sentences')} windows "
             f"({where}; `{mode}` mode).", ""]
    full = [c for c in (whole_layer(run, v) for v in VARIANTS) if c is not None]
    # The best rewrite of the whole layer, over every calibration variant.
    candidates = full + [c for c in run.conditions if c["name"] not in FIXED and (
        c.get("selection") == "all_latents" if full and full[0].get("selection") == "all_latents"
        else c.get("selection") == "top" and c.get("fraction") == run.fmax)]
    best = min(candidates, key=lambda c: c["ce"], default=None)
    rows = []
    named = [("clean", run.find("clean")), ("transcoder (every true latent)", run.find("transcoder"))]
    named += [(FIXED_LABELS[b], run.find(b)) for b in BASELINES]
    named += [(f"**best rewrite**: {condition_label(best)}" if best else "best rewrite", best)]
    for label, c in named + [(condition_label(c), c) for c in full if c is not best]:
        if c is not None:
            rows.append([label, num(c["ce"]), f"{signed(c['delta_vs_clean'])} {ci_text(c['delta_ci'])}",
                         f"{num(c.get('kl'))} {ci_text(c.get('kl_ci'))}", c.get("equivalent_note", "")])
    lines += table(["condition", "CE", "Δ CE vs clean (95% CI)", "KL to clean (95% CI)",
                     "equivalent training fraction"], rows)
    verdicts = []
    for b in BASELINES:
        base = run.find(b)
        pd = run.paired_diff(best, base) if best is not None and base is not None else None
        if pd is not None:
            beats = "beats" if pd[1][1] < 0 else "is worse than" if pd[1][0] > 0 else "is within the CI of"
            verdicts.append(f"**{beats} {FIXED_LABELS[b]}** (CE difference {signed(pd[0])} nats, 95% CI "
                            f"[{num(pd[1][0])}, {num(pd[1][1])}])")
    if verdicts:
        lines += ["", "The best rewrite " + "; ".join(verdicts) + ". A rewrite shows what the explanations add only "
                  "where it beats every baseline."]
    lines += ["", *any_beats(run)]
    lines += ["", "**The paper's claims:** " + "; ".join(f"({tag}) {short} {verdict(ok)}" for tag, short, ok in claims)
              + " (details under Orderings).", ""]
    return lines


def any_beats(run: RunResults, label: str = "") -> list[str]:
    """One plain sentence per baseline: which whole-layer rewrites (raw and every calibration) beat it
    beyond the paired 95% CI. Partial rewrites keep most true latents, so only whole ones count."""
    rewrites = [c for c in (whole_layer(run, v) for v in rewrite_variants(run)) if c is not None]
    if not rewrites or run.ce is None:
        return []
    out = []
    for b in ("zero_ablation", "mean_ablation"):
        base = run.find(b)
        if base is None:
            continue
        won = [c["name"] for c in rewrites if beats(run, c, base)]
        if won:
            out.append(f"- {label}**{len(won)} of the {len(rewrites)}** whole-layer rewrites (raw and every "
                       f"calibration) beat {FIXED_LABELS[b]} beyond the 95% CI: {', '.join(f'`{n}`' for n in won)}.")
        else:
            out.append(f"- {label}**none** of the {len(rewrites)} whole-layer rewrites (raw and every calibration) "
                       f"beats {FIXED_LABELS[b]} beyond the 95% CI.")
    return out


def setting(res: dict, run_dir: str) -> list[str]:
    rows = [
        ("run folder", f"`{run_dir}`"),
        ("layer", res.get("layer")),
        ("kind", res.get("kind")),
        ("evaluation windows / contexts", f"{res.get('sentences')} / {res.get('contexts', res.get('sentences'))}"),
        ("simulation mode", res.get("simulate_mode", "one_at_a_time")),
        ("evaluation mode (main)", res.get("mode", "each")),
        ("calibration contexts", res.get("calibration_contexts")),
        ("latents (total / simulated / explained)",
         f"{res.get('latents_total')} / {res.get('latents_simulated')} / {res.get('latents_explained')}"),
        ("unexplained simulated latents (set to zero)", res.get("unexplained_simulated_as_zero")),
        ("readout", res.get("readout")),
        ("calibration of \"normalised\"", f"{res.get('estimator')}, {res.get('calibration_contexts')} contexts"),
        ("fractions replaced", ", ".join(frac(f) for f in res.get("fractions", []))),
    ]
    return ["## Setting", "", *table(["setting", "value"], [[k, v] for k, v in rows], "ll"), "",
            "CE is the mean next-token cross-entropy (nats) at the evaluated positions; KL is KL(clean || "
            "patched) of the next-token distribution there. 95% CIs are bootstrap over windows (paired with "
            "clean for Δ). Fractions are of the simulated latents; \"top\" takes the best-scoring latents, "
            "\"random\" a random set of the same size.", ""]


def by_fraction(run: RunResults, key: str) -> list[str]:
    """One row per fraction: `key` (ce, delta_vs_clean or kl) of raw / normalised x top / random."""
    rows = []
    for f in run.fractions:
        n = next((c.get("n_selected") for c in run.conditions if c.get("fraction") == f), "")
        rows.append([frac(f), n, *(pm(run.find(v, s, f), key) for v in VARIANTS for s in SELECTIONS)])
    return table(["fraction", "n_selected", "raw top", "raw random", "normalised top", "normalised random"], rows)


def main_tables(run: RunResults) -> list[str]:
    lines = ["## Loss of the rewritten layer", "",
             "### CE by fraction replaced (mean ± half the 95% CI width)", ""]
    lines += by_fraction(run, "ce")
    lines += ["", "### Increase over clean by fraction (Δ CE, mean ± half the paired 95% CI width)", "",
              "The sentences' spread cancels in the difference to clean, so these intervals are much narrower.", ""]
    lines += by_fraction(run, "delta_vs_clean")
    lines += ["", "### KL(clean || patched) by fraction (mean ± half the 95% CI width)", ""]
    lines += by_fraction(run, "kl")
    lines += ["", "### Fixed conditions", ""]
    rows = []
    full = [(f"{v}, every latent (never-explained ones = 0)", run.find(v, "all_latents")) for v in VARIANTS]
    for label, c in [(FIXED_LABELS[name], run.find(name)) for name in FIXED] + full:
        if c is not None:
            rows.append([label, num(c["ce"]), ci_text(c["ce_ci"]),
                         f"{signed(c['delta_vs_clean'])} {ci_text(c['delta_ci'])}",
                         f"{num(c.get('kl'))} {ci_text(c.get('kl_ci'))}", c.get("equivalent_note", "")])
    lines += table(["condition", "CE", "95% CI", "Δ vs clean (95% CI)", "KL (95% CI)",
                     "equivalent training fraction"], rows)
    return lines + [""]


def other_modes(res: dict) -> list[str]:
    """The conditions evaluated in the other modes (evaluate.modes after the first): fixed ones and
    the full rewrites."""
    lines = []
    for mode, conds in (res.get("other_modes") or {}).items():
        what = {"whole_layer": "all of a window's positions patched at once, later positions seeing the patched "
                               "earlier ones", "each": "each position patched alone"}.get(mode, mode)
        fmax = max((c["fraction"] for c in conds if "fraction" in c), default=None)
        shown = [c for c in conds if c["name"] in FIXED or c.get("selection") == "all_latents"
                 or (c.get("selection") == "top" and c.get("fraction") == fmax)]
        lines += [f"## Evaluation mode `{mode}`", "", f"The same conditions with {what}.", "",
                  *table(["condition", "CE", "Δ vs clean (95% CI)", "KL (95% CI)"],
                         [[condition_label(c), num(c["ce"]), f"{signed(c['delta_vs_clean'])} {ci_text(c['delta_ci'])}",
                           f"{num(c.get('kl'))} {ci_text(c.get('kl_ci'))}"] for c in shown]), ""]
    return lines


def checkpoint_table(res: dict) -> list[str]:
    curve = res.get("checkpoints", [])
    lines = ["## Checkpoint curve", "",
             "CE of the subject model's intermediate checkpoints at the evaluated positions: the scale for the "
             "equivalent training fraction.", ""]
    if not curve:
        return lines + ["No checkpoints recorded.", ""]
    lines += table(["checkpoint", "training fraction", "CE"],
                    [[c["name"], num(c["fraction"], 3), num(c["ce"])] for c in curve])
    if len(curve) == 1:
        lines += ["", "Only the final model: every equivalent fraction is \">= 1\" or at the curve's end."]
    return lines + [""]


def sweep_table(res: dict, plotted: bool) -> list[str]:
    rows = sweep_entries(res)
    lines = ["## Calibration sweep", "",
             "Pooled over latents and evaluation contexts; a prediction counts as active above half a rating step "
             "(max activation / 18). CE with every simulated latent replaced (top selection, largest fraction). "
             "Pooled fallback (isotonic, abstain): the latents with too few firing calibration pairs "
             "(`calibrate.min_nonzero`) that use the map pooled over latents.", ""]
    if not rows:
        return lines + ["No calibration sweep in results.json.", ""]
    lines += table(["variant", "estimator", "calibration contexts", "pooled specificity", "pooled sensitivity",
                     "CE (top, all)", "pooled fallback"],
                    [[s["variant"], s["estimator"] or "—", s["size"] if s["size"] is not None else "—",
                      num(s["pooled_specificity"], 3), num(s["pooled_sensitivity"], 3), num(s["ce_top_all"]),
                      s["pooled_fallback"] if s.get("pooled_fallback") is not None else "—"]
                     for s in rows], "lllrrrr")
    if plotted:
        lines += ["", "![calibration sweep](calibration_sweep.png)"]
    return lines + [""]


def predictions_section(res: dict) -> list[str]:
    lat = res.get("latents", [])
    lines = ["## Predictions vs detection score", ""]
    if not lat:
        return lines + ["No per-latent results.", ""]
    explained = [x for x in lat if x.get("explained")]
    active = sum(1 for x in lat if (x.get("true_active") or 0) > 0)
    rows = []
    for v in VARIANTS:
        for k in ("specificity", "sensitivity"):
            col = column(lat, f"{v}_{k}")
            rows.append([f"{v} {k}", num(np.nanmean(col), 3) if np.isfinite(col).any() else "n/a",
                         int(np.isfinite(col).sum())])
    lines += table(["mean over latents", "value", "latents defined"], rows)
    auc = column(lat, "detection_auc")
    lines += ["", f"- Simulated latents: {len(lat)} ({len(explained)} explained); with any true activation in the "
                  f"evaluation contexts: **{active}** (the others have no sensitivity).",
              f"- Latents with a detection AUC: {int(np.isfinite(auc).sum())}"
              + (f" (mean {num(np.nanmean(auc), 3)})." if np.isfinite(auc).any() else ".")]
    for k in ("specificity", "sensitivity"):
        y = column(lat, f"normalised_{k}")
        ok = np.isfinite(auc) & np.isfinite(y)
        rho = spearman(auc, y)
        why = "" if isnum(rho) else " (undefined: fewer than 3 latents or a constant value)"
        lines.append(f"- Spearman correlation of detection AUC with normalised {k}: "
                     f"**{num(rho, 3)}** over {int(ok.sum())} latents{why}.")
    return lines + ["", "![specificity and sensitivity vs detection AUC](specificity_sensitivity.png)", ""]


SHORT_CLAIMS = {"a": "transcoder beats the normalised rewrite:", "b": "normalisation helps:",
                "c": "raw predictions are worse than zero ablation:", "d": "normalised ≈ zero ablation, not better:",
                "e1": "top latents beat random (normalised):", "e2": "top latents beat random (raw):",
                "f": "normalisation trades sensitivity for specificity:"}


def orderings(run: RunResults, res: dict) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    """The orderings section, and each claim's (tag, short text, verdict) for the summary."""
    f = run.fmax
    fl = frac(f) if f is not None else "?"
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
    claims = []

    def item(tag: str, claim: str, a: dict | None, b: dict | None, ok_fn) -> None:
        short = SHORT_CLAIMS[tag]
        if a is None or b is None:
            lines.append(f"- **({tag})** {claim}: {verdict(None)} (condition missing).")
            claims.append((tag, short, None))
            return
        ok = ok_fn(a["ce"], b["ce"]) if isnum(a["ce"]) and isnum(b["ce"]) else None
        claims.append((tag, short, ok))
        lines.append(f"- **({tag})** {claim}: {verdict(ok)}. {condition_label(a)} {num(a['ce'])} vs "
                     f"{condition_label(b)} {num(b['ce'])}; {compare(run, a, b)}.")

    item("a", "transcoder CE < normalised (top) CE", tc, norm, lambda x, y: x < y)
    item("b", "normalised (top) CE < raw (top) CE: normalisation helps", norm, raw, lambda x, y: x < y)
    item("c", "raw (top) CE > zero ablation CE: raw predictions are worse than deleting the layer's output",
         raw, zero, lambda x, y: x > y)
    if norm is None or zero is None or not (isnum(norm["ce"]) and isnum(zero["ce"])):
        lines.append(f"- **(d)** normalised (top) does not beat zero ablation (paper: similar): {verdict(None)}.")
        claims.append(("d", SHORT_CLAIMS["d"], None))
    else:
        pd = run.paired_diff(norm, zero)
        # holds unless normalised is lower beyond the noise (the paired CI, else the conditions' own CIs)
        ok = norm["ce"] >= zero["ce"] or (pd[1][1] >= 0 if pd is not None else
                                          isnum(norm["ce_ci"][1]) and norm["ce_ci"][1] >= zero["ce_ci"][0])
        similar = ""
        if pd is not None:
            similar = " They are similar (the difference is within the CI)." if pd[1][0] <= 0 <= pd[1][1] else \
                " They differ beyond the CI."
        lines.append(f"- **(d)** normalised (top) does not beat zero ablation beyond the CI (paper: similar): "
                     f"{verdict(ok)}. "
                     f"{condition_label(norm)} {num(norm['ce'])} vs zero ablation {num(zero['ce'])}; "
                     f"{compare(run, norm, zero)}.{similar}")
        claims.append(("d", SHORT_CLAIMS["d"], ok))
    total = res.get("latents_simulated")
    for tag, v in (("e1", "normalised"), ("e2", "raw")):
        better, n, sig = 0, 0, 0
        for fr in run.fractions:
            t, r = run.find(v, "top", fr), run.find(v, "random", fr)
            if t is None or r is None or t.get("n_selected") == total or not (isnum(t["ce"]) and isnum(r["ce"])):
                continue  # every latent selected: the same set either way
            n += 1
            better += t["ce"] < r["ce"]
            pd = run.paired_diff(t, r)
            sig += pd is not None and pd[1][1] < 0
        ok = None if n == 0 else better > n / 2
        claims.append((tag, SHORT_CLAIMS[tag], ok))
        extra = f"; at {sig} of them the paired difference's CI excludes 0" if run.ce is not None else ""
        lines.append(f"- **({tag})** {v}: top selection has lower CE than random at most fractions: {verdict(ok)}. "
                     f"Lower at {better} of {n} fractions (fractions selecting every latent left out){extra}.")
    sweep = {s["variant"]: s for s in res.get("calibration_sweep", [])}
    r, nm = sweep.get("raw"), sweep.get("normalised")
    if r is None or nm is None:
        lines.append(f"- **(f)** specificity rises and sensitivity falls with normalisation: {verdict(None)}.")
        claims.append(("f", SHORT_CLAIMS["f"], None))
    else:
        sp = (nm["pooled_specificity"] > r["pooled_specificity"]) if isnum(nm["pooled_specificity"]) and \
            isnum(r["pooled_specificity"]) else None
        se = (nm["pooled_sensitivity"] < r["pooled_sensitivity"]) if isnum(nm["pooled_sensitivity"]) and \
            isnum(r["pooled_sensitivity"]) else None
        ok = None if sp is None or se is None else sp and se
        lines.append(f"- **(f)** pooled specificity rises and sensitivity falls with normalisation: {verdict(ok)}. "
                     f"Specificity {num(r['pooled_specificity'], 3)} → {num(nm['pooled_specificity'], 3)} "
                     f"({'rises' if sp else 'does not rise' if sp is not None else 'n/a'}); sensitivity "
                     f"{num(r['pooled_sensitivity'], 3)} → {num(nm['pooled_sensitivity'], 3)} "
                     f"({'falls' if se else 'does not fall' if se is not None else 'n/a'}).")
        claims.append(("f", SHORT_CLAIMS["f"], ok))
    return lines + [""], claims


def other_stages(ev: dict | None, sp: dict | None, sc: dict | None) -> list[str]:
    """The subject model's eval, the coder's training summary and the scores' summary, where present."""
    rows = []
    if ev:
        rows.append(["subject model validation CE", num(ev.get("val_ce"))])
        rows.append(["unigram validation CE", num(ev.get("unigram_val_ce"))])
    if sp:
        for k in ("ce_clean", "ce_spliced", "ce_zero_ablated", "loss_recovered"):
            if k in sp:
                rows.append([f"sparse coder training: {k.replace('_', ' ')}", num(sp[k])])
    if sc:
        rows.append(["explanations scored / skipped", f"{sc.get('scored')} / {sc.get('skipped')}"])
        for k in ("mean_detection_auc", "mean_detection_balanced_accuracy", "mean_fuzzing_auc"):
            if k in sc:
                rows.append([k.replace("_", " "), num(sc[k], 3)])
    if not rows:
        return []
    return ["## Earlier stages", "", *table(["quantity", "value"], rows), ""]
