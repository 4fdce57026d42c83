"""The activation store: its on-disk format, and the reader.

A chunked TensorStore (zarr3) of one layer's intermediates (e.g. mlp_in/mlp_out for a
transcoder, resid_post for an SAE), written by nlrw_jax.data.capture. Local paths and gs:// go
through the same code: only the kvstore driver differs ("file" or "gcs").

Layout under the store root:

    manifest.json               what was captured (model hash, layer, points, d_model, dtype,
                                ctx_len, chunking, token source / window selection, version)
    host000/manifest.json       this host's share: num_windows, num_tokens, num_chunks
    host000/{point}/            zarr3 [num_tokens, d_model], float32 or bfloat16, one zarr chunk
                                per capture chunk (chunk_windows whole windows)
    host000/tokens/             zarr3 int32 [num_tokens]: the token ids, to map back to text
    host000/done/{chunk:06d}    {"sha256": {array: hex}}: the sha256 of the bytes (stored dtype, C
                                order) of each array's rows of that chunk, every point and tokens;
                                written only after all of them are written; a chunk without it is
                                recomputed on resume

One writer per host: host p writes only host{p:03d}/ (and the root manifest, whose content
every host computes identically). The reader (`open_store`) concatenates the hosts in order
and refuses a store with a missing marker; it checks each chunk of an array against its marker's
sha256 the first time it reads from it, so a damaged or deleted chunk file is an error, not
silently wrong (or zero) training data.

"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from nlrw_jax.errors import UserError

STORE_VERSION = 2  # 2: done markers hold the chunk checksums
STORE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}  # jnp.bfloat16 is ml_dtypes' numpy type
_DAMAGED = "the store is damaged; delete it and rerun nlrw capture"
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


def _ts_error(e: Exception) -> str:
    """A TensorStore error's message without the spec JSON it appends."""
    return str(e).split(" [tensorstore_spec=")[0].splitlines()[0]


def _digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes as stored: its own dtype, C order."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def _check_mismatch(path: str, what: str, stored: dict, wanted: dict):
    """One-line UserError naming every field where `stored` and `wanted` differ."""
    diffs = [f"{k} (store: {stored.get(k)!r}, now: {wanted.get(k)!r})"
             for k in sorted(set(stored) | set(wanted))
             if k not in _INFORMATIONAL and stored.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"activation store {path} {what} does not match this capture: "
                        f"different {'; '.join(diffs)}. Use another store path or delete it.")


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
        self._arrays = [{p: self._open_array(h, p) for p in self.points + ["tokens"]} for h in range(len(hosts))]
        self._done = [_kv(path, f"{_host(h)}/done") for h in range(len(hosts))]
        self._verified: set[tuple[int, int, str]] = set()  # (host, chunk, array) whose checksum matched
        self._sizes = sizes = [m["num_tokens"] for m in hosts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._offsets[-1])
        # Global [start, stop) of every chunk, hosts in order.
        self.chunks = [(int(off + s), int(off + min(s + self.chunk_tokens, n)))
                       for off, n in zip(self._offsets[:-1], sizes) for s in range(0, n, self.chunk_tokens)]

    def _open_array(self, h: int, name: str) -> ts.TensorStore:
        try:
            return _array(self.path, f"{_host(h)}/{name}", open=True)
        except ValueError as e:  # missing or unreadable zarr.json
            raise UserError(f"activation store {self.path}: cannot open {_host(h)}/{name}: {_ts_error(e)}; "
                            f"{_DAMAGED}") from None

    def _read_futures(self, name: str, start: int, stop: int) -> list["_ChunkedRead"]:
        if not 0 <= start <= stop <= self.num_tokens:
            raise UserError(f"rows [{start}, {stop}) are outside the store's [0, {self.num_tokens})")
        if name != "tokens" and name not in self.points:
            raise UserError(f"store {self.path} has no capture point {name!r}; it holds {self.points}")
        futures = []
        for h in range(len(self._arrays)):
            lo, hi = max(start, self._offsets[h]), min(stop, self._offsets[h + 1])
            if lo < hi:
                futures.append(_ChunkedRead(self, h, name, int(lo - self._offsets[h]), int(hi - self._offsets[h])))
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


class _ChunkedRead:
    """A read of host `h`'s rows [lo, hi) of array `name`, in flight; `result()` gives them.

    Chunks of the array not verified yet are read whole (the read is widened to them: at most
    the first and last chunk grow), and `result()` checks each against its done marker's sha256
    before returning, so every chunk is checked once per store object, on the data read anyway.
    """

    def __init__(self, store: ActivationStore, h: int, name: str, lo: int, hi: int):
        ct, n = store.chunk_tokens, store._sizes[h]
        self.store, self.h, self.name, self.lo, self.hi = store, h, name, lo, hi
        self.todo = [c for c in range(lo // ct, (hi - 1) // ct + 1) if (h, c, name) not in store._verified]
        self.start = min(lo, self.todo[0] * ct) if self.todo else lo
        stop = max(hi, min((self.todo[-1] + 1) * ct, n)) if self.todo else hi
        self.data = store._arrays[h][name][self.start:stop].read()
        self.markers = [store._done[h].read(f"{c:06d}") for c in self.todo]

    def _error(self, c: int, what: str) -> UserError:
        return UserError(f"activation store {self.store.path}: chunk {c} of {_host(self.h)} ({self.name}) "
                         f"{what}: {_DAMAGED}")

    def result(self) -> np.ndarray:
        store, ct = self.store, self.store.chunk_tokens
        try:
            data = self.data.result()
        except ValueError as e:  # a truncated or unreadable chunk file; the message names it
            raise UserError(f"activation store {store.path}: {_host(self.h)} ({self.name}) cannot be read: "
                            f"{_ts_error(e)}; {_DAMAGED}") from None
        for c, marker in zip(self.todo, self.markers):
            r = marker.result()
            try:
                want = json.loads(bytes(r.value))["sha256"][self.name] if r.state == "value" else None
            except (ValueError, TypeError, KeyError):
                want = None
            if want is None:
                raise self._error(c, "has a missing or unreadable done marker")
            rows = data[c * ct - self.start:min((c + 1) * ct, store._sizes[self.h]) - self.start]
            if _digest(rows) != want:
                raise self._error(c, "fails its checksum")
            store._verified.add((self.h, c, self.name))
        return data[self.lo - self.start:self.hi - self.start]


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
