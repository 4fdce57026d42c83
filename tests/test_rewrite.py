"""Simulation (sharded, resumable), calibration, the compiled patched forward and `nlrw evaluate`
on a small real run with the real local LLM (SmolLM2)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import ONE_DEVICE, REPO, kill_at_random_points_then_finish, kill_when_then_rerun
from tiny_run import make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.rewrite import simulate as S
from nlrw_jax.stages.simulate import load_predictions
from nlrw_jax.rewrite.patched import check_shapes

SIM = ["simulate.mode=one_at_a_time", "simulate.sentences=6", "simulate.calibration=8", "simulate.contexts_per_shard=4",
       "simulate.latents_per_shard=3", "calibrate.sizes=[4]", "evaluate.fractions=[0.25,1.0]",
       "evaluate.batch_size=4", "evaluate.bootstrap=200"]


# ------------------------------------------------------------------------------ pure functions


def test_readouts_and_raw_mapping():
    p = np.array([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25], [0.0] * 10])
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    np.testing.assert_allclose(S.expected_digit(lp, "reference"), [9 * 0.25, 0.0])
    np.testing.assert_allclose(S.expected_digit(lp, "renormalised"), [9 * 0.25 / 0.75, 0.0], rtol=1e-6)
    np.testing.assert_allclose(S.raw_activation(np.array([0.0, 4.5, 9.0]), np.float32(2.0)), [0.0, 1.0, 2.0])


def test_masks_of_the_wrong_width_are_refused():
    with pytest.raises(UserError, match="transcoder has 64 latents"):
        check_shapes(np.zeros((1, 2, 64)), np.zeros((3, 63), bool), 64)
    with pytest.raises(UserError, match="expected \\[variants, sentences, 64\\]"):
        check_shapes(np.zeros((1, 2, 65)), np.zeros((3, 64), bool), 64)


# ------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    cfg, overrides = make_run_with_examples(tmp_path_factory)
    overrides = [*overrides, *SIM]
    nlrw("explain", "configs/tiny.yaml", *overrides)
    nlrw("score", "configs/tiny.yaml", *overrides)
    nlrw("simulate", "configs/tiny.yaml", *overrides, "--shard", "1", "--num-shards", "2")
    r = nlrw("simulate", "configs/tiny.yaml", *overrides, "--shard", "0", "--num-shards", "2")
    return load_config("configs/tiny.yaml", overrides), overrides, r.stderr


def test_sharded_simulation_equals_one_worker(simulated, tmp_path):
    cfg, overrides, logs = simulated
    assert "prediction/s" in logs  # a progress bar with a rate
    preds = load_predictions(cfg, logprobs=True)
    n_ctx, n_lat = 14, 4
    assert preds["logprobs"].shape == (n_ctx, n_lat, 10) and len(list(Path(cfg.run_dir, "simulate", "shards")
                                                                       .glob("*.npz"))) == 4 * 2
    e = S.expected_digit(preds["logprobs"], "renormalised")
    assert ((0 <= e) & (e <= 9)).all() and np.isfinite(preds["logprobs"][:, preds["explained"]]).any()
    # what the stages read: the expected ratings of some contexts, reduced shard by shard
    want = S.expected_digit(preds["logprobs"], cfg.simulate.readout)
    for rows, sl in (("evaluation", slice(0, 6)), ("calibration", slice(6, 14)), (np.array([9, 1, 5]), [9, 1, 5])):
        got = load_predictions(cfg, rows)
        np.testing.assert_array_equal(got["rows"], np.arange(n_ctx)[sl])
        np.testing.assert_array_equal(got["expected"], want[sl])
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate"))
    nlrw("simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}")
    again = load_predictions(load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}"]), logprobs=True)
    np.testing.assert_array_equal(again["logprobs"], preds["logprobs"])
    r = nlrw("simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}")  # all done: no LLM loaded
    assert "Loading weights" not in r.stderr


@pytest.mark.slow
def test_killed_simulation_resumes_to_identical_predictions(simulated, tmp_path):
    cfg, overrides, _ = simulated
    reference = load_predictions(cfg, logprobs=True)["logprobs"]
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate"))
    cmd = [sys.executable, "-m", "nlrw_jax.cli", "simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}"]
    kill_when_then_rerun(cmd, marker=copy / "simulate" / "shards" / "00000.npz",
                         finished=copy / "simulate" / "shards" / "00007.npz", env=ONE_DEVICE)
    got = load_predictions(load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}"]), logprobs=True)
    got = got["logprobs"]
    np.testing.assert_array_equal(got, reference)


# all_at_once: 2 + 2 windows x 4 read positions; contexts_per_shard=6 rounds down to one window
AAO = ["simulate.mode=all_at_once", "simulate.read_positions=4", "simulate.sentences=2", "simulate.calibration=2",
       "simulate.contexts_per_shard=6", "calibrate.sizes=[4]"]


@pytest.fixture(scope="module")
def all_at_once(simulated, tmp_path_factory):
    """The simulated run's explanations simulated all at once by two --shard workers."""
    cfg, overrides, _ = simulated
    copy = tmp_path_factory.mktemp("aao") / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate", "calibrate", "evaluate", "report"))
    args = [*overrides, *AAO, f"run_dir={copy}"]
    nlrw("simulate", "configs/tiny.yaml", *args, "--shard", "1", "--num-shards", "2")
    nlrw("simulate", "configs/tiny.yaml", *args, "--shard", "0", "--num-shards", "2")
    return load_config("configs/tiny.yaml", args), args


