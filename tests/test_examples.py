"""`nlrw examples`: the streaming sweep against a brute-force reference, resumption after a
SIGKILL, and its bad inputs. Uses a small real run folder (tiny Pythia + a briefly trained transcoder)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import ONE_DEVICE, kill_when_then_rerun
from tiny_run import make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import examples as E
from nlrw_jax.stages import common
from nlrw_jax.stages import examples as examples_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_with_examples(tmp_path_factory)


def brute_force(cfg):
    """Every window's strength for every latent, in memory: fine at this size only."""
    params, meta, _ = common.load_coder(cfg)
    rows = common.open_rows(cfg)
    x = rows.inputs(0, rows.num_tokens)
    acts = E.latent_acts(params, meta, x, np.arange(meta["num_latents"]))  # [T, n]
    w = cfg.examples.window_tokens
    return acts, acts.reshape(-1, w, acts.shape[1]).max(1)  # [windows, n]


def test_statistics_match_brute_force(run):
    cfg, _ = run
    acts, strength = brute_force(cfg)
    z = np.load(f"{cfg.run_dir}/examples/examples.npz")
    np.testing.assert_array_equal(z["token_count"], (acts > 0).sum(0))
    np.testing.assert_array_equal(z["window_count"], (strength > 0).sum(0))
    np.testing.assert_allclose(z["max_act"], strength.max(0), rtol=1e-6)
    np.testing.assert_allclose(z["frequency"], (acts > 0).mean(0), rtol=1e-6)
    # Deciles from the 3.6%-wide histogram bins, against exact quantiles of the non-zero strengths.
    for latent in np.flatnonzero((strength > 0).sum(0) >= 50)[:20]:
        exact = np.quantile(strength[strength[:, latent] > 0, latent], np.arange(1, 10) / 10)
        np.testing.assert_allclose(z["decile_edges"][latent], exact, rtol=0.08)


def test_kept_windows_are_right(run):
    cfg, _ = run
    _, strength = brute_force(cfg)
    z = np.load(f"{cfg.run_dir}/examples/examples.npz")
    edges = np.concatenate([np.zeros((len(z["max_act"]), 1)), z["decile_edges"],
                            np.full((len(z["max_act"]), 1), np.inf)], 1)
    m = cfg.examples.per_decile
    for latent in range(len(z["max_act"])):
        s = strength[:, latent]
        for d in range(10):
            kept = z["act_window"][latent, d]
            kept = kept[kept >= 0]
            in_decile = np.flatnonzero((s > 0) & (s > edges[latent, d]) & (s <= edges[latent, d + 1]))
            assert len(kept) == min(m, len(in_decile)), (latent, d)
            assert set(kept) <= set(in_decile)
            np.testing.assert_allclose(z["act_value"][latent, d, :len(kept)], s[kept], rtol=1e-6)
        neg = z["neg_window"][latent]
        neg = neg[neg >= 0]
        assert len(neg) == min(cfg.examples.non_activating, int((s == 0).sum()))
        assert (s[neg] == 0).all() and len(set(neg)) == len(neg)


def test_reader_gives_window_tokens_and_activations(run):
    cfg, _ = run
    acts, _ = brute_force(cfg)
    ex = common.load_examples(cfg)
    latent = int(np.argmax(ex.data["window_count"]))
    windows = ex.activating(latent, 2)
    assert windows and len(windows) <= 20
    toks, got = ex.windows(windows, latent)
    w = ex.width
    for i, win in enumerate(windows):
        np.testing.assert_array_equal(toks[i], ex.rows.tokens(win * w, win * w + w))
        np.testing.assert_allclose(got[i], acts[win * w:win * w + w, latent], rtol=1e-6)
        assert got[i].max() > 0


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_examples(run, tmp_path):
    cfg, overrides = run
    reference = dict(np.load(f"{cfg.run_dir}/examples/examples.npz"))
    os.remove(f"{cfg.run_dir}/examples/examples.npz")
    env = {**ONE_DEVICE, "NLRW_EXAMPLES_SAVE_EVERY_S": "0"}
    folder = cfg.run_dir + "/examples"
    cmd = [sys.executable, "-m", "nlrw_jax.cli", "examples", "configs/tiny.yaml", *overrides]
    kill_when_then_rerun(cmd, marker=Path(folder) / "partial.npz", finished=Path(folder) / "examples.npz", env=env)
    got = np.load(f"{folder}/examples.npz")
    assert set(got.files) == set(reference)
    for k in reference:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def test_bad_inputs(run, tmp_path):
    cfg, overrides = run
    r = nlrw("examples", "configs/tiny.yaml", *overrides, "examples.window_tokens=24", check=False)
    assert r.returncode == 2 and "examples.window_tokens" in r.stderr and "divide" in r.stderr
    r = nlrw("examples", "configs/tiny.yaml", f"run_dir={tmp_path / 'empty'}", check=False)
    assert r.returncode == 2 and "no trained coder; run `nlrw train` first" in r.stderr
    with pytest.raises(UserError, match="made from something else .differs: examples"):
        examples_stage.run(load_config("configs/tiny.yaml", [*overrides, "examples.seed=1"]), progress=False)


def test_on_the_fly_rows_give_the_same_examples(run, tmp_path):
    """sparse.source=on_the_fly without a store: the forward over the capture's windows gives
    the examples the store gives (bf16 store vs fp32 forward: same statistics up to rounding)."""
    cfg, overrides = run
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("activations", "examples"))
    cfg2 = load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}", "sparse.source=on_the_fly"])
    rows = common.open_rows(cfg2)
    assert isinstance(rows, E.ForwardRows)
    store_rows = common.open_rows(cfg)
    assert rows.num_tokens == store_rows.num_tokens
    np.testing.assert_array_equal(rows.tokens(300, 900), store_rows.tokens(300, 900))
    np.testing.assert_allclose(rows.inputs(300, 900), store_rows.inputs(300, 900), atol=0.05, rtol=0.02)
    examples_stage.run(cfg2, progress=False)
    a = np.load(copy / "examples" / "examples.npz")
    b = np.load(f"{cfg.run_dir}/examples/examples.npz")
    assert np.corrcoef(a["max_act"], b["max_act"])[0, 1] > 0.99
    assert np.abs(a["token_count"] - b["token_count"]).sum() < 0.05 * b["token_count"].sum()
