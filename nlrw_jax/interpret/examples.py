"""Per-latent examples: a two-pass streaming sweep, bounded memory.

An example is a `window_tokens`-token window (the store's context windows cut into equal
pieces); its strength for a latent is the latent's max activation over the window's tokens.

Pass 1 keeps, per latent: firing token count, firing window count, max activation and a
log-spaced histogram of non-zero window strengths (fixed 3.6% bins), from which the 10
deciles of the non-zero strengths are read. Pass 2 keeps, per latent and decile, the
`per_decile` windows with the smallest pseudo-random key hash(seed, latent, window), and the
`non_activating` windows (strength 0) with the smallest keys. A "smallest keys" sample does
not depend on the order or grouping of chunks, so a resumed sweep gives exactly the same
examples. State is latents x (10 x per_decile + non_activating) numbers, whatever the number
of tokens; it is saved atomically every few chunks for resumption.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError
from nlrw_jax.io import save_npz
from nlrw_jax.sparse import coder as sc

DECILES = 10
# Histogram of window strengths: log-spaced over [1e-4, 1e4), 512 bins (ratio 1.036 per bin).
HIST_LO, HIST_HI, HIST_BINS = -4.0, 4.0, 512
NO_WINDOW = -1
NO_KEY = np.int32(2**31 - 1)  # above every 31-bit key: "no candidate"
_SAVE_EVERY_S = float(os.environ.get("NLRW_EXAMPLES_SAVE_EVERY_S", 20))  # tests set 0: save every chunk


# ---------------------------------------------------------------------------- the coder


@functools.lru_cache(maxsize=8)
def encoder(k: int, kind: str):
    """jit(params, x [T, d]) -> (top_acts [T, k], top_indices [T, k])."""
    return jax.jit(lambda p, x: sc.encode(p, x, k, kind=kind)[:2])


def latent_acts(params, meta, x: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Activations [T, len(latents)] of the chosen latents (0 where not in the token's top k)."""
    acts, idx = encoder(meta["k"], meta["kind"])(params, jnp.asarray(x))
    acts, idx = np.asarray(acts), np.asarray(idx)
    hit = idx[:, :, None] == np.asarray(latents)[None, None, :]
    return np.where(hit, acts[:, :, None], 0.0).max(axis=1).astype(np.float32)


# ---------------------------------------------------------------------------- the token rows


class StoreRows:
    """Token rows of the activation store: ids and the coder's input point."""

    def __init__(self, store, point: str, identity: str):
        self.store, self.point, self.identity = store, point, identity  # identity: what the rows are, by content
        self.num_tokens, self.ctx_len, self.chunks = store.num_tokens, store.ctx_len, store.chunks

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.store.tokens(start, stop)

    def inputs(self, start: int, stop: int) -> np.ndarray:
        return self.store.read(self.point, start, stop)

    def read(self, point: str, start: int, stop: int) -> np.ndarray:
        """Any captured point of these rows (e.g. the transcoder's target, mlp_out)."""
        return self.store.read(point, start, stop)

    def window_tokens(self, window_ids: np.ndarray, width: int) -> np.ndarray:
        return np.stack([self.tokens(int(w) * width, int(w) * width + width) for w in window_ids]) \
            if len(window_ids) else np.zeros((0, width), np.int32)

    def window_inputs(self, window_ids: np.ndarray, width: int) -> np.ndarray:
        return np.concatenate([self.inputs(int(w) * width, int(w) * width + width) for w in window_ids])


