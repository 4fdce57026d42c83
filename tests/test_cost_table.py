"""scripts/cost_table.py: the paper run's cost from two rehearsals at two scales. Each stage's
fixed and per-unit seconds come back from the two times; the table in launch/README.md is the
one the committed rehearsals give."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import cost_table  # noqa: E402
from rehearse import PYTHIA_160M, reduced  # noqa: E402

from nlrw_jax.config import load_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _rehearsal(scale: int, seconds) -> dict:
    overrides = reduced(Path("/nowhere/run"), Path("/nowhere/model"), True, scale)
    units = cost_table.units(load_config(cost_table.CONFIG, overrides))
    return {"scale": scale, "machine": "test", "date": "today", "overrides": overrides, "model": PYTHIA_160M,
            "stages": {s: {"seconds": seconds(s, n), "peak_rss_gb": 1.0} for s, (_, n) in units.items()}}


def test_fixed_and_per_unit_seconds_come_back():
    overrides = reduced(Path("/nowhere/run"), Path("/nowhere/model"), True, 1)
    n_small = {s: n for s, (_, n) in cost_table.units(load_config(cost_table.CONFIG, overrides)).items()}
    fixed = {s: 10.0 + i for i, s in enumerate(n_small)}
    per = {s: 5.0 * (i + 1) / n_small[s] for i, s in enumerate(n_small)}  # well above the noise floor
    small, large = (_rehearsal(k, lambda s, n: fixed[s] + per[s] * n) for k in (1, 4))
    cost = cost_table.unit_costs(small, large)
    for s in fixed:
        assert cost[s]["resolved"]
        if s == "report":  # one report either way: all fixed
            assert cost[s]["per_unit"] == 0 and cost[s]["fixed"] == pytest.approx(fixed[s] + per[s])
        else:
            assert cost[s]["per_unit"] == pytest.approx(per[s]) and cost[s]["fixed"] == pytest.approx(fixed[s])


def test_a_difference_within_the_noise_resolves_no_unit_cost():
    """calibrate 5.4 s -> 5.5 s for 16x the values: extrapolated to the paper's 10^8 values that
    would be hours of noise, so the table says it is not resolved instead."""
    small, large = (_rehearsal(k, lambda s, n: 10.0 + (0.1 if k == 4 else 0.0)) for k in (1, 4))
    cost = cost_table.unit_costs(small, large)
    assert not cost["calibrate"]["resolved"] and cost["calibrate"]["per_unit"] == 0
    assert "not resolved" in cost_table.table(small, large)


def test_the_paper_runs_units():
    u = cost_table.units(load_config(cost_table.CONFIG))
    assert u["train"][1] == 125000 * 65536  # ~8.2B tokens
    assert u["simulate"][1] == (1000 + 10000) * 32768  # one prompt per (context, latent)
    assert u["score"][1] == 32768 * 2 * 200  # detection + fuzzing on 100 + 100 windows
    assert u["explain"][1] == 32768


def test_launch_readme_holds_the_committed_rehearsals_table():
    small, large = (json.loads((RESULTS / f"rehearsal-scale{k}.json").read_text()) for k in (1, 4))
    doc = (REPO / "launch" / "README.md").read_text()
    held = doc.split("<!-- cost-table -->\n", 1)[1].split("<!-- /cost-table -->", 1)[0]
    assert held == cost_table.table(small, large), "rerun scripts/cost_table.py --write launch/README.md"


def test_not_a_rehearsal_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": {}}))
    r = subprocess.run([sys.executable, "scripts/cost_table.py", str(bad), str(bad)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr, r.stderr
