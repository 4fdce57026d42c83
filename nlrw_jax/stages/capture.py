"""`nlrw capture`: `capture.windows` windows of the seeded training order through the subject model
to `model.layer`, its activations (the transcoder's mlp_in/mlp_out, or the SAE's resid_post) into
the activation store (with sparse.from too: nothing is trained, but the evaluation's mean-ablation
baseline and the coder's FVU read the MLP output). Every host of a
multi-host run writes its own share (its own part of the folder)."""

from __future__ import annotations

import jax

from nlrw_jax import distributed
from nlrw_jax.config import Config, identity
from nlrw_jax.stages.common import data_identity, model_folder, model_identity, run_folder, token_caches


def run(cfg: Config, progress: bool = True) -> str:
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.capture import capture
    from nlrw_jax.sparse.coder import points_for

    points = sorted(set(points_for(cfg.sparse.kind)))
    if cfg.sparse.from_ is not None:
        from nlrw_jax.stages.common import imported_coder

        imported_coder(cfg)  # a coder that does not fit the model is refused before the capture
    caches = token_caches(cfg)
    # One global batch of `capture.windows` windows: the same selection on every host.
    windows = token_data.window_dataset(caches[0], cfg.data.ctx_len, seed=cfg.data.seed,
                                        batch_size=cfg.capture.windows)[0]
    source = {"token_cache": token_data.cache_identity(caches[0]), "seed": cfg.data.seed,
              "windows": cfg.capture.windows}
    run = run_folder(cfg)
    ident = {**model_identity(cfg), **data_identity(cfg, caches), "capture": identity(cfg.capture),
             "points": list(points_for(cfg.sparse.kind))}
    with run.claim("capture", ident, part=f"host{jax.process_index():03d}"):
        if _complete(run.activations):
            distributed.barrier("capture")
            return str(run.activations)
        path = capture(str(model_folder(cfg)), windows, run.activations, layer=cfg.model.layer,
                       points=points, dtype=cfg.capture.dtype,
                       batch_size=cfg.capture.batch_size, chunk_windows=cfg.capture.chunk_windows, source=source,
                       model_dtype=cfg.model.dtype, process_index=jax.process_index(),
                       process_count=jax.process_count(), progress=progress)
    distributed.barrier("capture")  # the store is complete only when every host has written its share
    return path


def _complete(path) -> bool:
    """A finished store (every host's chunks marked done): nothing to load or run."""
    from nlrw_jax.data.store import open_store
    from nlrw_jax.errors import UserError

    if not (path / "manifest.json").exists():
        return False
    try:
        open_store(path)
    except UserError:
        return False  # unfinished (or damaged: capture itself then says what is wrong)
    return True
