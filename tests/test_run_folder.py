"""The run folder owns identity and locking: a stage's folder is claimed once for what it is made
from (the model by content, its inputs, the config keys that change results), a second process on
the same folder is refused (exit 75, naming the holder), a changed model is refused downstream,
and a copied project (or a touched corpus) still resumes."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ONE_DEVICE
from tiny_run import SMALL, make_run_with_examples, nlrw

from nlrw_jax.errors import ServiceUnavailable, UserError
from nlrw_jax.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the mechanism


def test_claim_records_then_checks_identity(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.claim("explain", {"coder": "a", "explain": {"latents": 4}}):
        (run.dir("explain") / "explanations.jsonl").write_text("")
    with run.claim("explain", {"coder": "a", "explain": {"latents": 4}}):  # the same: resumes
        pass
    with pytest.raises(UserError, match=r"explain outputs were made from something else \(differs: coder, explain\)"):
        with run.claim("explain", {"coder": "b", "explain": {"latents": 8}}):
            pass


def test_outputs_without_identity_are_refused(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.dir("score").mkdir(parents=True)
    (run.dir("score") / "scores.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="holds scores.jsonl but no identity.json"):
        with run.claim("score", {"x": 1}):
            pass


def test_a_second_claim_is_refused_with_the_holder(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.claim("simulate", {"x": 1}):
        with pytest.raises(ServiceUnavailable, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            with run.claim("simulate", {"x": 1}):
                pass
    with run.claim("simulate", {"x": 1}):  # released when the first left
        pass


def test_parts_share_the_folder_but_not_each_other(tmp_path):
    """`simulate --shard i` workers: parallel on one folder by design; a whole-folder claim waits for them."""
    run = RunFolder(tmp_path / "run")
    with run.claim("simulate", {"x": 1}, part="shard-0-of-2"), run.claim("simulate", {"x": 1}, part="shard-1-of-2"):
        with pytest.raises(ServiceUnavailable, match="in use"):
            with run.claim("simulate", {"x": 1}, part="shard-1-of-2"):
                pass
        with pytest.raises(ServiceUnavailable, match="in use"):
            with run.claim("simulate", {"x": 1}):
                pass


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_with_examples(tmp_path_factory)


def test_a_second_process_on_a_stage_folder_is_refused(run):
    """A real `nlrw examples` while this process holds the examples folder: exit 75, one line naming us."""
    cfg, overrides = run
    with RunFolder(cfg.run_dir).lock("examples"):
        r = nlrw("examples", "configs/tiny.yaml", *overrides, check=False)
    assert r.returncode == 75, r.stderr
    assert r.stderr.count("\n") == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in r.stderr
    assert nlrw("examples", "configs/tiny.yaml", *overrides).returncode == 0  # free again: finished, skips


def test_a_changed_model_is_refused_downstream(run, tmp_path):
    """Other weights under the same config (a new checkpoint path, or weights swapped in place)."""
    cfg, overrides = run
    model = tmp_path / "model"
    shutil.copytree(REPO / "assets" / "tiny-pythia" / "final", model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight, mid-file
    weights.write_bytes(bytes(data))
    summary = (Path(cfg.run_dir) / "sparse" / "summary.json").read_bytes()
    for stage in ("capture", "train", "examples"):
        r = nlrw(stage, "configs/tiny.yaml", *overrides, f"model.checkpoint={model}", check=False)
        assert r.returncode == 2 and "differs: model" in r.stderr and r.stderr.count("\n") == 1, (stage, r.stderr)
    assert (Path(cfg.run_dir) / "sparse" / "summary.json").read_bytes() == summary  # not rewritten


def test_a_copied_project_with_a_touched_corpus_still_resumes(run, tmp_path):
    """Everything copied elsewhere (model, corpus, run folder, token cache), the corpus touched:
    every finished stage is recognised as the same work, not refused and not redone."""
    cfg, overrides = run
    project = tmp_path / "copy"
    shutil.copytree(REPO / "assets" / "tiny-pythia", project / "tiny-pythia")
    shutil.copytree(REPO / "assets" / "corpus", project / "corpus")
    shutil.copytree(cfg.run_dir, project / "run")
    for f in (project / "corpus").iterdir():
        os.utime(f)
    args = [*SMALL, f"run_dir={project / 'run'}", f"model.checkpoint={project / 'tiny-pythia' / 'final'}",
            f"data.train={project / 'corpus' / 'train.jsonl.xz'}", f"data.validation={project / 'corpus' / 'val.jsonl.xz'}",
            f"data.tokenizer={project / 'corpus' / 'tokenizer.json'}", f"data.cache_dir={project / 'cache'}"]
    examples = (project / "run" / "examples" / "examples.npz").read_bytes()
    for stage in ("capture", "train", "examples"):
        r = subprocess.run([sys.executable, "-m", "nlrw_jax.cli", stage, "configs/tiny.yaml", *args], cwd=REPO,
                           env=ONE_DEVICE, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (stage, r.stderr[-2000:])
        assert "capture host000" not in r.stderr and "train transcoder" not in r.stderr  # nothing redone
    assert (project / "run" / "examples" / "examples.npz").read_bytes() == examples
