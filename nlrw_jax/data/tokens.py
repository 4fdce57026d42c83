"""Token pipeline: tokenize a corpus once into a flat token cache, then serve shuffled windows with grain.

Cache (``tokenize_to_cache``): every document is tokenized (no special tokens added), followed by
``eos_id`` (GPT-NeoX / Pythia style), and all documents are concatenated into one flat ``tokens.npy``
(uint16 when the vocabulary fits, else uint32) so it can be memory-mapped, next to a ``manifest.json``.
The manifest records each source file's content (sha256, size, format) and, separately, where and
when it was last seen (path, size, mtime) for a cheap reuse check; ``cache_identity`` derives the
cache's identity from content only, so a touched or copied corpus keeps it.

Sources (a list of strings, read in order; globs are expanded in sorted order):
  * ``*.txt``                   -- a whole file is ONE document, read verbatim as UTF-8.
  * ``*.jsonl`` / ``*.jsonl.xz`` -- one JSON object per line, document text in ``text_field``.
  * ``*.parquet``               -- column ``text_field``.
  * ``hf:NAME[:CONFIG]:SPLIT``  -- a Hugging Face dataset (needs the optional ``datasets`` package).
Empty documents are skipped (no lone EOS).

Windows (``window_dataset``): the stream is cut into non-overlapping windows of exactly ``ctx_len``
tokens (the loss shifts inside the window, as Pythia does; the tail shorter than ``ctx_len`` is
dropped). Window order is a grain ``MapDataset``: range -> shuffle(seed) -> repeat(num_epochs), so each
epoch is reshuffled deterministically (grain folds the epoch into the seed). Multi-host layout: the
global step ``s`` is global-order windows ``[s*B*P, (s+1)*B*P)`` (B = batch_size, P = process_count);
host ``p`` gets rows ``[p*B, (p+1)*B)`` of it, so concatenating the hosts' batches in process order
gives exactly the single-host batch of size ``B*P``.

Resuming: ``it = window_iterator(ds)`` (or ``iter(ds)``) is a grain ``DatasetIterator``;
``it.get_state()`` is a small JSON-safe dict (the step counter) and ``it.set_state(state)`` on a
fresh iterator of the same pipeline resumes bit-exactly. With orbax, save it next to the model
with ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` (re-exported here as
``GrainCheckpointSave`` / ``GrainCheckpointRestore``), e.g.
``ocp.args.Composite(state=..., data=GrainCheckpointSave(it))``; it writes one JSON file per
process (named by ``jax.process_index()``). The state does not record the pipeline's config:
restore into the same ``window_dataset(...)`` arguments.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import grain
import numpy as np
from tqdm import tqdm

from nlrw_jax.errors import UserError

# Orbax args for saving / restoring a grain iterator (grain registers them with orbax on import).
from grain.checkpoint import CheckpointRestore as GrainCheckpointRestore  # noqa: F401
from grain.checkpoint import CheckpointSave as GrainCheckpointSave  # noqa: F401

CACHE_VERSION = 2  # 2: sources identified by content hash
TOKENS_FILE = "tokens.npy"
MANIFEST_FILE = "manifest.json"
_ENCODE_BATCH = 1000  # documents per encode_batch call
_HASH_BLOCK = 16 << 20  # bytes per read when hashing a source
# Manifest fields the tokens are a function of: no paths, source strings or times.
_IDENTITY_FIELDS = ("files", "text_field", "tokenizer_sha256", "eos_id", "dtype", "token_count")

__all__ = [
    "tokenize_to_cache",
    "read_manifest",
    "cache_identity",
    "window_dataset",
    "window_iterator",
    "validation_windows",
    "GrainCheckpointSave",
    "GrainCheckpointRestore",
]


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

_SUFFIXES = (".txt", ".jsonl", ".jsonl.xz", ".parquet")


def _resolve(spec: str) -> list[str]:
    """One source spec -> the list of things to read (file paths, or the hf: spec itself)."""
    if spec.startswith("hf:"):
        return [spec]
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise UserError(f"no files match source glob {spec!r}")
    else:
        paths = [spec]
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"source file not found: {p}")
        if os.path.isdir(p):
            raise UserError(f"source {p} is a directory; give a glob such as {p}/*.jsonl")
        if not p.endswith(_SUFFIXES):
            raise UserError(f"source {p}: unsupported file type (expected one of {', '.join(_SUFFIXES)})")
    return paths


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    from nlrw_jax.data.corpus import read_records

    for record in read_records(path, text_field):
        yield record[text_field]


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(f.schema_arrow.names)})")
    row = 0
    for batch in f.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row}: column {text_field!r} is not a string")
            row += 1
            yield text


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    parts = spec[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"bad source {spec!r}: expected hf:NAME[:CONFIG]:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets  # optional dependency, imported only when an hf: source is used
    except ImportError:
        raise UserError(f"source {spec!r} needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name/config/split, ...
        raise UserError(f"cannot load {spec!r}: {_first_line(e)}") from None
    if text_field not in ds.column_names:
        raise UserError(f"{spec}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    for row in ds.select_columns([text_field]):
        yield row[text_field]


def _documents(path: str, text_field: str) -> Iterator[str]:
    """Documents of one resolved source, in order; read errors become UserError naming the file."""
    if path.startswith("hf:"):
        yield from _read_hf(path, text_field)
        return
    try:
        if path.endswith(".txt"):
            yield Path(path).read_text(encoding="utf-8")
        elif path.endswith(".parquet"):
            yield from _read_parquet(path, text_field)
        else:
            yield from _read_jsonl(path, text_field)
    except UserError:
        raise
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    except Exception as e:  # OSError, lzma.LZMAError, pyarrow.ArrowInvalid for a corrupt file, ...
        raise UserError(f"cannot read {path}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _stat(path: str) -> dict:
    """Where a source is and when it last changed: unchanged means its recorded content hash still holds."""
    if path.startswith("hf:"):
        return {"path": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _content(path: str) -> dict:
    """What a source's tokens depend on: its bytes and how they are parsed, not where it lies.
    An hf: dataset is known only by its name."""
    if path.startswith("hf:"):
        return {"hf": path}
    h, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                size += len(block)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    # The same bytes as .txt (one document) and as .jsonl (parsed) give different tokens.
    kind = next(s for s in _SUFFIXES if path.endswith(s))
    return {"format": kind, "size": size, "sha256": h.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    # numpy pads a 1-D header so the shape can grow to 21 digits in place: its length does not
    # depend on n, which lets us stream tokens first and write the true length at the end.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def _write_manifest(cache_dir: Path, manifest: dict):
    # Temp + rename in the parent: readers never see a half-written manifest, and the cache folder
    # holds only its two files even if this is interrupted.
    tmp = cache_dir.parent / f".{cache_dir.name}.manifest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, cache_dir / MANIFEST_FILE)
    except OSError:  # e.g. a read-only shared cache: still valid, its sources are just hashed again next time
        tmp.unlink(missing_ok=True)


def read_manifest(cache_dir: str | os.PathLike) -> dict | None:
    """The manifest of a *complete* cache in ``cache_dir``, else None (missing, half-written, corrupt)."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
        tokens = np.load(cache_dir / TOKENS_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if tokens.shape != (manifest.get("token_count"),) or str(tokens.dtype) != manifest.get("dtype"):
        return None
    return manifest


def cache_identity(token_file: str | os.PathLike) -> str:
    """What a cache's tokens are, from content alone (sources' hashes, tokenizer, settings, count):
    the same for a touched, moved or copied corpus, different when any byte of it changes."""
    path = Path(token_file)
    cache_dir = path if path.is_dir() else path.parent
    manifest = read_manifest(cache_dir)
    if manifest is None or manifest.get("version") != CACHE_VERSION:
        raise UserError(f"{cache_dir} is not a complete version-{CACHE_VERSION} token cache; rebuild it")
    fields = {k: manifest.get(k) for k in _IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def tokenize_to_cache(
    sources: list[str],
    tokenizer,
    out_dir: str | os.PathLike,
    eos_id: int = 0,
    *,
    text_field: str = "text",
    progress: bool = True,
) -> Path:
    """Tokenize ``sources`` into ``out_dir/tokens.npy`` (+ ``manifest.json``); returns the tokens path.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a path to a tokenizer.json. If ``out_dir`` already
    holds a complete cache built from sources of the same content, with the same tokenizer, eos_id
    and text_field, it is reused as is; otherwise it is rebuilt. Sources whose paths, sizes and
    mtimes are as recorded are not read again; others are hashed (a touched or copied corpus keeps
    the cache, and its manifest then records the new paths and times). The cache is built in a temporary
    sibling directory and renamed into place, so ``out_dir`` is never seen half-written.
    Concurrent builders (several hosts on one shared disk) are not coordinated: build on one.
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer))
        except Exception as e:
            raise UserError(f"cannot load tokenizer {tokenizer}: {e}") from None
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise UserError("no token sources given")
    out_dir = Path(out_dir)

    paths = [p for spec in sources for p in _resolve(spec)]
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab:
        raise UserError(f"eos_id {eos_id} is outside the tokenizer's vocabulary (size {vocab})")
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    key = {  # what the tokens depend on besides the sources' content
        "version": CACHE_VERSION,
        "text_field": text_field,
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "eos_id": int(eos_id),
        "dtype": str(dtype),
    }
    stats = [_stat(p) for p in paths]

    def same_settings(manifest):
        return manifest is not None and all(manifest.get(k) == v for k, v in key.items())

    have = read_manifest(out_dir)
    if same_settings(have) and have.get("stats") == stats:
        return out_dir / TOKENS_FILE  # the sources are untouched since they were hashed
    files = [_content(p) for p in paths]
    if same_settings(have) and have.get("files") == files:
        # Touched, moved or copied but the same bytes: keep the tokens; record where the sources are
        # now, so the next call need not hash them again.
        _write_manifest(out_dir, {**have, "sources": list(sources), "stats": stats})
        return out_dir / TOKENS_FILE
    if out_dir.exists() and (
        not out_dir.is_dir() or not {e.name for e in out_dir.iterdir()} <= {TOKENS_FILE, MANIFEST_FILE}
    ):
        # Never delete something that is not one of our caches.
        raise UserError(f"{out_dir} exists and is not a token cache; choose another directory")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
        n_tokens = n_docs = 0
        header_len = len(_npy_header(dtype, 0))
        with (
            open(tmp / TOKENS_FILE, "wb") as f,
            tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar,
        ):
            f.write(_npy_header(dtype, 0))

            def flush(texts):
                nonlocal n_tokens, n_docs
                for enc in encode(texts, add_special_tokens=False):
                    if enc.ids:
                        ids = np.asarray(enc.ids + [eos_id], dtype=dtype)
                        f.write(ids.tobytes())
                        n_tokens += len(ids)
                        n_docs += 1
                bar.update(len(texts))

            batch: list[str] = []
            for path in paths:
                for text in _documents(path, text_field):
                    batch.append(text)
                    if len(batch) == _ENCODE_BATCH:
                        flush(batch)
                        batch = []
            if batch:
                flush(batch)
            if n_tokens == 0:
                raise UserError(f"empty corpus: no tokens in {', '.join(sources)}")
            header = _npy_header(dtype, n_tokens)
            assert len(header) == header_len
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        # The manifest is written last: a directory without it is never taken as a cache.
        manifest = {**key, "sources": list(sources), "files": files, "stats": stats,
                    "token_count": n_tokens, "document_count": n_docs}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

        theirs = read_manifest(out_dir)
        if same_settings(theirs) and theirs.get("files") == files:  # someone else finished the same cache meanwhile
            shutil.rmtree(tmp)
            return out_dir / TOKENS_FILE
        old = None
        if out_dir.exists():  # stale cache: move aside, then swap in the new one
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / TOKENS_FILE


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------


def _open_tokens(token_file: str | os.PathLike) -> tuple[Path, np.ndarray]:
    path = Path(token_file)
    if path.is_dir():  # a cache directory
        path = path / TOKENS_FILE
    try:
        tokens = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise UserError(f"token file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read token file {path}: {e}") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise UserError(f"{path}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
    return path, tokens


def _n_windows(path: Path, tokens: np.ndarray, ctx_len: int) -> int:
    if ctx_len <= 0:
        raise UserError(f"ctx_len must be positive, got {ctx_len}")
    if ctx_len > len(tokens):
        raise UserError(f"ctx_len {ctx_len} is larger than the corpus {path} ({len(tokens)} tokens)")
    return len(tokens) // ctx_len


class _ReadWindows:
    """Window indices of one global step -> this host's rows as int32 [B, ctx_len].

    Opens the memory map lazily and drops it when pickled, so the pipeline can be sent to
    worker processes (pickling a memmap would copy the whole array).
    """

    def __init__(self, path: Path, ctx_len: int, rows: slice, squeeze: bool):
        self.path, self.ctx_len, self.rows, self.squeeze = str(path), ctx_len, rows, squeeze
        self._windows = None

    def __getstate__(self):
        return {**self.__dict__, "_windows": None}

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        if self._windows is None:
            tokens = np.load(self.path, mmap_mode="r")
            n = len(tokens) // self.ctx_len
            self._windows = tokens[: n * self.ctx_len].reshape(n, self.ctx_len)
        out = self._windows[global_indices[self.rows]].astype(np.int32)
        return out[0] if self.squeeze else out


def window_dataset(
    token_file: str | os.PathLike,
    ctx_len: int,
    *,
    seed: int,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    batch_size: int | None = None,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    skip_windows: int = 0,
) -> grain.MapDataset:
    """A grain MapDataset of this host's batches: int32 ``[batch_size, ctx_len]`` (``[ctx_len]`` if
    ``batch_size`` is None, i.e. one window per step per host).

    ``num_epochs=None`` repeats forever, reshuffling each epoch; batches may straddle epochs.
    ``skip_windows`` leaves the first windows out, so ``validation_windows(..., n=skip_windows)``
    is truly held out. ``ds[step]`` gives a step directly; ``window_iterator(ds)`` a resumable iterator.
    """
    path, tokens = _open_tokens(token_file)
    n = _n_windows(path, tokens, ctx_len)
    if not 0 <= skip_windows < n:
        raise UserError(f"skip_windows {skip_windows} must be in [0, {n}) for {path} at ctx_len {ctx_len}")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise UserError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"num_epochs must be positive or None, got {num_epochs}")
    if not drop_remainder and process_count > 1:
        # A partial last global batch cannot be split evenly; hosts would disagree on step count.
        raise UserError("drop_remainder=False is only supported with process_count=1")
    per_host = batch_size or 1
    global_batch = per_host * process_count
    if global_batch > n - skip_windows:
        raise UserError(
            f"batch_size {per_host} x process_count {process_count} = {global_batch} windows per step, "
            f"but {path} has only {n - skip_windows} windows of {ctx_len} tokens"
        )

    ds = grain.MapDataset.range(skip_windows, n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # repeat after shuffle: each epoch is a fresh permutation
    # Batch *indices* globally (cheap ints), then each host reads only its own rows.
    ds = ds.batch(global_batch, drop_remainder=drop_remainder)
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    return ds.map(_ReadWindows(path, ctx_len, rows, squeeze=batch_size is None))


def window_iterator(
    ds: grain.MapDataset, *, prefetch: int = 8, num_threads: int = 4
) -> grain.DatasetIterator:
    """A resumable iterator over ``ds`` (``get_state()`` / ``set_state()``) with a bounded read-ahead.

    Plain ``iter(ds)`` also works but grain then prefetches 500 elements, which for large batches
    is gigabytes of host memory.
    """
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def validation_windows(token_file: str | os.PathLike, ctx_len: int, n: int) -> np.ndarray:
    """The first ``n`` windows of a token cache, unshuffled, as int32 ``[n, ctx_len]`` (held-out eval).

    Use a separate cache for validation, or train with ``window_dataset(..., skip_windows=n)``.
    """
    path, tokens = _open_tokens(token_file)
    available = _n_windows(path, tokens, ctx_len)
    if not 0 < n <= available:
        raise UserError(f"asked for {n} validation windows but {path} has {available} of {ctx_len} tokens")
    return np.asarray(tokens[: n * ctx_len], dtype=np.int32).reshape(n, ctx_len)


def token_caches(data_cfg, tokenizer) -> tuple[Path, Path]:
    """The train and validation caches of a `DataConfig` (built once, reused while sources and tokenizer agree)."""
    root = Path(data_cfg.cache_dir)
    train = tokenize_to_cache(data_cfg.train, tokenizer, root / "train", text_field=data_cfg.text_field)
    val = tokenize_to_cache(data_cfg.validation, tokenizer, root / "validation", text_field=data_cfg.text_field)
    return train, val


def subject_tokenizer_path(checkpoint_folder: Path, fallback: str) -> Path:
    """The subject model's own tokenizer.json when its folder has one (HF checkpoints do), else `fallback`."""
    own = Path(checkpoint_folder) / "tokenizer.json"
    return own if own.exists() else Path(fallback)
