"""`nlrw compare RUN_A RUN_B`: two finished runs of the same coder side by side, e.g. plain against
contrastive explanations (the second run made with `explain.style=contrastive
sparse.from=RUN_A/sparse/sparsify`). Writes OUT/compare.md and OUT/compare.png (OUT defaults to
RUN_B/compare), the report made whole in a temporary folder and moved in, compare.md last."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from nlrw_jax.errors import UserError
from nlrw_jax.io import read_json_object, read_npz, write_text
from nlrw_jax.run_folder import RunFolder


def _load(root: Path):
    from nlrw_jax.report.stats import RunResults
    from nlrw_jax.stages.report import WHOLE_VALUES

    run = RunFolder(root)
    if not run.results.exists():
        raise UserError(f"{run.results} does not exist; finish that run (`nlrw run`) before comparing it")
    res = read_json_object(run.results, "rerun `nlrw evaluate` in that run")
    values = read_npz(run.values, "rerun `nlrw evaluate` in that run", names=WHOLE_VALUES) if run.values.exists() \
        else None
    scores = {}
    if run.score_table.exists():
        with open(run.score_table) as f:
            scores = {int(r["latent"]): {k: float(r[k] or "nan") for k in ("detection_auc", "fuzzing_auc") if k in r}
                      for r in csv.DictReader(f)}
    return run, RunResults(res, values), scores


def run(run_a: Path, run_b: Path, out: Path | None = None, labels: tuple[str, str] = ("A", "B")) -> Path:
    from nlrw_jax.extras import require

    require("matplotlib", "compare", "the plot")
    from nlrw_jax.report import compare as C

    (fa, a, sa), (fb, b, sb) = _load(Path(run_a)), _load(Path(run_b))
    coders = [f.made_from("explain").get("coder") for f in (fa, fb)]
    if coders[0] != coders[1]:
        raise UserError(f"{fa.root} and {fb.root} explain different coders ({coders[0]} vs {coders[1]}); compare "
                        f"runs of one coder (make the second with sparse.from={fa.coder})")
    out = Path(out) if out else fb.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plotted = C.plot_compare(a, b, sa, sb, labels, tmp / "compare.png")
        lines = C.compare_report(a, b, sa, sb, labels, (str(fa.root), str(fb.root)), plotted)
        write_text(tmp / "compare.md", "\n".join(lines))
        if plotted:
            os.replace(tmp / "compare.png", out / "compare.png")
        os.replace(tmp / "compare.md", out / "compare.md")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "compare.md"