class ForwardRows(StoreRows):
    """The same rows computed on the fly (sparse.source=on_the_fly): `windows` [n, ctx] run
    through the model to `layer`, no disk; chunks of `chunk_windows` windows like a store's."""

    def __init__(self, config, params, windows: np.ndarray, layer: int, point: str, model_dtype: str,
                 chunk_windows: int, identity: str):
        self.params, self.windows = params, np.asarray(windows, np.int32)
        self.point, self.ctx_len = point, self.windows.shape[1]
        self.num_tokens = self.windows.size
        step = chunk_windows * self.ctx_len
        self.chunks = [(s, min(s + step, self.num_tokens)) for s in range(0, self.num_tokens, step)]
        self.identity = identity
        self._fwd, self._model = {}, (config, layer, model_dtype)  # one jitted forward per point read

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.windows.reshape(-1)[start:stop]

    def inputs(self, start: int, stop: int) -> np.ndarray:
        return self.read(self.point, start, stop)

    def read(self, point: str, start: int, stop: int) -> np.ndarray:
        from nlrw_jax.data.capture import forward_fn

        if point not in self._fwd:
            config, layer, dtype = self._model
            self._fwd[point] = forward_fn(config, layer, (point,), dtype)
        first, last = start // self.ctx_len, -(-stop // self.ctx_len)  # the context windows covering the rows
        x = np.asarray(self._fwd[point](self.params, jnp.asarray(self.windows[first:last]))[point], np.float32)
        return x[start - first * self.ctx_len:stop - first * self.ctx_len]


# ---------------------------------------------------------------------------- the two passes


def _hash32(*parts):
    """A cheap, well-mixed uint32 hash of uint32 arrays (murmur3's finaliser, chained)."""
    h = jnp.uint32(0x9E3779B9)
    for p in parts:
        h = h ^ p.astype(jnp.uint32)
        h = h ^ (h >> 16)
        h = h * jnp.uint32(0x85EBCA6B)
        h = h ^ (h >> 13)
        h = h * jnp.uint32(0xC2B2AE35)
        h = h ^ (h >> 16)
    return h


def _window_strengths(acts, idx, num_windows: int, width: int, n: int):
    """[num_windows, n] max activation of each latent in each window (0 where it never fires)."""
    win = jnp.arange(acts.shape[0]) // width
    dense = jnp.zeros((num_windows, n), jnp.float32)
    return dense.at[win[:, None], idx].max(jnp.maximum(acts, 0.0))


