"""Capture: the Flax model run up to one layer over token windows, its intermediates written to
the activation store (nlrw_jax.data.store, resumable by chunk), or yielded straight from the
forward without disk (`on_the_fly`)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nlrw_jax.data.store import STORE_DTYPES, STORE_VERSION, _array, _check_mismatch, _digest, _done_chunks, \
    _host, _kv, _norm, _read_json, _write_json
from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import CAPTURE_NAMES, GPTNeoX, GPTNeoXConfig


# ----------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------


def _params_hash(config: GPTNeoXConfig, params) -> str:
    """For in-memory params: the config plus every leaf's shape, dtype and first values."""
    h = hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
        h.update(np.asarray(jax.device_get(jnp.ravel(leaf)[:64]), dtype=np.float32).tobytes())
    return h.hexdigest()


def _load_model(model, model_dtype: str):
    """(config, params, path, sha256) from a checkpoint folder / hub name or a (config, params) pair."""
    if isinstance(model, tuple):
        config, params = model
        return config, params, None, _params_hash(config, params)
    folder = hf.resolve_checkpoint(str(model))
    config, params = hf.load(folder, dtype=jnp.dtype(model_dtype))
    return config, params, str(folder.resolve()), hf.content_hash(folder)


@functools.lru_cache(maxsize=16)  # a repeated capture in one process (tests, benchmarks) compiles once
def forward_fn(config: GPTNeoXConfig, layer: int, points: tuple[str, ...], model_dtype, out_dtype=None):
    """jit(params, ids [b, s]) -> {point: [b*s, d]}; stops after `layer` (later layers unused)."""
    module = GPTNeoX(config, dtype=jnp.dtype(model_dtype))

    def fwd(params, ids):
        _, got = module.apply({"params": params}, ids, capture=[(layer, p) for p in points], last_layer=layer)
        return {p: got[(layer, p)].reshape(-1, config.hidden_size).astype(out_dtype or got[(layer, p)].dtype)
                for p in points}

    return jax.jit(fwd)


def _check_points_layer(config: GPTNeoXConfig, layer: int, points: Sequence[str]):
    if not 0 <= layer < config.num_hidden_layers:
        raise UserError(f"layer {layer} is out of range: the model has layers 0..{config.num_hidden_layers - 1}")
    if not points or len(set(points)) != len(points) or any(p not in CAPTURE_NAMES for p in points):
        raise UserError(f"capture points {list(points)} must be distinct names from {list(CAPTURE_NAMES)}")


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------


def _chunks_of(windows, num_windows: int, chunk_windows: int, first: int, ctx_len: int) -> Iterator[np.ndarray]:
    """This host's windows as int32 [<=chunk_windows, ctx_len] chunks."""
    if isinstance(windows, np.ndarray):
        for start in range(first, first + num_windows, chunk_windows):
            yield np.asarray(windows[start:min(start + chunk_windows, first + num_windows)], dtype=np.int32)
        return
    pending, have = [], 0
    for batch in windows:
        batch = np.asarray(batch, dtype=np.int32)
        batch = batch[None] if batch.ndim == 1 else batch
        if batch.ndim != 2 or batch.shape[1] != ctx_len:
            raise UserError(f"a windows batch has shape {batch.shape}; expected [batch, {ctx_len}] like the first")
        pending.append(batch)
        have += len(batch)
        while have >= chunk_windows or (have and have >= num_windows):
            flat = np.concatenate(pending)
            take = min(chunk_windows, num_windows)
            yield flat[:take]
            num_windows -= take
            pending, have = [flat[take:]], len(flat) - take
            if num_windows == 0:
                return
    if num_windows > 0:
        raise UserError(f"the windows ran out {num_windows} windows short of num_windows")


def _windows_hash(windows: np.ndarray) -> str:
    h = hashlib.sha256()
    for start in range(0, len(windows), 4096):  # in blocks: a memory-mapped selection stays on disk
        h.update(np.ascontiguousarray(windows[start:start + 4096], dtype=np.int32).tobytes())
    return h.hexdigest()


