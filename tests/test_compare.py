"""`nlrw compare` on two synthetic run folders of one coder (plain vs contrastive explanations), and
the report summary's plain sentence on which whole-layer rewrites beat zero and mean ablation."""

import json

import pytest

from nlrw_jax.cli import main
from nlrw_jax.report.markdown import any_beats
from nlrw_jax.report.stats import RunResults
from test_report import make_run


def _arm(root, coder, aucs, **levels):
    make_run(root, **levels)
    (root / "explain").mkdir(parents=True)
    (root / "explain" / "identity.json").write_text(json.dumps({"coder": coder}))
    (root / "scores").mkdir()
    rows = ["latent,detection_balanced_accuracy,detection_auc,fuzzing_balanced_accuracy,fuzzing_auc"]
    rows += [f"{lat},0.5,{a},0.5,0.5" for lat, a in aucs.items()]
    (root / "scores" / "table.csv").write_text("\n".join(rows) + "\n")


def test_any_beats_names_the_whole_layer_rewrites(tmp_path):
    res = make_run(tmp_path, raw_all=4.6, norm_all=4.3)  # zero ablation 4.4, mean ablation 4.35
    import numpy as np

    values = dict(np.load(tmp_path / "evaluate" / "values.npz"))
    lines = any_beats(RunResults(res, values))
    assert lines[0].startswith("- **4 of the 5** whole-layer rewrites (raw and every calibration) beat zero "
                               "ablation beyond the 95% CI: `normalised`, ")
    assert "`raw`" not in lines[0]
    res = make_run(tmp_path, raw_all=4.6, norm_all=4.5)
    values = dict(np.load(tmp_path / "evaluate" / "values.npz"))
    assert any_beats(RunResults(res, values))[1] == ("- **none** of the 5 whole-layer rewrites (raw and every "
                                                    "calibration) beats mean ablation beyond the 95% CI.")


def test_compare_pairs_latents_and_contexts(tmp_path, capsys):
    a, b = tmp_path / "plain", tmp_path / "contrastive"
    _arm(a, "c0ffee", {0: 0.6, 2: 0.7, 4: 0.5, 6: float("nan")}, norm_all=4.3)
    _arm(b, "c0ffee", {0: 0.7, 2: 0.8, 4: 0.6, 8: 0.9}, norm_all=4.2)  # same seed: the same contexts
    assert main(["compare", str(a), str(b)]) == 0
    md = (b / "compare" / "compare.md").read_text()
    assert md.startswith("# contrastive against plain explanations\n\n**Answer:** detection AUC 0.600 (plain) vs "
                         "0.700 (contrastive) over 3 latents scored in both: contrastive − plain = +0.100, 95% CI "
                         "[0.100, 0.100] (excludes 0); best rewrite (every simulated latent replaced) CE ")
    # the whole-layer rewrites paired over the shared contexts: contrastive 0.1 nats lower
    row = next(ln for ln in md.splitlines() if ln.startswith("| normalised (top, 1.0) |"))
    diff = float(row.split("|")[4].split()[0])
    assert diff == pytest.approx(-0.1, abs=0.01)
    assert "| detection auc | 0.600 | 0.700 | +0.100 [0.100, 0.100] | 3 / 0 | 3 |" in md
    assert (b / "compare" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_different_coders(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _arm(a, "c0ffee", {0: 0.6})
    _arm(b, "beef", {0: 0.6})
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "explain different coders (c0ffee vs beef)" in err[0]
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def test_compare_other_latents_pairs_scores_only(tmp_path):
    a, b = tmp_path / "all", tmp_path / "subset"
    _arm(a, "c0ffee", {0: 0.6, 2: 0.7, 4: 0.5}, norm_all=4.3, latents_simulated=8)
    _arm(b, "c0ffee", {0: 0.7, 2: 0.8}, norm_all=4.2, latents_simulated=4)
    assert main(["compare", str(a), str(b), "--labels", "plain,contrastive"]) == 0
    md = (b / "compare" / "compare.md").read_text()
    assert "over 2 latents scored in both" in md
    assert "the rewrites are not compared: the runs simulated different latents (8 and 4)" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| normalised (top, 1.0) |"))
    assert "n/a (different latents simulated)" in row
