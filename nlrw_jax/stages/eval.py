"""`nlrw eval`: held-out next-token CE of the subject model and of the partially trained
checkpoints on its training curve (`model.curve`, or checkpoints.json next to a local folder),
against the unigram baseline: eval/eval.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.io import read_json_object, write_json
from nlrw_jax.stages.common import data_identity, model_folder, model_identity, run_folder, token_caches, \
    training_curve


def run(cfg: Config, progress: bool = True) -> dict:
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.models import hf
    from nlrw_jax.models.cross_entropy import mean_cross_entropy, unigram_cross_entropy
    from nlrw_jax.models.gpt_neox import DTYPES, GPTNeoX

    dtype = DTYPES[cfg.model.dtype]
    folder = model_folder(cfg)
    config = hf.read_config(folder)
    if cfg.data.ctx_len > config.max_position_embeddings:  # a hub model is known only now
        raise UserError(f"config key data.ctx_len: {cfg.data.ctx_len} is longer than max_position_embeddings "
                        f"{config.max_position_embeddings} of {folder}")
    caches = token_caches(cfg)
    train_cache, val_cache = caches
    run = run_folder(cfg)
    with run.claim("eval", {**model_identity(cfg), **data_identity(cfg, caches), "eval": identity(cfg.eval)}):
        if run.eval_json.exists():
            return read_json_object(run.eval_json, "delete it and rerun `nlrw eval`")
        available = len(np.load(val_cache, mmap_mode="r")) // cfg.data.ctx_len
        windows = token_data.validation_windows(val_cache, cfg.data.ctx_len, min(cfg.eval.windows, available))

        def ce_of(path) -> float:
            config, params = hf.load(path, dtype=dtype)
            return mean_cross_entropy(GPTNeoX(config, dtype=dtype), params, windows, cfg.eval.batch_size, progress,
                                      desc=f"eval {Path(path).name}")

        result = {"model": str(cfg.model.checkpoint), "dtype": cfg.model.dtype, "windows": len(windows),
                  "ctx_len": cfg.data.ctx_len, "val_ce": ce_of(folder),
                  "unigram_val_ce": unigram_cross_entropy(np.load(train_cache, mmap_mode="r"), windows,
                                                          config.vocab_size)}
        curve = training_curve(cfg)  # the partially trained checkpoints the rewritten model is compared against
        if curve:
            result["checkpoints"] = {c["name"]: {"fraction": c["fraction"], "tokens": c["tokens"],
                                                 "val_ce": ce_of(c["folder"])} for c in curve}
        write_json(run.eval_json, result)
    return result