def test_all_at_once_contexts_shards_and_calibration(all_at_once, tmp_path):
    cfg, args = all_at_once
    preds = load_predictions(cfg, logprobs=True)
    c = preds["contexts"]
    width, ctx = cfg.examples.window_tokens, cfg.data.ctx_len
    assert c["windows"].shape == (4, ctx) and int(c["n_eval"]) == 8
    assert list(c["window"]) == [w for w in range(4) for _ in range(4)]  # window-major
    p = c["positions"].reshape(4, 4)
    assert (np.diff(p, axis=1) == 1).all() and (p[:, 0] >= width - 1).all() and (p[:, -1] <= ctx - 2).all()
    assert preds["logprobs"].shape == (16, 4, 10)
    shards = sorted(Path(cfg.run_dir, "simulate", "shards").glob("*.npz"))
    assert len(shards) == 4 * 2  # 4 windows x 2 latent blocks
    assert all(np.load(f)["contexts"].tolist() in ([0, 4], [4, 8], [8, 12], [12, 16]) for f in shards)
    e = S.expected_digit(preds["logprobs"], "renormalised")
    assert ((0 <= e) & (e <= 9)).all() and np.isfinite(preds["logprobs"][:, preds["explained"]]).any()
    # one worker gives the same shards, bit for bit
    one = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, one, ignore=shutil.ignore_patterns("simulate"))
    nlrw("simulate", "configs/tiny.yaml", *args, f"run_dir={one}")
    again = load_predictions(load_config("configs/tiny.yaml", [*args, f"run_dir={one}"]), logprobs=True)
    np.testing.assert_array_equal(again["logprobs"], preds["logprobs"])
    # calibration uses every read position of the calibration windows
    nlrw("calibrate", "configs/tiny.yaml", *args)
    maps = sorted(p.name for p in Path(cfg.run_dir, "calibrate", "maps").glob("*.npz"))
    assert maps == [f"{c}_{n}.npz" for c in ("abstain", "empirical", "isotonic", "type8") for n in (4, 8)]


@pytest.mark.slow
def test_all_at_once_killed_at_random_points_gives_identical_shards(all_at_once, tmp_path):
    cfg, args = all_at_once
    reference = {f.name: np.load(f)["logprobs"] for f in Path(cfg.run_dir, "simulate", "shards").glob("*.npz")}
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate", "calibrate"))
    cmd = [sys.executable, "-m", "nlrw_jax.cli", "simulate", "configs/tiny.yaml", *args, f"run_dir={copy}"]
    rng = random.Random(15)
    for _ in range(3):  # killed a random 0-4 s after the contexts exist (mid-shard or between shards)
        proc = subprocess.Popen(cmd, cwd=REPO, env=ONE_DEVICE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (copy / "simulate" / "contexts.npz").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    nlrw("simulate", "configs/tiny.yaml", *args, f"run_dir={copy}")
    got = {f.name: np.load(f)["logprobs"] for f in (copy / "simulate" / "shards").glob("*.npz")}
    assert sorted(got) == sorted(reference)
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name])


