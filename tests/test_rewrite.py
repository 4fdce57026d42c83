"""Simulation (sharded, resumable), calibration, the compiled patched forward and `nlrw evaluate`
on a small real run with the real local LLM (SmolLM2)."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from procs import ONE_DEVICE, kill_at_random_points_then_finish, kill_when_then_rerun
from tiny_run import make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoX, token_cross_entropy
from nlrw_jax.rewrite import simulate as S
from nlrw_jax.stages.simulate import load_predictions
from nlrw_jax.rewrite.patched import check_shapes, make_patched_ce
from nlrw_jax.sparse import coder as sc

SIM = ["simulate.sentences=6", "simulate.calibration=8", "simulate.contexts_per_shard=4",
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


@pytest.mark.parametrize("kind, layer", [("transcoder", 5), ("transcoder", 2), ("sae", 3)])
def test_patched_forward_matches_full_model_with_hooks(kind, layer):
    """Every condition of the compiled function equals a full forward with the replacement at p only."""
    config, params = hf.load("assets/tiny-pythia/final")
    model = GPTNeoX(config)
    d, n, k = config.hidden_size, 64, 4
    coder = sc.init_coder(jax.random.PRNGKey(1), d, n, kind=kind, skip=kind == "transcoder")
    coder["W_dec"] = jax.random.normal(jax.random.PRNGKey(2), (n, d)) * 0.3
    if kind == "transcoder":
        coder["W_skip"] = jax.random.normal(jax.random.PRNGKey(3), (d, d)) * 0.05
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (4, 64)).astype(np.int32)
    positions = np.array([31, 40, 50, 62], np.int32)
    values = rng.uniform(0, 2, (2, 4, n)).astype(np.float32)
    masks = np.zeros((2, n), bool)
    masks[0, :5] = True
    masks[1] = True
    ce = np.asarray(make_patched_ce(model, layer, kind, k)(params, coder, windows, positions, values, masks))
    assert ce.shape == (3 + 2 * 2, 4)
    at_p = (jnp.arange(64)[None, :] == positions[:, None])[..., None]

    def reference(row_fn):
        def repl(*args):
            x = args[0]
            flat = x.reshape(-1, d)
            new = row_fn(flat).reshape(x.shape)
            old = args[1](x) if len(args) > 1 else x
            return jnp.where(at_p, new, old)
        hook = {"mlp_replacements": {layer: repl}} if kind == "transcoder" else {"resid_replacements": {layer: repl}}
        logits, _ = model.apply({"params": params}, windows, **hook)
        return np.asarray(token_cross_entropy(logits, windows))[np.arange(4), positions]

    def simulated(v, m):
        def row_fn(x):
            acts, idx, _ = sc.encode(coder, x, k, kind=kind)
            dense = jnp.zeros((x.shape[0], n)).at[jnp.arange(x.shape[0])[:, None], idx].set(acts)
            vals = jnp.repeat(jnp.asarray(values[v]), 64, axis=0)  # [B*S, n], row b*S+s -> sentence b
            combined = jnp.where(m, vals, dense)
            xin = x - coder["b_dec"] if kind == "sae" else x
            out = sc.decode(coder, *jax.lax.top_k(combined, k))
            return out + xin @ coder["W_skip"].T if "W_skip" in coder else out
        return row_fn

    logits, _ = model.apply({"params": params}, windows)
    clean = np.asarray(token_cross_entropy(logits, windows))[np.arange(4), positions]
    want = [clean, reference(lambda x: sc.forward(coder, x, k, kind=kind)["out"]), reference(jnp.zeros_like)]
    want += [reference(simulated(v, masks[m])) for v in range(2) for m in range(2)]
    np.testing.assert_allclose(ce, np.stack(want), atol=2e-4)


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
    preds = load_predictions(cfg)
    n_ctx, n_lat = 14, 4
    assert preds["logprobs"].shape == (n_ctx, n_lat, 10) and len(list(Path(cfg.run_dir, "simulate", "shards")
                                                                       .glob("*.npz"))) == 4 * 2
    e = S.expected_digit(preds["logprobs"], "renormalised")
    assert ((0 <= e) & (e <= 9)).all() and np.isfinite(preds["logprobs"][:, preds["explained"]]).any()
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate"))
    nlrw("simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}")
    again = load_predictions(load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}"]))
    np.testing.assert_array_equal(again["logprobs"], preds["logprobs"])
    r = nlrw("simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}")  # all done: no LLM loaded
    assert "Loading weights" not in r.stderr


@pytest.mark.slow
def test_killed_simulation_resumes_to_identical_predictions(simulated, tmp_path):
    cfg, overrides, _ = simulated
    reference = load_predictions(cfg)["logprobs"]
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("simulate"))
    cmd = [sys.executable, "-m", "nlrw_jax.cli", "simulate", "configs/tiny.yaml", *overrides, f"run_dir={copy}"]
    kill_when_then_rerun(cmd, marker=copy / "simulate" / "shards" / "00000.npz",
                         finished=copy / "simulate" / "shards" / "00007.npz", env=ONE_DEVICE)
    got = load_predictions(load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}"]))["logprobs"]
    np.testing.assert_array_equal(got, reference)


@pytest.fixture(scope="module")
def evaluated(simulated):
    cfg, overrides, _ = simulated
    nlrw("calibrate", "configs/tiny.yaml", *overrides)
    nlrw("evaluate", "configs/tiny.yaml", *overrides)
    return cfg, overrides, json.loads(Path(cfg.run_dir, "evaluate", "results.json").read_text())


def test_evaluate_results(evaluated):
    cfg, _, res = evaluated
    names = [(c["name"], c.get("selection"), c.get("fraction")) for c in res["conditions"]]
    variants = ["raw", "normalised", "normalised:empirical:4", "normalised:empirical:8", "normalised:type8:4"]
    assert names[:3] == [("clean", None, None), ("transcoder", None, None), ("zero_ablation", None, None)]
    assert names[3:] == [x for v in variants for x in [(v, s, f) for s in ("top", "random") for f in (0.25, 1.0)]
                         + [(v, "all_latents", 1.0)]]
    by = {n: c for n, c in zip(names, res["conditions"])}
    for c in res["conditions"]:
        assert c["ce_ci"][0] <= c["ce"] <= c["ce_ci"][1] and c["delta_ci"][0] <= c["delta_vs_clean"] + 1e-9
    # all latents replaced: top and random select the same set
    assert by[("raw", "top", 1.0)]["ce"] == pytest.approx(by[("raw", "random", 1.0)]["ce"])
    assert by[("raw", "top", 0.25)]["n_selected"] == 1
    fracs = [c["fraction"] for c in res["checkpoints"]]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0 and len(fracs) == 4
    assert res["sentences"] == 6 and res["latents_simulated"] == 4
    assert len(res["latents"]) == 4 and {"raw_specificity", "normalised_specificity"} <= set(res["latents"][0])
    values = np.load(Path(cfg.run_dir, "evaluate", "values.npz"))
    assert values["ce"].shape == (len(names), 6) and values["normalised"].shape == (6, 4)
    assert (values["normalised"] >= 0).all()


def test_calibration_maps_are_monotone_and_fit_on_calibration_contexts(evaluated):
    from nlrw_jax.rewrite import calibrate as C
    from nlrw_jax.rewrite import quantile as Q
    from nlrw_jax.run_folder import RunFolder
    from nlrw_jax.stages.common import load_examples

    cfg, _, _ = evaluated
    m = Q.load_quantile_map(RunFolder(cfg.run_dir).quantile_map("type8", 8))
    assert m["pred_knots"].shape == (4, len(Q.quantile_levels())) and m["meta"]["contexts"] == 8
    preds = load_predictions(cfg)
    raw = C.raw_values(preds, load_examples(cfg).data["max_act"], cfg.simulate.readout)
    np.testing.assert_allclose(m["pred_knots"][:, -1], raw[6:].max(0), rtol=1e-6)  # only calibration contexts


def test_bad_predictions_and_maps_are_refused(evaluated, tmp_path):
    from nlrw_jax.run_folder import RunFolder

    cfg, overrides, _ = evaluated
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy)
    args = [*overrides, f"run_dir={copy}"]
    # NaN predictions: refused, naming the latent
    shard = copy / "simulate" / "shards" / "00000.npz"
    z = dict(np.load(shard))
    z["logprobs"][0, 1, 3] = np.nan
    np.savez(shard, **z)
    r = nlrw("calibrate", "configs/tiny.yaml", *args, "calibrate.sizes=[3]", check=False)
    assert r.returncode == 2 and f"latent {int(z['latents'][1])}" in r.stderr and "NaN" in r.stderr
    # a quantile grid that is not monotone: refused, naming the file and the latent (a finished
    # evaluate would skip, so its folder goes)
    shutil.copy(Path(cfg.run_dir) / "simulate" / "shards" / "00000.npz", shard)
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
    preds = load_predictions(load_config("configs/tiny.yaml", args))
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