"""The LLM stages' live progress in TensorBoard: done / total, rate, ETA and the backend's retries
and endpoints up, written beside the stage's outputs while it runs."""

import pytest

from nlrw_jax.config import load_config
from nlrw_jax.run_folder import RunFolder
from nlrw_jax.stages.live import live_progress
from test_coder_import import _tfrecords


class Pool:
    """Stands in for a server pool's backend: only its health counters are read."""

    def __init__(self):
        self.retries = 0

    def health(self):
        return {"retries": self.retries, "endpoints_up": 1, "endpoints": 2}


def _scalars(folder):
    from tensorboardX.proto.event_pb2 import Event

    (events,) = folder.glob("events.out.tfevents.*")
    out = {}
    for record in _tfrecords(events):
        event = Event.FromString(record)
        for v in event.summary.value:
            out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_progress_and_health_reach_tensorboard(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}"])
    pool = Pool()
    bar = live_progress(cfg, "simulate", pool, progress=False, every_s=0, total=10, initial=2, unit="prediction")
    bar.update(3)
    pool.retries = 4
    bar.update(5)
    bar.close()
    s = _scalars(RunFolder(tmp_path).dir("simulate") / "tensorboard")
    assert s["simulate/done"] == {5: 5, 10: 10}  # step = predictions done (2 from an earlier run)
    assert s["simulate/total"][10] == 10 and s["simulate/fraction_done"][10] == 1.0
    assert s["simulate/llm_retries"] == {5: 0, 10: 4}
    assert s["simulate/llm_endpoints_up"][10] == 1
    assert s["simulate/predictions_per_s"][10] > 0 and s["simulate/eta_s"][10] == pytest.approx(0)


def test_a_stage_that_fails_before_any_progress_writes_no_unknown_eta(tmp_path, capfd):
    """A stage that stops at its first prompt (server down) closes the bar with nothing done: the
    ETA is unknown and is left out, so stderr keeps only the stage's one error line."""
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}"])
    bar = live_progress(cfg, "score", Pool(), progress=False, every_s=0, total=10, unit="prompt")
    bar.close()
    s = _scalars(RunFolder(tmp_path).dir("score") / "tensorboard")
    assert "score/eta_s" not in s and s["score/done"] == {0: 0}
    assert capfd.readouterr().err == ""