@pytest.fixture(scope="module")
def evaluated(simulated):
    cfg, overrides, _ = simulated
    nlrw("calibrate", "configs/tiny.yaml", *overrides)
    nlrw("evaluate", "configs/tiny.yaml", *overrides)
    return cfg, overrides, json.loads(Path(cfg.run_dir, "evaluate", "results.json").read_text())


def test_evaluate_results(evaluated):
    from nlrw_jax.rewrite import calibrate as C
    from nlrw_jax.run_folder import RunFolder
    from nlrw_jax.stages.common import load_examples

    cfg, _, res = evaluated
    names = [(c["name"], c.get("selection"), c.get("fraction")) for c in res["conditions"]]
    variants = ["raw", "normalised", "normalised:empirical:4", "normalised:empirical:8", "normalised:type8:4",
                "normalised:isotonic:4", "normalised:isotonic:8", "normalised:abstain:4", "normalised:abstain:8"]
    assert names[:6] == [(n, None, None) for n in ("clean", "transcoder", "zero_ablation", "mean_ablation",
                                                   "coder_zero", "latent_means")]
    assert names[6:] == [x for v in variants for x in [(v, s, f) for s in ("top", "random") for f in (0.25, 1.0)]
                         + [(v, "all_latents", 1.0)]]
    by = {n: c for n, c in zip(names, res["conditions"])}
    for c in res["conditions"]:
        assert c["ce_ci"][0] <= c["ce"] <= c["ce_ci"][1] and c["delta_ci"][0] <= c["delta_vs_clean"] + 1e-9
        assert c["kl_ci"][0] - 1e-9 <= c["kl"] <= c["kl_ci"][1] + 1e-9 and c["kl"] >= -1e-6
    assert by[("clean", None, None)]["kl"] == 0 and by[("zero_ablation", None, None)]["kl"] > 0
    assert res["mode"] == "each" and list(res["other_modes"]) == ["whole_layer"]  # tiny.yaml's evaluate.modes
    # all latents replaced: top and random select the same set
    assert by[("raw", "top", 1.0)]["ce"] == pytest.approx(by[("raw", "random", 1.0)]["ce"])
    assert by[("raw", "top", 0.25)]["n_selected"] == 1
    fracs = [c["fraction"] for c in res["checkpoints"]]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and len(fracs) == 4
    assert res["sentences"] == 6 and res["latents_simulated"] == 4
    assert len(res["latents"]) == 4 and {"raw_specificity", "normalised_specificity"} <= set(res["latents"][0])
    values = np.load(Path(cfg.run_dir, "evaluate", "values.npz"))
    assert values["ce"].shape == values["kl"].shape == (len(names), 6) and values["normalised"].shape == (6, 4)
    assert (values["normalised"] >= 0).all()
    # small: every variant saved, each the raw values of the evaluation contexts through its map
    assert res["values_saved"] == variants
    preds = load_predictions(cfg, "evaluation")
    raw = C.raw_values(preds["expected"], preds["explained"], load_examples(cfg).data["max_act"][preds["latents"]])
    np.testing.assert_array_equal(values["raw"], raw)
    np.testing.assert_array_equal(values["true"], S.true_values(preds["contexts"], preds["latents"])[:6])
    for v in variants[1:]:
        est, size = (cfg.calibrate.estimator, 8) if v == "normalised" else v.split(":")[1:]
        want = C.normalised_values(RunFolder(cfg.run_dir).quantile_map(est, int(size)), raw, preds["latents"],
                                   preds["explained"])
        np.testing.assert_array_equal(values[v.replace(":", "_")], want, err_msg=v)
    # the sweep: every variant, the pooled-fallback count only for the maps fit on pairs
    sweep = {s["variant"]: s for s in res["calibration_sweep"]}
    assert list(sweep) == variants
    assert all(isinstance(sweep[v]["pooled_fallback"], int) == (":isotonic:" in v or ":abstain:" in v)
               for v in variants)


