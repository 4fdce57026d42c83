"""Activation store and capture.

`capture` runs the Flax model up to one layer over token windows and writes the chosen
intermediates (e.g. mlp_in/mlp_out for a transcoder, resid_post for an SAE) to a chunked
TensorStore (zarr3). Local paths and gs:// go through the same code: only the kvstore
driver differs ("file" or "gcs").

Layout under the store root:

    manifest.json               what was captured (model hash, layer, points, d_model, dtype,
                                ctx_len, chunking, token source / window selection, version)
    host000/manifest.json       this host's share: num_windows, num_tokens, num_chunks
    host000/{point}/            zarr3 [num_tokens, d_model], float32 or bfloat16, one zarr chunk
                                per capture chunk (chunk_windows whole windows)
    host000/tokens/             zarr3 int32 [num_tokens]: the token ids, to map back to text
    host000/done/{chunk:06d}    empty object: written only after all of that chunk's arrays
                                are written; a chunk without it is recomputed on resume

One writer per host: host p writes only host{p:03d}/ (and the root manifest, whose content
every host computes identically). The reader (`open_store`) concatenates the hosts in order
and refuses a store with a missing marker.

`on_the_fly` yields the same batches straight from the model's forward, without disk.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nlrw_jax import distributed
from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import CAPTURE_NAMES, GPTNeoX, GPTNeoXConfig

STORE_VERSION = 1
STORE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}  # jnp.bfloat16 is ml_dtypes' numpy type
_SAMPLE_BYTES = 1 << 20  # weight-file bytes hashed from each end (see _folder_hash)
# Manifest fields that describe but do not define the capture (a copied model folder is the same model).
_INFORMATIONAL = {"model_path"}


# ----------------------------------------------------------------------------------------------
# Paths and small helpers
# ----------------------------------------------------------------------------------------------


def _kvstore(root: str, sub: str = "") -> dict:
    """A kvstore spec for `root/sub`: gcs for gs://bucket/prefix, file for everything else."""
    if root.startswith("gs://"):
        bucket, _, prefix = root[len("gs://"):].partition("/")
        path = "/".join(p for p in (prefix.strip("/"), sub) if p)
        return {"driver": "gcs", "bucket": bucket, "path": path + "/" if path else ""}
    return {"driver": "file", "path": os.path.join(root, sub).rstrip("/") + "/"}


def _norm(path) -> str:
    path = str(path)
    return path.rstrip("/") if path.startswith("gs://") else os.path.abspath(os.path.expanduser(path))


def _host(p: int) -> str:
    return f"host{p:03d}"


def _kv(root: str, sub: str = "") -> ts.KvStore:
    return ts.KvStore.open(_kvstore(root, sub)).result()


def _read_json(kv: ts.KvStore, key: str) -> dict | None:
    r = kv.read(key).result()
    if r.state != "value":
        return None
    try:
        return json.loads(bytes(r.value))
    except json.JSONDecodeError as e:
        where = kv.path if kv.url.startswith("file://") else kv.url  # a plain path, or gs://...
        raise UserError(f"{where}{key} is not valid JSON: {e}") from None


def _write_json(kv: ts.KvStore, key: str, data: dict):
    # kvstore writes are atomic (file: temp + rename; gcs: one object), so no half-written manifest.
    kv.write(key, json.dumps(data, indent=1, sort_keys=True).encode()).result()


def _done_chunks(root: str, host: int) -> set[int]:
    keys = _kv(root, f"{_host(host)}/done").list().result()
    return {int(k) for k in (bytes(k).decode() for k in keys) if k.isdigit()}


def _array(root: str, sub: str, **kwargs) -> ts.TensorStore:
    return ts.open({"driver": "zarr3", "kvstore": _kvstore(root, sub)}, **kwargs).result()


def _check_mismatch(path: str, what: str, stored: dict, wanted: dict):
    """One-line UserError naming every field where `stored` and `wanted` differ."""
    diffs = [f"{k} (store: {stored.get(k)!r}, now: {wanted.get(k)!r})"
             for k in sorted(set(stored) | set(wanted))
             if k not in _INFORMATIONAL and stored.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"activation store {path} {what} does not match this capture: "
                        f"different {'; '.join(diffs)}. Use another store path or delete it.")


