"""Held-out cross-entropy of a GPT-NeoX model, and the unigram baseline it should beat."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.config import config_hash
from nlrw_jax.data import tokens as token_data
from nlrw_jax.data.tokenizer import load_tokenizer
from nlrw_jax.errors import UserError
from nlrw_jax.io import write_json
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import DTYPES, GPTNeoX, token_cross_entropy


def make_ce_fn(model: GPTNeoX):
    """jitted (params, windows [b, s], weights [b]) -> (sum of next-token CE, token count)."""

    @jax.jit
    def ce_sums(params, windows, weights):
        logits, _ = model.apply({"params": params}, windows)
        ce = token_cross_entropy(logits, windows)  # [b, s-1]
        return (ce.sum(-1) * weights).sum(), weights.sum() * ce.shape[1]

    return ce_sums


def mean_cross_entropy(model: GPTNeoX, params, windows: np.ndarray, batch_size: int = 16,
                       progress: bool = True, desc: str = "eval") -> float:
    """Mean next-token CE (nats) over all windows; the last batch is padded, so one compile serves all."""
    ce_sums = make_ce_fn(model)
    total, count = 0.0, 0.0
    n = len(windows)
    bar = tqdm(total=n * (windows.shape[1] - 1), desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for start in range(0, n, batch_size):
        chunk = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[: len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        s, c = ce_sums(params, jnp.asarray(chunk), jnp.asarray(weights))
        total, count = total + float(s), count + float(c)
        bar.update(int(weights.sum()) * (windows.shape[1] - 1))
    bar.close()
    return total / count


def unigram_cross_entropy(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int) -> float:
    """CE of predicting each held-out token (positions 1.. of each window) by train-set unigram
    frequencies with add-one smoothing: the floor any language model must clear."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:]].mean())



def evaluate_subject(cfg, progress: bool = True) -> dict:
    """`nlrw eval`: held-out CE of the subject model (and of the partially trained checkpoints
    listed next to it in checkpoints.json) against the unigram baseline; writes run_dir/eval.json."""
    if cfg.model.dtype not in DTYPES:
        raise UserError(f"config key model.dtype: {cfg.model.dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[cfg.model.dtype]
    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    config = hf.read_config(folder)
    if cfg.data.ctx_len > config.max_position_embeddings:
        raise UserError(f"config key data.ctx_len: {cfg.data.ctx_len} is longer than max_position_embeddings "
                        f"{config.max_position_embeddings} of {folder}")
    tokenizer = load_tokenizer(token_data.subject_tokenizer_path(folder, cfg.data.tokenizer))
    train_cache, val_cache = token_data.token_caches(cfg.data, tokenizer)
    available = len(np.load(val_cache, mmap_mode="r")) // cfg.data.ctx_len
    windows = token_data.validation_windows(val_cache, cfg.data.ctx_len, min(cfg.eval.windows, available))

    def ce_of(path) -> float:
        config, params = hf.load(path, dtype=dtype)
        return mean_cross_entropy(GPTNeoX(config, dtype=dtype), params, windows, cfg.eval.batch_size, progress,
                                  desc=f"eval {Path(path).name}")

    result = {"model": str(cfg.model.checkpoint), "dtype": cfg.model.dtype, "windows": len(windows),
              "ctx_len": cfg.data.ctx_len, "val_ce": ce_of(folder),
              "unigram_val_ce": unigram_cross_entropy(np.load(train_cache, mmap_mode="r"), windows, config.vocab_size),
              "config_hash": config_hash(cfg.eval)}
    index = folder.parent / "checkpoints.json"
    if index.exists():  # the partially trained checkpoints the rewritten model is compared against
        entries = json.loads(index.read_text())["checkpoints"]
        result["checkpoints"] = {name: {**entry, "val_ce": ce_of(folder.parent / name)}
                                 for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["step"])
                                 if name != folder.name and (folder.parent / name).is_dir()}
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.run_dir) / "eval.json", result)
    return result