def test_whole_layer_mode_beside_each(evaluated, tmp_path):
    """evaluate.modes=[whole_layer, each]: both modes' conditions, the first the main one. With one
    position per window they patch the same thing, so they agree (the modes' equality with hooked
    forwards at several positions and layers is tests/test_patched.py's)."""
    cfg, overrides, _ = evaluated
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("evaluate", "report"))
    args = [*overrides, f"run_dir={copy}", "evaluate.modes=[whole_layer,each]"]
    nlrw("evaluate", "configs/tiny.yaml", *args)
    res = json.loads((copy / "evaluate" / "results.json").read_text())
    assert res["mode"] == "whole_layer" and list(res["other_modes"]) == ["each"]
    for a, b in zip(res["conditions"], res["other_modes"]["each"]):
        assert a["name"] == b["name"] and a["ce"] == pytest.approx(b["ce"], abs=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    table = (copy / "evaluate" / "table.csv").read_text().splitlines()
    assert table[0].startswith("mode,condition") and len(table) == 1 + 2 * len(res["conditions"])


def test_calibration_maps_are_monotone_and_fit_on_calibration_contexts(evaluated):
    from nlrw_jax.rewrite import calibrate as C
    from nlrw_jax.rewrite import quantile as Q
    from nlrw_jax.run_folder import RunFolder
    from nlrw_jax.stages.common import load_examples

    cfg, _, _ = evaluated
    m = Q.load_quantile_map(RunFolder(cfg.run_dir).quantile_map("type8", 8))
    assert m["pred_knots"].shape == (4, len(Q.quantile_levels())) and m["meta"]["contexts"] == 8
    preds = load_predictions(cfg)
    raw = C.raw_values(preds["expected"], preds["explained"], load_examples(cfg).data["max_act"][preds["latents"]])
    np.testing.assert_allclose(m["pred_knots"][:, -1], raw[6:].max(0), rtol=1e-6)  # only calibration contexts
    # the isotonic map: fit on the calibration contexts' (prediction, true activation) pairs
    from sklearn.isotonic import IsotonicRegression

    m = Q.load_quantile_map(RunFolder(cfg.run_dir).quantile_map("isotonic", 8))
    true = S.true_values(preds["contexts"], preds["latents"])[6:]
    got = np.asarray(Q.apply_quantile_map(m["pred_knots"], m["true_knots"], raw[6:]))
    fell = set(m["meta"]["pooled_fallback_latents"])
    assert m["meta"]["pooled_fallback"] == len(fell) == int(((true > 0).sum(0) < 3).sum())
    for j, lat in enumerate(preds["latents"]):
        if int(lat) not in fell:
            want = IsotonicRegression(out_of_bounds="clip").fit(raw[6:, j], true[:, j]).predict(raw[6:, j])
            np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=1e-6)


