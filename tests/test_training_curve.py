"""The training curve behind the equivalent training fraction: hub revisions listed in
`model.curve`, fetched through the real hub code path (huggingface_hub, offline here, from a
cache laid out as the hub writes it), give the same CEs as the local checkpoints.json folders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.rewrite.metrics import checkpoint_curve
from nlrw_jax.stages.common import training_curve

TINY = Path("assets/tiny-pythia")


def hub_cache(root: Path, repo: str, revisions: dict[str, Path]) -> Path:
    """A Hugging Face hub cache holding `repo` at each revision (a folder's files), as
    snapshot_download leaves it: refs/<revision> -> commit, snapshots/<commit>/<files>."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for i, (rev, src) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / rev).write_text(commit)
        shutil.copytree(src, folder / "snapshots" / commit)
    return root


def offline_hub(monkeypatch, cache: Path) -> None:
    """huggingface_hub offline, on `cache`: the environment for a fresh import, and its constants
    for an already imported one (it reads them at import time)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_revisions_give_the_local_checkpoints_curve(tmp_path, monkeypatch):
    index = json.loads((TINY / "checkpoints.json").read_text())["checkpoints"]
    revisions = {name: TINY / name for name in index}
    cache = hub_cache(tmp_path / "hub", "EleutherAI/tiny-pythia", revisions)
    offline_hub(monkeypatch, cache)
    points = sorted(index.items(), key=lambda kv: kv[1]["tokens"])
    curve = "[" + ",".join(f"{{revision: {n}, tokens: {e['tokens']}}}" for n, e in points) + "]"
    hub_cfg = load_config("configs/tiny.yaml", ["model.checkpoint=EleutherAI/tiny-pythia", "model.revision=final",
                                                f"model.curve={curve}"])
    local_cfg = load_config("configs/tiny.yaml")
    hub, local = training_curve(hub_cfg), training_curve(local_cfg)
    assert [c["name"] for c in hub] == [c["name"] for c in local] == [n for n, _ in points if n != "final"]
    assert all(str(c["folder"]).startswith(str(cache)) for c in hub)  # fetched through snapshot_download
    np.testing.assert_allclose([c["fraction"] for c in hub], [c["fraction"] for c in local])
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 8192, (3, 64)).astype(np.int32)
    window, positions = np.array([0, 0, 1, 2]), np.array([5, 40, 62, 31])
    got = [checkpoint_curve(c, "final", "float32", windows, window, positions, 4.0, 2) for c in (hub, local)]
    assert got[0] == got[1] and [c["fraction"] for c in got[0]][-1] == 1.0 and len(got[0]) == len(points)


def test_a_curve_that_is_not_increasing_is_refused():
    with pytest.raises(UserError, match=r"config key model.curve: the checkpoints' tokens \[2000.0, 1000.0\] must be "
                                        r"positive and strictly increasing"):
        load_config("configs/tiny.yaml", ["model.curve=[{revision: a, tokens: 2000}, {revision: b, tokens: 1000}]"])


def test_a_missing_revision_is_one_line(tmp_path, monkeypatch):
    offline_hub(monkeypatch, hub_cache(tmp_path / "hub", "EleutherAI/tiny-pythia", {"final": TINY / "final"}))
    cfg = load_config("configs/tiny.yaml", ["model.checkpoint=EleutherAI/tiny-pythia", "model.revision=final",
                                            "model.curve=[{revision: step1, tokens: 10}, {revision: final, tokens: 20}]"])
    with pytest.raises(UserError, match=r"EleutherAI/tiny-pythia.*revision step1") as e:
        training_curve(cfg)
    assert "\n" not in str(e.value)
