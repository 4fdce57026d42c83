"""Runs a CLI command as a real subprocess, SIGKILLs it once `marker` appears, and reruns it."""

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_DEVICE = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # small batches need no split


def run(cmd, env=ONE_DEVICE):
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)


def kill_when_then_rerun(cmd, marker: Path, finished: Path, env=ONE_DEVICE):
    """SIGKILL `cmd` as soon as `marker` exists (checked every 50 ms), check it had not reached
    `finished`, then rerun it to completion."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished.exists(), f"the run reached {finished} before it could be killed"
    run(cmd, env)