@functools.partial(jax.jit, static_argnames=("k", "kind", "width"))
def _pass1(params, x, stats, *, k, kind, width):
    acts, idx = sc.encode(params, x, k, kind=kind)[:2]
    n = params["W_enc"].shape[0]
    dense = _window_strengths(acts, idx, x.shape[0] // width, width, n)
    fired = dense > 0
    bins = jnp.clip(((jnp.log10(jnp.maximum(dense, 1e-30)) - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS)
                    .astype(jnp.int32), 0, HIST_BINS - 1)
    lat = jnp.broadcast_to(jnp.arange(n), dense.shape)
    return dict(
        token_count=stats["token_count"].at[idx].add((acts > 0).astype(jnp.int32)),
        window_count=stats["window_count"] + fired.sum(0, dtype=jnp.int32),
        max_act=jnp.maximum(stats["max_act"], dense.max(0)),
        hist=stats["hist"].at[lat, bins].add(fired.astype(jnp.int32)),
    )


def _smallest(keys, ids, vals, m: int):
    """Per row of [.., c] arrays, the m entries with the smallest keys (sorted by key)."""
    neg, pos = jax.lax.top_k(-keys, m)
    return -neg, jnp.take_along_axis(ids, pos, -1), jnp.take_along_axis(vals, pos, -1)


@functools.partial(jax.jit, static_argnames=("k", "kind", "width", "m_act", "m_neg"))
def _pass2(params, x, first_window, edges, state, seed, *, k, kind, width, m_act, m_neg):
    acts, idx = sc.encode(params, x, k, kind=kind)[:2]
    n = params["W_enc"].shape[0]
    num_windows = x.shape[0] // width
    dense = _window_strengths(acts, idx, num_windows, width, n).T  # [n, W]
    windows = first_window + jnp.arange(num_windows, dtype=jnp.int32)
    key = (_hash32(jnp.uint32(seed), jnp.arange(n, dtype=jnp.uint32)[:, None],
                   windows[None, :].astype(jnp.uint32)) >> 1).astype(jnp.int32)  # 31-bit keys
    decile = (dense[:, :, None] > edges[:, None, :]).sum(-1)  # [n, W] in 0..9
    ids = jnp.broadcast_to(windows, dense.shape)
    new = {}
    for d in range(DECILES):
        cand = jnp.where((dense > 0) & (decile == d), key, NO_KEY)
        new[d] = _smallest(cand, ids, dense, min(m_act, num_windows))
    neg = _smallest(jnp.where(dense == 0, key, NO_KEY), ids, dense, min(m_neg, num_windows))

    def merge(old_k, old_i, old_v, nk, ni, nv, m):
        return _smallest(jnp.concatenate([old_k, nk], -1), jnp.concatenate([old_i, ni], -1),
                         jnp.concatenate([old_v, nv], -1), m)

    act_k, act_i, act_v = zip(*[merge(state["act_key"][:, d], state["act_window"][:, d], state["act_value"][:, d],
                                      *new[d], m_act) for d in range(DECILES)])
    neg_k, neg_i, _ = merge(state["neg_key"], state["neg_window"], jnp.zeros_like(state["neg_key"], jnp.float32),
                            *neg, m_neg)
    return dict(act_key=jnp.stack(act_k, 1), act_window=jnp.stack(act_i, 1), act_value=jnp.stack(act_v, 1),
                neg_key=neg_k, neg_window=neg_i)


def decile_edges(hist: np.ndarray) -> np.ndarray:
    """[n, 9] strengths at 10%..90% of each latent's non-zero window strengths (log-interpolated)."""
    log_edges = np.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)
    cum = np.cumsum(hist, axis=1).astype(np.float64)
    total = np.maximum(cum[:, -1:], 1)
    out = np.zeros((hist.shape[0], DECILES - 1), np.float32)
    for q in range(1, DECILES):
        target = total[:, 0] * q / DECILES
        b = (cum < target[:, None]).sum(1).clip(0, HIST_BINS - 1)  # first bin reaching the target
        before = np.where(b > 0, cum[np.arange(len(b)), b - 1], 0.0)
        inside = np.maximum(hist[np.arange(len(b)), b], 1)
        frac = np.clip((target - before) / inside, 0, 1)
        out[:, q - 1] = 10 ** (log_edges[b] + frac * (log_edges[b + 1] - log_edges[b]))
    return out


# ---------------------------------------------------------------------------- the stage


def _fresh_state(n: int, m_act: int, m_neg: int) -> dict:
    return dict(act_key=np.full((n, DECILES, m_act), NO_KEY, np.int32),
                act_window=np.full((n, DECILES, m_act), NO_WINDOW, np.int32),
                act_value=np.zeros((n, DECILES, m_act), np.float32),
                neg_key=np.full((n, m_neg), NO_KEY, np.int32), neg_window=np.full((n, m_neg), NO_WINDOW, np.int32))


def sweep(params, meta: dict, rows: StoreRows, *, width: int, per_decile: int, non_activating: int, seed: int,
          coder_hash: str, partial: Path, progress: bool = True) -> dict:
    """The two passes over `rows`; the state is saved to `partial` every few seconds (atomically),
    and a sweep killed at any point resumes from it to the same result. Returns the arrays of
    examples.npz (EXAMPLE_ARRAYS)."""
    if width <= 0 or rows.ctx_len % width:
        raise UserError(f"config key examples.window_tokens: {width} must divide the context length {rows.ctx_len}")
    n = meta["num_latents"]
    saved = _read_partial(partial)
    if saved and (saved["coder"].item() != coder_hash):
        saved = {}
    m_neg = max(non_activating, 1)
    stats = {k_: saved[k_] for k_ in ("token_count", "window_count", "max_act", "hist")} if saved else dict(
        token_count=np.zeros(n, np.int32), window_count=np.zeros(n, np.int32), max_act=np.zeros(n, np.float32),
        hist=np.zeros((n, HIST_BINS), np.int32))
    state = {k_: saved[k_] for k_ in _fresh_state(1, 1, 1)} if saved and int(saved["pass"]) == 2 else \
        _fresh_state(n, per_decile, m_neg)
    pass_no, next_chunk = (int(saved["pass"]), int(saved["next_chunk"])) if saved else (1, 0)

    chunks = rows.chunks
    bar = tqdm(total=2 * len(chunks), initial=(pass_no - 1) * len(chunks) + next_chunk, desc="examples",
               unit="chunk", disable=not progress or jax.process_index() != 0)
    last_save = time.monotonic()
    edges = None
    for p in (1, 2):
        if p < pass_no:
            continue
        if p == 2:
            edges = jnp.asarray(decile_edges(np.asarray(stats["hist"])))
        for c in range(next_chunk if p == pass_no else 0, len(chunks)):
            start, stop = chunks[c]
            if start % width or (stop - start) % width:
                raise UserError(f"store chunk [{start}, {stop}) is not a whole number of {width}-token windows")
            x = jnp.asarray(rows.inputs(start, stop))
            if p == 1:
                stats = _pass1(params, x, stats, k=meta["k"], kind=meta["kind"], width=width)
            else:
                state = _pass2(params, x, jnp.int32(start // width), edges, state, seed, k=meta["k"],
                               kind=meta["kind"], width=width, m_act=per_decile, m_neg=m_neg)
            bar.update(1)
            if time.monotonic() - last_save > _SAVE_EVERY_S and c + 1 < len(chunks):
                save_npz(partial, _host_dict(stats, state, coder=coder_hash, next_chunk=c + 1, **{"pass": p}))
                last_save = time.monotonic()
    bar.close()

    stats, state = jax.device_get(stats), jax.device_get(state)
    return dict(
        token_count=stats["token_count"], window_count=stats["window_count"],
        frequency=stats["token_count"] / max(rows.num_tokens, 1), max_act=stats["max_act"],
        decile_edges=decile_edges(np.asarray(stats["hist"])),
        act_window=np.where(state["act_key"] != NO_KEY, state["act_window"], NO_WINDOW).astype(np.int32),
        act_value=np.asarray(state["act_value"], np.float32),
        neg_window=np.where(state["neg_key"] != NO_KEY, state["neg_window"], NO_WINDOW)[:, :non_activating]
        .astype(np.int32),
        num_tokens=np.int64(rows.num_tokens), window_tokens=np.int32(width))


def _read_partial(partial: Path) -> dict:
    """The saved state of an unfinished sweep; an unreadable one (written atomically, so damaged
    from outside) is only lost work: the sweep starts over."""
    if not partial.exists():
        return {}
    try:
        with np.load(partial) as z:
            saved = {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - truncated, not a zip, not numpy
        return {}
    want = {"coder", "pass", "next_chunk", "token_count", "window_count", "max_act", "hist"}
    if not want <= set(saved):
        return {}
    if int(saved["pass"]) == 2 and not set(_fresh_state(1, 1, 1)) <= set(saved):
        return {}
    return saved


def _host_dict(stats, state, **scalars) -> dict:
    out = {k: np.asarray(v) for k, v in jax.device_get({**stats, **state}).items()}
    return {**out, **{k: np.asarray(v) for k, v in scalars.items()}}


# ---------------------------------------------------------------------------- reading them back


EXAMPLE_ARRAYS = ("token_count", "window_count", "frequency", "max_act", "decile_edges", "act_window", "act_value",
                  "neg_window", "num_tokens", "window_tokens")


class Examples:
    """The examples arrays plus what a prompt needs: window tokens and per-token activations."""

    def __init__(self, data: dict, params, meta: dict, coder_hash: str, rows: StoreRows):
        self.data, self.params, self.meta, self.coder_hash, self.rows = data, params, meta, coder_hash, rows
        self.width = int(data["window_tokens"])
        self.num_latents = len(data["max_act"])

    def activating(self, latent: int, per_decile: int) -> list[int]:
        """Up to `per_decile` windows from each decile, strongest decile first."""
        w = self.data["act_window"][latent, ::-1, :per_decile]
        return [int(i) for i in w.reshape(-1) if i != NO_WINDOW]

    def non_activating(self, latent: int, count: int) -> list[int]:
        return [int(i) for i in self.data["neg_window"][latent, :count] if i != NO_WINDOW]

    def windows(self, window_ids: list[int], latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [w, width], the latent's activations [w, width])."""
        ids = np.asarray(window_ids, np.int64)
        if not len(ids):
            return np.zeros((0, self.width), np.int32), np.zeros((0, self.width), np.float32)
        toks = self.rows.window_tokens(ids, self.width)
        x = self.rows.window_inputs(ids, self.width)
        acts = latent_acts(self.params, self.meta, x, np.asarray([latent]))[:, 0]
        return toks, acts.reshape(len(ids), self.width)
