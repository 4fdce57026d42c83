"""Every config value is checked when the config loads, before any work: one case per enum and per
rule between keys, and `nlrw run` with a bad late-stage value fails within seconds, leaving
nothing in the run folder that would block the corrected rerun."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ONE_DEVICE

from nlrw_jax.config import identity, load_config
from nlrw_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]

ENUMS = ["model.dtype", "capture.dtype", "sparse.kind", "sparse.source", "sparse.compute_dtype", "llm.backend",
         "llm.dtype", "simulate.mode", "simulate.order", "simulate.readout", "calibrate.estimator", "pretrain.export_dtype",
         "pretrain.arch.hidden_act", "distributed.cpu_collectives"]


@pytest.mark.parametrize("key", ENUMS)
def test_every_enum_is_checked_at_load(key):
    with pytest.raises(UserError, match=rf"config key {key}: 'bogus' is not one of \["):
        load_config("configs/tiny.yaml", [f"{key}=bogus"])


RULES = [
    (["sparse.k=5000"], "sparse.k: 5000 must be <= sparse.num_latents (4096)"),
    (["sparse.k=0"], "sparse.k: 0 must be > 0"),
    (["sparse.warmup_steps=600"], "sparse.warmup_steps: 600 must be in [0, sparse.steps=600)"),
    (["sparse.learning_rate=-1"], "sparse.learning_rate"),
    (["sparse.source=on_the_fly", "sparse.batch_tokens=1000"], "multiple of data.ctx_len"),
    (["examples.window_tokens=24"], "examples.window_tokens: 24 must divide data.ctx_len (256)"),
    (["examples.non_activating=-1"], "examples.non_activating"),
    (["explain.latents=-2"], "explain.latents: -2 must be >= 0"),
    (["explain.latent_ids=[1, 9999]"], "explain.latent_ids: [9999] out of range"),
    (["explain.examples_per_decile=5"], "explain.examples_per_decile: 5 must be in 1..examples.per_decile (4)"),
    (["score.activating_per_decile=3"], "disjoint from the explainer's"),
    (["score.non_activating=30"], "score.non_activating: 30 must be in 1..examples.non_activating (20)"),
    (["llm.backend=openai"], "llm.endpoints"),
    (["llm.memory_fraction=1.5"], "llm.memory_fraction"),
    (["simulate.sentences=0"], "simulate.sentences: 0 must be > 0"),
    (["simulate.contexts_per_shard=0"], "simulate.contexts_per_shard"),
    (["simulate.mode=one_at_a_time", "simulate.calibration=1"], "simulate.calibration: 1 contexts cannot fit a quantile map"),
    (["simulate.read_positions=250"], "simulate.read_positions"),
    (["data.ctx_len=32", "examples.window_tokens=32"], "data.ctx_len: 32 leaves no position"),
    (["calibrate.sizes=[16, 65]"], "calibrate.sizes: [65] must be in 2..simulate.calibration (64)"),
    (["simulate.mode=one_at_a_time", "calibrate.sizes=[16, 65]"], "calibrate.sizes: [16, 65] must be in 2..simulate.calibration (2)"),
    (["calibrate.true_tokens=-1"], "calibrate.true_tokens"),
    (["calibrate.min_nonzero=0"], "calibrate.min_nonzero: 0 must be >= 1"),
    (["evaluate.fractions=[0.5, 1.5]"], "evaluate.fractions: [0.5, 1.5] must be non-empty and in (0, 1]"),
    (["evaluate.fractions=[]"], "evaluate.fractions"),
    (["evaluate.bootstrap=0"], "evaluate.bootstrap"),
    (["mesh.data=0"], "mesh.data"),
    (["model.layer=6"], "model.layer: 6 is out of range"),
    (["data.ctx_len=512", "examples.window_tokens=32"], "data.ctx_len: 512 is longer than max_position_embeddings"),
]


@pytest.mark.parametrize("overrides, message", RULES, ids=[" ".join(o) for o, _ in RULES])
def test_every_rule_between_keys_is_checked_at_load(overrides, message):
    with pytest.raises(UserError, match="config key ") as e:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(e.value)


def test_a_bad_late_stage_value_fails_run_in_seconds_and_blocks_nothing(tmp_path):
    run_dir = tmp_path / "run"
    for bad in ("simulate.order=bogus", "simulate.sentences=0", "simulate.contexts_per_shard=0"):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "nlrw_jax.cli", "run", "configs/tiny.yaml", f"run_dir={run_dir}",
                              bad], cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert out.returncode == 2 and out.stderr.startswith("nlrw: error: config key simulate."), out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert took < 10, f"{bad}: failed only after {took:.1f} s"
        assert not run_dir.exists()  # nothing claimed, nothing to block the corrected rerun


def test_identity_leaves_out_cadence_paths_and_batching():
    a = load_config("configs/tiny.yaml")
    b = load_config("configs/tiny.yaml", ["sparse.log_every=7", "sparse.checkpoint_every=50", "data.cache_dir=/x",
                                          "eval.batch_size=4", "evaluate.batch_size=8", "llm.batch_size=2",
                                          "capture.batch_size=2", "llm.timeout_s=5", "run_dir=elsewhere"])
    for section in ("model", "data", "eval", "capture", "sparse", "llm", "evaluate"):
        assert identity(getattr(a, section)) == identity(getattr(b, section)), section
    c = load_config("configs/tiny.yaml", ["sparse.k=16"])
    assert identity(a.sparse) != identity(c.sparse)


def test_each_llm_stage_can_have_its_own_llm():
    """`<stage>.llm` keys override the shared `llm` key by key; each stage's identity is its own
    LLM; two stages on one endpoint with different models are refused at load."""
    from nlrw_jax.config import stage_llm
    from nlrw_jax.stages.common import llm_identity

    cfg = load_config("configs/tiny.yaml", ["llm.top_logprobs=7", "explain.llm.model=/big/explainer",
                                            "simulate.llm.backend=openai", "simulate.llm.endpoints=[http://s:1/v1]"])
    ex, sim, sc = (stage_llm(cfg, s) for s in ("explain", "simulate", "score"))
    assert ex.model == "/big/explainer" and ex.top_logprobs == 7 and ex.backend == "local"
    assert sim.backend == "openai" and sim.model == "smollm2" and sim.top_logprobs == 7
    assert sc is cfg.llm
    assert llm_identity(cfg, "explain")["llm"]["model"] == "/big/explainer"
    assert llm_identity(cfg, "simulate") != llm_identity(cfg, "score")
    assert "llm" not in identity(cfg.explain)  # the stage's LLM enters its identity once, via llm_identity
    with pytest.raises(UserError, match=r"config key simulate.llm.endpoints: http://e:1/v1/ is also explain.llm's "
                                        r"endpoint, with model 'E', not 'smollm2': one server serves one model"):
        load_config("configs/tiny.yaml", ["explain.llm.backend=openai", "explain.llm.endpoints=[http://e:1/v1]",
                                          "explain.llm.model=E", "simulate.llm.backend=openai",
                                          "simulate.llm.endpoints=[http://e:1/v1/]"])
    with pytest.raises(UserError, match="config key score.llm.batch_size: 0 must be > 0"):
        load_config("configs/tiny.yaml", ["score.llm.batch_size=0"])
