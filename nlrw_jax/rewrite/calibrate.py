"""Calibration of simulated values: raw predictions, the true activations' quantiles, and the maps.

F_true^-1 comes from the coder's activations over the activation store's tokens (zeros
included); F_pred from the raw predictions on the calibration contexts (never the evaluation
ones). The maps themselves: quantile.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.rewrite import quantile as Q
from nlrw_jax.rewrite import simulate as S


def raw_values(preds: dict, max_act: np.ndarray, readout: str) -> np.ndarray:
    """[N, L] raw simulated activations (0 for a latent without an explanation); `max_act` per latent of all."""
    e = S.expected_digit(preds["logprobs"], readout)
    return np.where(preds["explained"], S.raw_activation(e, max_act[preds["latents"]]), 0.0).astype(np.float32)


def true_nonzero(params, meta: dict, rows, latents: np.ndarray, limit: int = 0,
                 progress: bool = True) -> tuple[list[np.ndarray], int]:
    """Each latent's non-zero activations over the first `limit` tokens of `rows` (0: all; one
    streaming pass), and the token count."""
    from nlrw_jax.interpret.examples import encoder

    limit = limit or rows.num_tokens
    slot = np.full(params["W_enc"].shape[0], -1, np.int64)
    slot[latents] = np.arange(len(latents))
    found_slot, found_val, seen = [], [], 0
    chunks = [(a, min(b, limit)) for a, b in rows.chunks if a < limit]
    for a, b in tqdm(chunks, desc="calibrate (true activations)", unit="chunk", disable=not progress):
        acts, idx = encoder(meta["k"], meta["kind"])(params, rows.inputs(a, b))
        acts, idx = np.asarray(acts, np.float32).ravel(), slot[np.asarray(idx).ravel()]
        hit = (idx >= 0) & (acts > 0)
        found_slot.append(idx[hit])
        found_val.append(acts[hit])
        seen += b - a
    found_slot, found_val = np.concatenate(found_slot), np.concatenate(found_val)
    order = np.argsort(found_slot, kind="stable")
    bounds = np.searchsorted(found_slot[order], np.arange(len(latents) + 1))
    return [found_val[order][bounds[j]:bounds[j + 1]] for j in range(len(latents))], seen


def normalised_values(path: Path, raw: np.ndarray, latents: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """raw [N, L] through the quantile map at `path` (jitted interpolation); latents without an explanation stay 0."""
    m = Q.load_quantile_map(path)
    if not np.array_equal(m["latents"], latents):
        raise UserError(f"{path}: a quantile map for other latents than the predictions'; rerun `nlrw calibrate`")
    mapped = np.asarray(Q.apply_quantile_map(m["pred_knots"], m["true_knots"], raw))
    return np.where(explained, mapped, 0.0).astype(np.float32)
