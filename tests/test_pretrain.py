"""`nlrw pretrain`: a real subprocess killed with SIGKILL mid-run resumes to bitwise the same model."""

import json
import sys
from pathlib import Path

import pytest
from procs import kill_when_then_rerun, run

REPO = Path(__file__).resolve().parents[1]
MICRO = [
    "data.train=assets/corpus/val.jsonl.xz", "data.validation=assets/corpus/val.jsonl.xz", "data.ctx_len=64",
    "pretrain.arch.hidden_size=32", "pretrain.arch.num_hidden_layers=2", "pretrain.arch.num_attention_heads=2",
    "pretrain.arch.intermediate_size=64", "pretrain.arch.max_position_embeddings=64",
    "pretrain.steps=12", "pretrain.batch_size=4", "pretrain.warmup_steps=2", "pretrain.checkpoint_every=3",
    "pretrain.eval_every=6", "pretrain.log_every=3", "pretrain.eval_windows=8", "pretrain.export_fractions=[0.5]",
    "pretrain.export_dtype=float32",
]


def pretrain_cmd(tmp_path, name):
    return [sys.executable, "-m", "nlrw_jax.cli", "pretrain", "configs/tiny-lm.yaml", *MICRO,
            f"run_dir={tmp_path / name}", f"pretrain.out_dir={tmp_path / name / 'model'}",
            f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_pretrain_killed_and_resumed_equals_uninterrupted(tmp_path):
    run(pretrain_cmd(tmp_path, "straight"))
    kill_when_then_rerun(pretrain_cmd(tmp_path, "killed"), marker=tmp_path / "killed" / "pretrain" / "checkpoints" / "6",
                         finished=tmp_path / "killed" / "model" / "final")

    for folder in ("step6", "final"):
        a = (tmp_path / "straight" / "model" / folder / "model.safetensors").read_bytes()
        b = (tmp_path / "killed" / "model" / folder / "model.safetensors").read_bytes()
        assert a == b, f"{folder} differs after kill + resume"
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == [3, 6, 9, 12]
    index = json.loads((tmp_path / "killed" / "model" / "checkpoints.json").read_text())
    assert set(index["checkpoints"]) == {"step6", "final"}
    assert index["checkpoints"]["final"]["val_ce"] < index["unigram_val_ce"] + 2.0