def test_bad_predictions_and_maps_are_refused(evaluated, tmp_path):
    from nlrw_jax.run_folder import RunFolder

    cfg, overrides, _ = evaluated
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy)
    args = [*overrides, f"run_dir={copy}"]
    # NaN predictions in a shard a stage reads: refused, naming the latent (calibrate reads the
    # calibration contexts, 6-13: shard 4 is contexts 8-11; evaluate the evaluation ones: shard 0)
    for stage, name in (("calibrate", "00004.npz"), ("evaluate", "00000.npz")):
        shard = copy / "simulate" / "shards" / name
        z = dict(np.load(shard))
        z["logprobs"][0, 1, 3] = np.nan
        np.savez(shard, **z)
        r = nlrw(stage, "configs/tiny.yaml", *args, *(["calibrate.sizes=[3]"] if stage == "calibrate" else []),
                 check=False)
        assert r.returncode == 2 and f"latent {int(z['latents'][1])}" in r.stderr and "NaN" in r.stderr, r.stderr
        shutil.copy(Path(cfg.run_dir) / "simulate" / "shards" / name, shard)
    # a quantile grid that is not monotone: refused, naming the file and the latent (a finished
    # evaluate would skip, so its folder goes)
    shutil.rmtree(copy / "evaluate")
    path = RunFolder(copy).quantile_map("type8", 8)
    z = dict(np.load(path))
    z["pred_knots"][2, 5] = z["pred_knots"][2, 4] - 1.0
    np.savez(path, **z)
    r = nlrw("evaluate", "configs/tiny.yaml", *args, check=False)
    assert r.returncode == 2 and str(path) in r.stderr and f"latent {int(z['latents'][2])} " in r.stderr
    # predictions from another run
    manifest = copy / "simulate" / "identity.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "coder": "0123456789abcdef"}))
    r = nlrw("evaluate", "configs/tiny.yaml", *args, check=False)
    assert r.returncode == 2 and "simulate outputs were made from something else (differs: coder)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_latent_without_explanation_is_simulated_as_zero(evaluated, tmp_path):
    cfg, overrides, _ = evaluated
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate", "calibrate", "evaluate"))
    path = copy / "explain" / "explanations.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[0].update(explanation=None, skipped="no activating examples")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [*overrides, f"run_dir={copy}"]
    for stage in ("simulate", "calibrate", "evaluate"):
        nlrw(stage, "configs/tiny.yaml", *args)
    res = json.loads((copy / "evaluate" / "results.json").read_text())
    assert res["unexplained_simulated_as_zero"] == 1 and res["latents_explained"] == 3
    values = np.load(copy / "evaluate" / "values.npz")
    assert (values["raw"][:, 0] == 0).all() and (values["normalised"][:, 0] == 0).all()
    preds = load_predictions(load_config("configs/tiny.yaml", args), logprobs=True)
    assert np.isneginf(preds["logprobs"][:, 0]).all()  # never sent to the LLM


@pytest.mark.slow
def test_run_killed_at_random_points_resumes_to_the_same_report(evaluated, tmp_path):
    """`nlrw run` from an empty run folder, SIGKILLed at random points of 4 random stages and rerun
    each time, then to the end: the same results and report as the uninterrupted stage-by-stage
    run, and the same predictions. NLRW_FAULT_SEED replays a schedule."""
    cfg, overrides, _ = evaluated
    nlrw("eval", "configs/tiny.yaml", *overrides)  # `nlrw run` starts with it; the report quotes it
    nlrw("report", "configs/tiny.yaml", *overrides)
    run = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "nlrw_jax.cli", "run", "configs/tiny.yaml", *overrides, f"run_dir={run}"]
    stages = {"eval": run.parent, "capture": run / "activations" / "identity.json",
              "train": run / "sparse" / "identity.json", "examples": run / "examples" / "identity.json",
              "explain": run / "explain" / "identity.json", "score": run / "scores" / "identity.json",
              "simulate": run / "simulate" / "identity.json", "calibrate": run / "calibrate" / "identity.json",
              "evaluate": run / "evaluate" / "identity.json", "report": run / "report"}
    seed = int(os.environ.get("NLRW_FAULT_SEED", random.randrange(1 << 30)))
    landed = kill_at_random_points_then_finish(cmd, stages, kills=4, seed=seed)
    print(f"NLRW_FAULT_SEED={seed}: kills landed in {landed}")
    # A kill late in a short stage can come after the run ended; the others must have landed.
    assert sum(where != "finished" for where in landed) >= 2, (seed, landed)
    for name in ("evaluate/results.json", "report/report.md"):
        want = Path(cfg.run_dir, name).read_text().replace(str(cfg.run_dir), "RUN")
        assert Path(run, name).read_text().replace(str(run), "RUN") == want, (name, seed, landed)
    for shard in sorted(Path(cfg.run_dir, "simulate", "shards").glob("*.npz")):
        np.testing.assert_array_equal(np.load(run / "simulate" / "shards" / shard.name)["logprobs"],
                                      np.load(shard)["logprobs"], err_msg=f"{shard.name} seed {seed}")