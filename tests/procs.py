"""Runs a CLI command as a real subprocess, SIGKILLs it once `marker` appears (or at random
points of random stages), and reruns it."""

import os
import random
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


def kill_at_random_points_then_finish(cmd, stages: dict[str, Path], kills: int, seed: int, env=ONE_DEVICE,
                                      max_delay_s: float = 3.0) -> list[str]:
    """Picks `kills` random stages in pipeline order (`stages`: name -> a path that exists once the
    stage has started); for each, starts `cmd`, waits for that stage to start, SIGKILLs it a random
    0..max_delay_s later, then reruns `cmd` to completion. Returns where each kill landed: the last
    stage that had started, or "finished" if the run ended first."""
    rng = random.Random(seed)
    names = list(stages)
    chosen = sorted(rng.sample(range(len(names)), kills))
    landed = []
    for i in chosen:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while not stages[names[i]].exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        end = time.time() + rng.uniform(0, max_delay_s)
        while proc.poll() is None and time.time() < end:
            time.sleep(0.02)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not finished or proc.returncode == 0, f"{cmd} failed with {proc.returncode}"
        landed.append("finished" if finished else [n for n in names if stages[n].exists()][-1])
    run(cmd, env)
    return landed
