"""A small but real run folder for the interpretation stages: the tiny Pythia, 16 captured
windows, and a transcoder trained for a few steps by the real CLI stages (~30 s)."""

import subprocess
import sys
from pathlib import Path

from procs import ONE_DEVICE

REPO = Path(__file__).resolve().parents[1]

SMALL = ["capture.windows=16", "capture.chunk_windows=4", "capture.batch_size=4", "sparse.num_latents=256",
         "sparse.k=8", "sparse.batch_tokens=512", "sparse.steps=24", "sparse.warmup_steps=4",
         "sparse.checkpoint_every=100", "sparse.eval_every=100", "sparse.eval_windows=4", "eval.windows=4",
         "examples.per_decile=3", "examples.non_activating=6", "explain.latents=4", "explain.latents_per_batch=2",
         "explain.examples_per_decile=1", "explain.max_tokens=12", "score.activating_per_decile=1",
         "score.non_activating=3", "score.latents_per_batch=2", "llm.batch_size=16"]


def nlrw(*args, env=ONE_DEVICE, check=True):
    return subprocess.run([sys.executable, "-m", "nlrw_jax.cli", *args], cwd=REPO, env=env, check=check,
                          capture_output=True, text=True, timeout=900)


def make_run(run_dir: Path) -> list[str]:
    """Captures and trains into run_dir; returns the overrides that address it."""
    overrides = [f"run_dir={run_dir}", *SMALL]
    nlrw("capture", "configs/tiny.yaml", *overrides)
    nlrw("train", "configs/tiny.yaml", *overrides)
    return overrides


def make_run_with_examples(tmp_path_factory):
    """(config, overrides) of a fresh run folder with its examples swept."""
    from nlrw_jax.config import load_config
    from nlrw_jax.stages import examples

    overrides = make_run(tmp_path_factory.mktemp("run") / "tiny")
    cfg = load_config("configs/tiny.yaml", overrides)
    examples.run(cfg, progress=False)
    return cfg, overrides
