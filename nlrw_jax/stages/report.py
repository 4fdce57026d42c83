"""`nlrw report`: report/report.md with the tables of `nlrw evaluate` and PNG plots.

Reads evaluate/{results.json, values.npz} (values.npz is optional: without it there is no
distribution plot and the orderings compare the conditions' own CIs instead of paired
differences), plus, where present, the scores', the coder's and the subject model's summaries.
Of values.npz only the small arrays are loaded whole; the [contexts, latents] ones (GBs each at the
paper's widths) are streamed a block of rows at a time.

The report is derived from the other stages' outputs: it is remade when they changed and skipped
when they did not. The new report is made whole in a temporary folder first; only then are its
files moved into report/ (each by an atomic rename, report.md last), so an interrupted or failed
report leaves the previous one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from nlrw_jax.config import Config
from nlrw_jax.errors import UserError
from nlrw_jax.io import npz_members, read_json_object, read_npz, write_text
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.common import run_folder


VALUES_FIX = "rerun `nlrw evaluate` or delete it (the report is then made without the distribution plot)"
# The arrays of values.npz the report holds whole: the per-condition x context CE and KL and the
# contexts' windows and positions (RunResults reads them by name). Chosen by name, not by shape: in a
# tiny run ce [conditions, contexts] can have the shape of a [contexts, latents] array. The latter
# ("true" and every variant, GBs each at the paper's widths) stay on disk and are streamed by
# plot_distributions.
WHOLE_VALUES = ("ce", "kl", "window", "positions")


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


def _summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(cfg: Config, progress: bool = True) -> Path:
    from nlrw_jax.extras import require

    require("matplotlib", "report", "the plots")  # before any work: a missing extra is one line
    from nlrw_jax.report import plots as G

    run = run_folder(cfg)
    res_path = run.results
    if not res_path.exists():
        raise UserError(f"{res_path} does not exist; run `nlrw evaluate` first")
    res = read_json_object(res_path, "rerun `nlrw evaluate`")
    _check_results(res, res_path)
    values = None
    if run.values.exists():
        values = read_npz(run.values, VALUES_FIX, names=WHOLE_VALUES)
    inputs = [run.results, run.values, run.eval_json, run.train_summary, run.score_summary]
    ident = {"inputs": {str(p.relative_to(run.root)): file_digest(p) for p in inputs if p.exists()}}
    # The report is derived from the stages' outputs: it is made anew when they changed (replacing
    # the old one only once the new one is complete), and skipped when they did not.
    with run.lock("report") as out:
        if run.report.exists() and run.identity("report") == ident:
            return run.report
        tmp = out / f".new-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_report(cfg, run, res, values, tmp, progress)
            # The new report is complete: move it in, report.md last; drop plots this run could not make.
            for name in G.PLOTS:
                if (tmp / name).exists():
                    os.replace(tmp / name, out / name)
                else:
                    (out / name).unlink(missing_ok=True)
            os.replace(tmp / "report.md", run.report)
            run.record("report", ident)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return run.report


def _write_report(cfg: Config, run, res: dict, values: dict | None, tmp: Path, progress: bool) -> None:
    """report.md and the plots, into `tmp`."""
    from nlrw_jax.report import markdown as M
    from nlrw_jax.report import plots as G
    from nlrw_jax.report.stats import RunResults

    results = RunResults(res, values)
    made: dict[str, str | bool] = {}
    steps = tqdm(total=5, desc="report", unit="file", disable=not progress)
    G.plot_loss(results, tmp / "loss_vs_fraction.png")
    made["loss_vs_fraction.png"] = True
    steps.update()
    if values is not None and "true" in npz_members(run.values, VALUES_FIX):
        made["distributions.png"] = G.plot_distributions(run.values, res, tmp / "distributions.png", VALUES_FIX)
    steps.update()
    made["specificity_sensitivity.png"] = G.plot_spec_sens(res, tmp / "specificity_sensitivity.png")
    steps.update()
    if G.plot_sweep(res, tmp / "calibration_sweep.png"):
        made["calibration_sweep.png"] = True
    steps.update()

    ev_dir = run.dir("evaluate")
    order_lines, claims = M.orderings(results, res)
    lines = M.summary(results, res, claims)  # the answer first, then the plot, then what supports it
    lines += ["![CE, Δ CE and KL vs fraction replaced](loss_vs_fraction.png)", ""]
    lines += M.main_tables(results)
    lines += [f"Every condition (the calibration sweep's variants included): [`table.csv`]({ev_dir / 'table.csv'}).",
              ""]
    lines += M.other_modes(res)
    lines += M.checkpoint_table(res)
    lines += M.sweep_table(res, "calibration_sweep.png" in made)
    lines += M.predictions_section(res)
    if "specificity_sensitivity.png" in made:
        lines += [f"Plot: {made['specificity_sensitivity.png']}", ""]
    lines += ["## Predicted vs true activations", ""]
    if "distributions.png" in made:
        lines += [str(made["distributions.png"]), "", "![activation distributions](distributions.png)", ""]
    else:
        lines += [f"No {ev_dir / 'values.npz'}: no distribution plot.", ""]
    lines += order_lines
    lines += M.setting(res, cfg.run_dir)
    lines += M.other_stages(_summary(run.eval_json), _summary(run.train_summary), _summary(run.score_summary))
    lines += ["## Plots", ""] + [f"- [{n}]({n})" for n in G.PLOTS if n in made] + \
        ["", f"Source: `{run.results}` (table: `{ev_dir / 'table.csv'}`).", ""]
    write_text(tmp / "report.md", "\n".join(lines))
    steps.update()
    steps.close()
