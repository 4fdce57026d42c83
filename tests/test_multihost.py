"""Multi-host JAX on one machine: two `nlrw` processes with 4 CPU devices each, joined on
127.0.0.1 (gloo collectives), capture their halves of the store and train on a 4 x 2 mesh that
spans both; they are SIGKILLed after a checkpoint and resumed. Everything must equal one
process with 8 devices running the same commands: the store bit for bit, training to float32
rounding (gloo sums across the processes in another order than one process does)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny.yaml"
# A 4 x 2 mesh: 'data' crosses the hosts, 'model' (the latents) stays inside each.
MH = ["capture.windows=32", "capture.chunk_windows=4", "capture.batch_size=8", "sparse.num_latents=256",
      "sparse.k=8", "sparse.batch_tokens=1024", "sparse.steps=60", "sparse.warmup_steps=4",
      "sparse.checkpoint_every=5", "sparse.log_every=5", "sparse.eval_every=30", "sparse.eval_windows=8",
      "eval.batch_size=8", "mesh.data=4", "mesh.model=2"]
TIMEOUT = 600


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLRW_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(stage: str, overrides: list[str]) -> list[subprocess.Popen]:
    port = _free_port()  # a fresh coordinator per launch, like a relaunched job
    return [subprocess.Popen([sys.executable, "-m", "nlrw_jax.cli", stage, CONFIG, *overrides], cwd=REPO,
                             env=_env(4, NLRW_COORDINATOR=f"127.0.0.1:{port}", NLRW_NUM_PROCESSES="2",
                                      NLRW_PROCESS_ID=str(pid)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in range(2)]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def _finish(procs) -> list[str]:
    """Waits for both; if either fails (or they hang), kills both and fails with its stderr."""
    deadline = time.time() + TIMEOUT
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    _kill(procs)
    outs = [p.communicate() for p in procs]
    for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{err[-3000:]}"
    return [out for out, _ in outs]


def _single(stage: str, overrides: list[str]):
    subprocess.run([sys.executable, "-m", "nlrw_jax.cli", stage, CONFIG, *overrides], cwd=REPO, env=_env(8),
                   check=True, capture_output=True, timeout=TIMEOUT)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "sparse" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _single("capture", [f"run_dir={one}", *MH])
    _single("train", [f"run_dir={one}", *MH])

    _finish(_start_pair("capture", [f"run_dir={two}", *MH]))
    store = two / "activations"
    assert (store / "host000").is_dir() and (store / "host001").is_dir()  # one shard per host
    assert len(list((store / "host001" / "done").iterdir())) == 4  # 16 windows / 4 per chunk

    # Train until a checkpoint has landed, kill both hosts, then relaunch both to the end.
    procs = _start_pair("train", [f"run_dir={two}", *MH])
    checkpoint = two / "sparse" / "checkpoints" / "10"
    deadline = time.time() + TIMEOUT
    while not checkpoint.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    _kill(procs)
    assert checkpoint.exists(), "no checkpoint was written before the processes stopped"
    assert not (two / "sparse" / "summary.json").exists(), "training finished before it could be killed"
    outs = _finish(_start_pair("train", [f"run_dir={two}", *MH]))
    assert '"loss_recovered"' in outs[0] and '"loss_recovered"' not in outs[1]  # only process 0 reports

    # A single-host stage: process 0 does it while process 1 waits for it, and both exit 0.
    outs = _finish(_start_pair("eval", [f"run_dir={two}", *MH, "eval.windows=8"]))
    assert (two / "eval" / "eval.json").exists() and "val_ce" in outs[0] and "val_ce" not in outs[1]

    from nlrw_jax.data.store import open_store

    a, b = open_store(one / "activations"), open_store(two / "activations")
    assert b.manifest["process_count"] == 2 and a.num_tokens == b.num_tokens == 32 * 256
    np.testing.assert_array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for point in ("mlp_in", "mlp_out"):
        np.testing.assert_array_equal(a.read(point, 0, a.num_tokens), b.read(point, 0, b.num_tokens))

    steps = [r["step"] for r in _metrics(two)]
    assert steps == list(range(5, 61, 5)), steps  # every logged step once, across the kill
    for r1, r2 in zip(_metrics(one), _metrics(two)):
        assert r1.keys() == r2.keys()
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (r1["step"], k)
    w1, w2 = (load_file(run / "sparse" / "sparsify" / "sae.safetensors") for run in (one, two))
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_two_processes_train_on_the_fly_like_one(tmp_path):
    """sparse.source=on_the_fly: each host runs the model on its own windows of every step."""
    otf = [*MH, "sparse.source=on_the_fly", "sparse.steps=10", "sparse.log_every=5", "sparse.checkpoint_every=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    _single("train", [f"run_dir={one}", *otf])
    _finish(_start_pair("train", [f"run_dir={two}", *otf]))
    assert not (two / "activations").exists()
    for r1, r2 in zip(_metrics(one), _metrics(two), strict=True):
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (r1["step"], k)