def capture(
    model,
    windows: np.ndarray | Iterable[np.ndarray],
    store_path,
    *,
    layer: int,
    points: Sequence[str] = ("mlp_in", "mlp_out"),
    dtype: str = "float32",
    batch_size: int = 8,
    chunk_windows: int = 64,
    num_windows: int | None = None,
    source: dict | None = None,
    model_dtype: str = "float32",
    progress: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> str:
    """Captures `points` at `layer` over `windows` into `store_path`; resumes an interrupted run.

    `model`: a checkpoint folder (or hub name) or a `(config, params)` pair.
    `windows`: either an int array [n, ctx_len] of ALL windows (host p captures the p-th
    contiguous block), or an iterable of int batches [b, ctx_len] that are already this
    host's windows (e.g. `window_dataset(..., process_index=p)`), then with `num_windows`
    (this host's count). `source`: a JSON-able description of the token source and window
    selection (e.g. {"token_cache": tokens.cache_identity(...), "seed": 0, "skip": 0}); it is
    recorded, and a resumed capture must give the same.
    Chunks already marked done are skipped (for iterables their stored tokens are
    compared with the incoming windows, which catches a changed window selection).
    Returns the store path.
    """
    if dtype not in STORE_DTYPES:
        raise UserError(f"store dtype {dtype!r} is not supported; expected one of {list(STORE_DTYPES)}")
    if batch_size <= 0 or chunk_windows <= 0:
        raise UserError(f"batch_size ({batch_size}) and chunk_windows ({chunk_windows}) must be positive")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    points = list(points)
    config, params, model_path, model_sha = _load_model(model, model_dtype)
    _check_points_layer(config, layer, points)
    root = _norm(store_path)

    # This host's share of the windows, and what identifies the selection.
    if isinstance(windows, np.ndarray):
        if windows.ndim != 2 or windows.dtype.kind not in "ui" or not len(windows):
            raise UserError(f"windows must be a non-empty 2-D integer array, got {windows.dtype} {windows.shape}")
        total, ctx_len = windows.shape
        first = process_index * total // process_count
        num_windows = (process_index + 1) * total // process_count - first
        selection = {"num_windows": int(total), "sha256": _windows_hash(windows)}
    else:
        if not num_windows or num_windows <= 0:
            raise UserError("capture from an iterable of batches needs num_windows (this host's window count)")
        it = iter(windows)
        head = np.asarray(next(it, np.zeros((0, 0))))
        if head.ndim not in (1, 2) or head.size == 0:
            raise UserError("windows iterable is empty or its batches are not [batch, ctx_len] arrays")
        ctx_len, first, selection = head.shape[-1], 0, None
        windows = itertools.chain([head], it)
    if ctx_len > config.max_position_embeddings:
        raise UserError(f"ctx_len {ctx_len} is longer than the model's max_position_embeddings {config.max_position_embeddings}")
    if num_windows <= 0:
        raise UserError(f"host {process_index} gets no windows: {process_count} hosts for fewer windows")

    chunk_tokens = chunk_windows * ctx_len
    num_tokens = num_windows * ctx_len
    num_chunks = -(-num_windows // chunk_windows)
    manifest = {
        "version": STORE_VERSION, "model_path": model_path, "model_sha256": model_sha, "model_dtype": model_dtype,
        "layer": layer, "points": points, "d_model": config.hidden_size, "dtype": dtype, "ctx_len": int(ctx_len),
        "chunk_windows": chunk_windows, "chunk_tokens": chunk_tokens, "process_count": process_count,
        "source": source, "windows": selection,
    }
    host_manifest = {"num_windows": int(num_windows), "num_tokens": int(num_tokens), "num_chunks": num_chunks,
                     "first_window": int(first)}
    kv = _kv(root)
    for key, want in (("manifest.json", manifest), (f"{_host(process_index)}/manifest.json", host_manifest)):
        stored = _read_json(kv, key)
        if stored is None:
            _write_json(kv, key, want)
        else:
            _check_mismatch(root, key, stored, want)

    # Arrays: created on the first run, reopened (and checked by zarr against shape/dtype) on resume.
    host = _host(process_index)
    arrays = {p: _array(root, f"{host}/{p}", open=True, create=True, dtype=ts.dtype(dtype),
                        shape=[num_tokens, config.hidden_size],
                        chunk_layout=ts.ChunkLayout(write_chunk_shape=[chunk_tokens, config.hidden_size]))
              for p in points}
    tok_array = _array(root, f"{host}/tokens", open=True, create=True, dtype=ts.int32, shape=[num_tokens],
                       chunk_layout=ts.ChunkLayout(write_chunk_shape=[chunk_tokens]))
    done_kv = _kv(root, f"{host}/done")
    done = {c for c in _done_chunks(root, process_index) if c < num_chunks}

    fwd = forward_fn(config, layer, tuple(points), model_dtype, STORE_DTYPES[dtype])
    # Data-parallel over this host's devices (no cross-host traffic: hosts capture independently).
    local = jax.local_devices()
    local_mesh = Mesh(np.array(local[:math.gcd(batch_size, len(local))]), ("data",))
    params = jax.device_put(params, NamedSharding(local_mesh, P()))
    rows = NamedSharding(local_mesh, P("data"))
    skipped = sum(min(chunk_tokens, num_tokens - c * chunk_tokens) for c in done)
    bar = tqdm(total=num_tokens, initial=skipped, unit="tok", unit_scale=True, desc=f"capture {host}",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    pending = None  # (chunk, write futures, checksums): the previous chunk's writes overlap this chunk's forward

    def finish(item):
        c, futures, sums = item
        for f in futures:
            f.result()
        # The marker, strictly after the data is written; it carries the checksums readers verify.
        done_kv.write(f"{c:06d}", json.dumps({"sha256": sums}, sort_keys=True).encode()).result()

    for c, ids in enumerate(_chunks_of(windows, num_windows, chunk_windows, first, ctx_len)):
        lo, hi = c * chunk_tokens, c * chunk_tokens + ids.size
        if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
            raise UserError(f"windows hold token ids outside the model's vocabulary [0, {config.vocab_size})")
        if c in done:
            if selection is None and not np.array_equal(tok_array[lo:hi].read().result(), ids.reshape(-1)):
                raise UserError(f"activation store {root}: chunk {c} of {host} holds other tokens than this "
                                f"capture's windows (different token source or window selection)")
            continue
        n = len(ids)
        padded = -(-n // batch_size) * batch_size  # pad to whole batches: one compiled shape
        ids_padded = np.concatenate([ids, np.zeros((padded - n, ctx_len), np.int32)])
        # Dispatch every batch first, then fetch: the device never waits on the host copy.
        outs = jax.device_get([fwd(params, jax.device_put(ids_padded[b:b + batch_size], rows))
                               for b in range(0, padded, batch_size)])
        # Exactly the stored dtype, so the checksum is of the bytes that land in the chunk.
        data = {"tokens": ids.reshape(-1)}
        for p in points:
            data[p] = np.asarray(np.concatenate([o[p] for o in outs])[: hi - lo], STORE_DTYPES[dtype])
        futures = [tok_array[lo:hi].write(data["tokens"])] + [arrays[p][lo:hi].write(data[p]) for p in points]
        sums = {name: _digest(a) for name, a in data.items()}
        if pending is not None:
            finish(pending)
        pending = (c, futures, sums)
        bar.update(hi - lo)
    if pending is not None:
        finish(pending)
    bar.close()
    return str(store_path)


# ----------------------------------------------------------------------------------------------
# On the fly
# ----------------------------------------------------------------------------------------------


def on_the_fly(
    model: GPTNeoX | GPTNeoXConfig,
    params,
    window_iter: Iterable[np.ndarray],
    layer: int,
    points: Sequence[str] = ("mlp_in", "mlp_out"),
    batch_tokens: int = 4096,
    *,
    seed: int = 0,
    shuffle: bool = True,
    buffer_tokens: int | None = None,
    model_dtype: str = "float32",
    dtype: str | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Batches {point: [batch_tokens, d_model]} (jax arrays) straight from the forward, no disk.

    Each window batch from `window_iter` is run to `layer`; rows gather in a buffer of at least
    `buffer_tokens` (default 8 batches) and are permuted there (key: seed, buffer index), so
    training does not see one window's tokens in order. The leftover of a buffer goes into the
    next; the final partial batch is dropped (fixed shapes, no recompilation downstream).
    `dtype` casts the output (e.g. "bfloat16" to match a bf16 store); default: the model's.
    """
    config = model.config if isinstance(model, GPTNeoX) else model
    if isinstance(model, GPTNeoX):
        model_dtype = jnp.dtype(model.dtype).name
    points = list(points)
    _check_points_layer(config, layer, points)
    if batch_tokens <= 0:
        raise UserError(f"batch_tokens must be positive, got {batch_tokens}")
    # A whole number of batches per buffer: every shuffle has the same shape (one compilation).
    buffer_tokens = max(1, -(-(buffer_tokens or 8 * batch_tokens) // batch_tokens)) * batch_tokens
    fwd = forward_fn(config, layer, tuple(points), model_dtype, STORE_DTYPES[dtype] if dtype else None)
    permute = jax.jit(lambda key, xs: {p: x[jax.random.permutation(key, x.shape[0])] for p, x in xs.items()})
    key = jax.random.PRNGKey(seed)

    def emit(buf, index):
        if shuffle:
            buf = permute(jax.random.fold_in(key, index), buf)
        n = buf[points[0]].shape[0] // batch_tokens * batch_tokens
        for i in range(0, n, batch_tokens):
            yield {p: buf[p][i:i + batch_tokens] for p in points}

    parts, have, index = [], 0, 0
    for ids in window_iter:
        ids = jnp.asarray(ids, jnp.int32)
        out = fwd(params, ids[None] if ids.ndim == 1 else ids)
        parts.append(out)
        have += out[points[0]].shape[0]
        while have >= buffer_tokens:
            cat = {p: jnp.concatenate([b[p] for b in parts]) for p in points}
            yield from emit({p: a[:buffer_tokens] for p, a in cat.items()}, index)
            index += 1
            parts, have = [{p: a[buffer_tokens:] for p, a in cat.items()}], have - buffer_tokens
    if have >= batch_tokens:  # the tail: whole batches only
        yield from emit({p: jnp.concatenate([b[p] for b in parts]) for p in points}, index)