# ----------------------------------------------------------------------------------------------
# Model identity
# ----------------------------------------------------------------------------------------------


def _folder_hash(folder: Path) -> str:
    """config.json bytes + each weight file's name, size and first/last MiB.

    Sizes alone cannot tell two checkpoints of one architecture apart (e.g. Pythia training
    steps), and hashing whole files of GBs on every start is too slow; the sampled bytes
    (safetensors header + data at both ends) are cheap and do tell them apart.
    """
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin") or f.name == "model.safetensors.index.json":
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(_SAMPLE_BYTES))
                fh.seek(max(0, size - _SAMPLE_BYTES))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


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
    return config, params, str(folder.resolve()), _folder_hash(folder)


@functools.lru_cache(maxsize=16)  # a repeated capture in one process (tests, benchmarks) compiles once
def _forward_fn(config: GPTNeoXConfig, layer: int, points: tuple[str, ...], model_dtype, out_dtype=None):
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
    selection (e.g. {"token_cache": sha256 of its manifest, "seed": 0, "skip": 0}); it is
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

    fwd = _forward_fn(config, layer, tuple(points), model_dtype, STORE_DTYPES[dtype])
    # Data-parallel over this host's devices (no cross-host traffic: hosts capture independently).
    local = jax.local_devices()
    local_mesh = Mesh(np.array(local[:math.gcd(batch_size, len(local))]), ("data",))
    params = jax.device_put(params, NamedSharding(local_mesh, P()))
    rows = NamedSharding(local_mesh, P("data"))
    skipped = sum(min(chunk_tokens, num_tokens - c * chunk_tokens) for c in done)
    bar = tqdm(total=num_tokens, initial=skipped, unit="tok", unit_scale=True, desc=f"capture {host}",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    pending = None  # (chunk, write futures): the previous chunk's writes overlap this chunk's forward

    def finish(item):
        c, futures = item
        for f in futures:
            f.result()
        done_kv.write(f"{c:06d}", b"").result()  # the marker, strictly after the data is written

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
        futures = [tok_array[lo:hi].write(ids.reshape(-1))]
        futures += [arrays[p][lo:hi].write(np.concatenate([o[p] for o in outs])[: hi - lo]) for p in points]
        if pending is not None:
            finish(pending)
        pending = (c, futures)
        bar.update(hi - lo)
    if pending is not None:
        finish(pending)
    bar.close()
    return str(store_path)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class ActivationStore:
    """A complete store, all hosts concatenated in host order: global token rows [0, num_tokens)."""

    def __init__(self, path: str, manifest: dict, hosts: list[dict]):
        self.path, self.manifest = path, manifest
        self.points = list(manifest["points"])
        self.d_model = manifest["d_model"]
        self.dtype = manifest["dtype"]
        self.ctx_len = manifest["ctx_len"]
        self.chunk_tokens = manifest["chunk_tokens"]
        self._arrays = [{p: _array(path, f"{_host(h)}/{p}", open=True) for p in self.points + ["tokens"]}
                        for h in range(len(hosts))]
        sizes = [m["num_tokens"] for m in hosts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._offsets[-1])
        # Global [start, stop) of every chunk, hosts in order.
        self.chunks = [(int(off + s), int(off + min(s + self.chunk_tokens, n)))
                       for off, n in zip(self._offsets[:-1], sizes) for s in range(0, n, self.chunk_tokens)]

    def _read_futures(self, name: str, start: int, stop: int) -> list:
        if not 0 <= start <= stop <= self.num_tokens:
            raise UserError(f"rows [{start}, {stop}) are outside the store's [0, {self.num_tokens})")
        if name != "tokens" and name not in self.points:
            raise UserError(f"store {self.path} has no capture point {name!r}; it holds {self.points}")
        futures = []
        for h, arrays in enumerate(self._arrays):
            lo, hi = max(start, self._offsets[h]), min(stop, self._offsets[h + 1])
            if lo < hi:
                futures.append(arrays[name][int(lo - self._offsets[h]):int(hi - self._offsets[h])].read())
        return futures

    @staticmethod
    def _gather(futures, dtype) -> np.ndarray:
        parts = [np.asarray(f.result(), dtype=dtype) for f in futures]
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def read(self, point: str, start: int, stop: int) -> np.ndarray:
        """float32 [stop - start, d_model]."""
        fut = self._read_futures(point, start, stop)
        return self._gather(fut, np.float32) if fut else np.zeros((0, self.d_model), np.float32)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """int32 token ids of rows [start, stop)."""
        fut = self._read_futures("tokens", start, stop)
        return self._gather(fut, np.int32) if fut else np.zeros((0,), np.int32)

    def batches(self, points: Sequence[str] | None = None, batch_tokens: int = 4096, seed: int = 0, *,
                shuffle: bool = True, buffer_chunks: int = 4, epochs: int | None = None,
                start_batch: int = 0) -> "StoreBatches":
        """Iterator of {point: float32 [batch_tokens, d_model]}; see StoreBatches."""
        return StoreBatches(self, list(points or self.points), batch_tokens, seed, shuffle, buffer_chunks,
                            epochs, start_batch)


class StoreBatches:
    """Deterministic batches: per epoch the chunks are permuted (seed, epoch), taken `buffer_chunks`
    at a time, and the rows of each buffer permuted (seed, epoch, buffer). Batches are consecutive
    `batch_tokens` rows of that stream and may straddle epochs; with `epochs` set, the last
    partial batch is dropped. Batch i depends only on (seed, i), so resuming is a batch index:
    `get_state()` -> {"batch": i}, `set_state(state)`, or `start_batch=i`.
    The next buffer is read (asynchronously) while the current one is served.
    """

    def __init__(self, store: ActivationStore, points, batch_tokens, seed, shuffle, buffer_chunks, epochs,
                 start_batch):
        if batch_tokens <= 0 or buffer_chunks <= 0:
            raise UserError(f"batch_tokens ({batch_tokens}) and buffer_chunks ({buffer_chunks}) must be positive")
        for p in points:
            if p not in store.points:
                raise UserError(f"store {store.path} has no capture point {p!r}; it holds {store.points}")
        self.store, self.points, self.batch_tokens, self.seed = store, points, batch_tokens, seed
        self.shuffle, self.buffer_chunks, self.epochs = shuffle, buffer_chunks, epochs
        self.set_state({"batch": start_batch})

    def get_state(self) -> dict:
        return {"batch": self._batch}

    def set_state(self, state: dict):
        self._batch = int(state["batch"])
        self._gen = self._generate(self._batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = next(self._gen)
        self._batch += 1
        return out

    def _groups(self, epoch: int) -> list[list[int]]:
        n = len(self.store.chunks)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [list(order[i:i + self.buffer_chunks]) for i in range(0, n, self.buffer_chunks)]

    def _start(self, group):
        return {p: [f for c in group for f in self.store._read_futures(p, *self.store.chunks[c])]
                for p in self.points}

    def _buffers(self, position: int) -> Iterator[dict[str, np.ndarray]]:
        """Row stream from global stream `position` on, as successive buffers (the first one cut)."""
        n = self.store.num_tokens
        epoch, skip = divmod(position, n)
        while self.epochs is None or epoch < self.epochs:
            groups = self._groups(epoch)
            sizes = [sum(self.store.chunks[c][1] - self.store.chunks[c][0] for c in g) for g in groups]
            g0 = int(np.searchsorted(np.cumsum(sizes), skip, side="right"))
            skip -= sum(sizes[:g0])
            futures = self._start(groups[g0]) if g0 < len(groups) else None
            for gi in range(g0, len(groups)):
                current = futures
                futures = self._start(groups[gi + 1]) if gi + 1 < len(groups) else None  # read ahead
                buf = {p: ActivationStore._gather(current[p], np.float32) for p in self.points}
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, epoch, gi]).permutation(sizes[gi])
                    buf = {p: a[perm] for p, a in buf.items()}
                yield {p: a[skip:] for p, a in buf.items()}
                skip = 0
            epoch += 1

    def _generate(self, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        parts, have = [], 0
        for buf in self._buffers(start_batch * self.batch_tokens):
            parts.append(buf)
            have += len(buf[self.points[0]])
            while have >= self.batch_tokens:
                cat = {p: np.concatenate([b[p] for b in parts]) for p in self.points}
                yield {p: a[:self.batch_tokens] for p, a in cat.items()}
                parts = [{p: a[self.batch_tokens:] for p, a in cat.items()}]
                have -= self.batch_tokens


def open_store(path) -> ActivationStore:
    """Opens a complete store for reading; an unfinished one is a UserError."""
    root = _norm(path)
    kv = _kv(root)
    manifest = _read_json(kv, "manifest.json")
    if manifest is None:
        raise UserError(f"{path} is not an activation store (no manifest.json)")
    if manifest.get("version") != STORE_VERSION:
        raise UserError(f"activation store {path} has version {manifest.get('version')}, expected {STORE_VERSION}")
    hosts, done, total = [], 0, 0
    for h in range(manifest["process_count"]):
        hm = _read_json(kv, f"{_host(h)}/manifest.json")
        if hm is None:
            raise UserError(f"store {path} is incomplete: host {h} of {manifest['process_count']} has not started")
        hosts.append(hm)
        done += len({c for c in _done_chunks(root, h) if c < hm["num_chunks"]})
        total += hm["num_chunks"]
    if done < total:
        raise UserError(f"store {path} is incomplete: {done} of {total} chunks")
    return ActivationStore(root, manifest, hosts)


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
    fwd = _forward_fn(config, layer, tuple(points), model_dtype, STORE_DTYPES[dtype] if dtype else None)
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


# ----------------------------------------------------------------------------------------------
# python -m nlrw_jax.data.activations capture ...  (a small entry point; `nlrw capture` is the CLI)
# ----------------------------------------------------------------------------------------------


def capture_from_config(cfg) -> str:
    """`nlrw capture`: `capture.windows` windows of the seeded training order, at `model.layer`,
    into run_dir/activations (the transcoder's mlp_in/mlp_out, or the SAE's resid_post)."""
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.sparse.train import points_for

    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    tokenizer = load_tokenizer(token_data.subject_tokenizer_path(folder, cfg.data.tokenizer))
    train_cache, _ = token_data.token_caches(cfg.data, tokenizer)
    # One global batch of `capture.windows` windows: the same selection on every host.
    windows = token_data.window_dataset(train_cache, cfg.data.ctx_len, seed=cfg.data.seed,
                                        batch_size=cfg.capture.windows)[0]
    source = {"token_cache": _cache_id(train_cache), "seed": cfg.data.seed, "windows": cfg.capture.windows}
    path = capture(str(folder), windows, Path(cfg.run_dir) / "activations", layer=cfg.model.layer,
                   points=sorted(set(points_for(cfg.sparse.kind))), dtype=cfg.capture.dtype,
                   batch_size=cfg.capture.batch_size, chunk_windows=cfg.capture.chunk_windows, source=source,
                   model_dtype=cfg.model.dtype, process_index=jax.process_index(), process_count=jax.process_count())
    distributed.barrier("capture")  # the store is complete only when every host has written its share
    return path


def _cache_id(token_file) -> str:
    """Identity of a token cache: the hash of its manifest (sources, tokenizer, counts)."""
    manifest = Path(token_file).parent / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m nlrw_jax.data.activations")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="capture activations of windows saved as an .npy [n, ctx_len]")
    c.add_argument("--model", required=True)
    c.add_argument("--windows", required=True, help=".npy file of int token windows [n, ctx_len]")
    c.add_argument("--store", required=True)
    c.add_argument("--layer", type=int, required=True)
    c.add_argument("--points", default="mlp_in,mlp_out")
    c.add_argument("--dtype", default="float32", choices=list(STORE_DTYPES))
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--chunk-windows", type=int, default=64)
    c.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        windows = np.load(args.windows, mmap_mode="r")
        capture(args.model, windows, args.store, layer=args.layer, points=args.points.split(","),
                dtype=args.dtype, batch_size=args.batch_size, chunk_windows=args.chunk_windows,
                progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
