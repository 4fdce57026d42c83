"""Held-out cross-entropy of a GPT-NeoX model, and the unigram baseline it should beat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.models.gpt_neox import GPTNeoX, token_cross_entropy


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
