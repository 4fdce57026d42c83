"""Live metrics of long stages: TensorBoard event files in the run folder, beside the JSON lines
(`tensorboard --logdir run_dir`). Process 0 writes them (the stages that use them are its own)."""

from __future__ import annotations

import math
from pathlib import Path

from nlrw_jax.config import Config
from nlrw_jax.stages.common import LazyBackend, run_folder


def tensorboard_writer(folder: Path):
    """A TensorBoard writer in `folder` (e.g. run_dir/sparse/tensorboard), so a long run can be
    watched live (`tensorboard --logdir run_dir`); process 0 only. None without tensorboardX: the
    JSON lines and shards stay the record, so no stage ever needs it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), flush_secs=30)


def live_progress(cfg: Config, stage: str, backend=None, progress: bool = True, every_s: float = 15.0, **bar):
    """A stage's progress bar (tqdm: rate, ETA) that also writes, every `every_s` seconds and at the
    end, done / total, the rate and the ETA, and the LLM backend's retries and endpoints up where it
    counts them (`health()`), to TensorBoard in the stage's folder (run_dir/<stage dir>/tensorboard):
    a day of simulation on a pool is watchable while it runs."""
    import time

    from tqdm import tqdm

    class LiveProgress(tqdm):
        def __init__(self):
            super().__init__(disable=not progress, **bar)
            self._done, self._t0, self._last = int(bar.get("initial", 0)), time.monotonic(), 0.0
            self._tb = tensorboard_writer(run_folder(cfg).dir(stage) / "tensorboard")

        def update(self, n=1):
            super().update(n)
            self._done += n
            if time.monotonic() - self._last >= every_s:
                self._log()

        def _log(self):
            if self._tb is None:
                return
            self._last = now = time.monotonic()
            start = int(bar.get("initial", 0))
            rate = (self._done - start) / max(now - self._t0, 1e-9)
            total = self.total or 0
            scalars = {"done": self._done, "total": total, "fraction_done": self._done / total if total else 0.0,
                       f"{bar.get('unit', 'it')}s_per_s": rate,
                       "eta_s": (total - self._done) / rate if rate > 0 and total else None}
            health = getattr(backend.backend if isinstance(backend, LazyBackend) else backend, "health", None)
            scalars.update({f"llm_{k}": v for k, v in (health() if health else {}).items()})
            for k, v in scalars.items():
                # No point for an unknown value: a NaN would make tensorboardX print a warning
                # into the stage's one-line error output.
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"{stage}/{k}", v, self._done)

        def close(self):
            if getattr(self, "_tb", None) is not None:
                self._log()
                self._tb.close()
                self._tb = None
            super().close()

    return LiveProgress()
