"""Token cache + grain window pipeline (nlrw_jax.data.tokens). CPU, a few seconds."""

import json
import lzma
import os
import random
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nlrw_jax.data import tokens as T
from nlrw_jax.errors import UserError

WORDS = "the a cat dog sat ran on under mat tree quickly slowly red blue big small and then".split()


def make_texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "." for _ in range(n)]


def make_tokenizer(vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_texts(300, seed=1), trainer)
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tok):
    """A cache of 200 documents (~5k tokens) written as jsonl."""
    d = tmp_path_factory.mktemp("cache")
    src = d / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(200)))
    return T.tokenize_to_cache([str(src)], tok, d / "cache", progress=False)


def take(it, n):
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- cache


def test_all_source_kinds_tokenize_identically(tmp_path, tok):
    texts = make_texts(40)
    # Expected stream: each document's ids, then EOS (id 0).
    expected = np.concatenate(
        [ids + [0] for ids in (tok.encode(t, add_special_tokens=False).ids for t in texts)]
    )

    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):  # a .txt file is one document; the glob is read in sorted order
        (txt_dir / f"doc_{i:03d}.txt").write_text(t, encoding="utf-8")
    lines = "".join(json.dumps({"body": t}) + "\n" for t in texts)
    (tmp_path / "c.jsonl").write_text(lines)
    with lzma.open(tmp_path / "c.jsonl.xz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet", row_group_size=7)

    specs = {
        "txt": [str(txt_dir / "*.txt")],
        "jsonl": [str(tmp_path / "c.jsonl")],
        "xz": [str(tmp_path / "c.jsonl.xz")],
        "parquet": [str(tmp_path / "c.parquet")],
    }
    for name, sources in specs.items():
        path = T.tokenize_to_cache(
            sources, tok, tmp_path / f"cache_{name}", text_field="body", progress=False
        )
        got = np.load(path)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, expected, err_msg=name)
        m = T.read_manifest(path.parent)
        assert m["token_count"] == len(expected) and m["document_count"] == 40 and m["dtype"] == "uint16"
        assert m["sources"] == sources and m["version"] == T.CACHE_VERSION

    # Several sources are concatenated in order.
    path = T.tokenize_to_cache(
        specs["jsonl"] + specs["parquet"], tok, tmp_path / "both", text_field="body", progress=False
    )
    np.testing.assert_array_equal(np.load(path), np.concatenate([expected, expected]))


def test_cache_reused_and_rebuilt_on_new_tokenizer(tmp_path, tok):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(30)))
    out = tmp_path / "cache"
    path = T.tokenize_to_cache([str(src)], tok, out, progress=False)
    st = os.stat(path)

    path2 = T.tokenize_to_cache([str(src)], tok, out, progress=False)
    st2 = os.stat(path2)
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # not rewritten

    old_hash = T.read_manifest(out)["tokenizer_sha256"]
    tok2 = make_tokenizer(vocab_size=280)
    path3 = T.tokenize_to_cache([str(src)], tok2, out, progress=False)
    assert os.stat(path3).st_ino != st.st_ino  # rebuilt and swapped in
    assert T.read_manifest(out)["tokenizer_sha256"] != old_hash
    expected = np.concatenate([tok2.encode(t, add_special_tokens=False).ids + [0] for t in make_texts(30)])
    np.testing.assert_array_equal(np.load(path3), expected)
    # Only the cache is left in the parent: no temp or stale directories.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "cache"]


def test_cache_identity_is_content_not_paths_or_times(tmp_path, tok, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, t in enumerate(make_texts(12)):
        (corpus / f"doc_{i:02d}.txt").write_text(t)
    (corpus / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(20, seed=3)))

    def sources(folder):
        return [str(folder / "*.txt"), str(folder / "more.jsonl")]

    out = tmp_path / "cache"
    path = T.tokenize_to_cache(sources(corpus), tok, out, progress=False)
    ident, st = T.cache_identity(path), os.stat(path)

    def reused(p):
        s = os.stat(p)
        return (s.st_ino, s.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    # Touched: new mtimes, same bytes -> the cache is kept, and so is its identity.
    for f in corpus.iterdir():
        fs = f.stat()
        os.utime(f, ns=(fs.st_atime_ns, fs.st_mtime_ns + 10**9))
    assert reused(T.tokenize_to_cache(sources(corpus), tok, out, progress=False))
    assert T.cache_identity(out) == T.cache_identity(path.parent) == ident
    with monkeypatch.context() as m:  # the new times are recorded: the next call hashes nothing
        m.setattr(T, "_content", lambda p: pytest.fail(f"{p} was hashed again"))
        assert reused(T.tokenize_to_cache(sources(corpus), tok, out, progress=False))

    # Copied elsewhere (new paths, new mtimes) -> the same identity, and the cache is kept.
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(corpus, copy, copy_function=shutil.copyfile)
    fresh = T.tokenize_to_cache(sources(copy), tok, tmp_path / "fresh", progress=False)
    assert T.cache_identity(fresh) == ident
    assert reused(T.tokenize_to_cache(sources(copy), tok, out, progress=False))
    assert T.read_manifest(out)["sources"] == sources(copy) and T.cache_identity(out) == ident

    # One changed byte -> rebuilt, another identity.
    doc = copy / "doc_03.txt"
    text = doc.read_bytes()
    doc.write_bytes(text[:5] + (b"x" if text[5:6] != b"x" else b"y") + text[6:])
    rebuilt = T.tokenize_to_cache(sources(copy), tok, out, progress=False)
    assert os.stat(rebuilt).st_ino != st.st_ino and T.cache_identity(out) != ident
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus", "elsewhere", "fresh"]  # no temp files


def test_half_written_cache_is_rebuilt_and_failed_build_leaves_nothing(tmp_path, tok):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "the cat sat."}) + "\n")
    out = tmp_path / "cache"
    out.mkdir()
    np.save(out / "tokens.npy", np.zeros(3, np.uint16))  # crash before manifest was written
    assert T.read_manifest(out) is None
    path = T.tokenize_to_cache([str(src)], tok, out, progress=False)
    assert T.read_manifest(out)["token_count"] == len(np.load(path)) > 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": 1}) + "\n")
    with pytest.raises(UserError):
        T.tokenize_to_cache([str(bad)], tok, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a token cache"):
        T.tokenize_to_cache([str(src)], tok, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_source_errors(tmp_path, tok, monkeypatch):
    out = tmp_path / "cache"
    with pytest.raises(UserError, match="nope.jsonl"):
        T.tokenize_to_cache([str(tmp_path / "nope.jsonl")], tok, out, progress=False)
    with pytest.raises(UserError, match=r"no files match"):
        T.tokenize_to_cache([str(tmp_path / "*.parquet")], tok, out, progress=False)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: .*'text'") as e:
        T.tokenize_to_cache([str(bad)], tok, out, progress=False)
    assert "\n" not in str(e.value)

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p\.parquet: no column 'text'"):
        T.tokenize_to_cache([str(tmp_path / "p.parquet")], tok, out, progress=False)

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(UserError, match=r"empty corpus.*empty\.jsonl"):
        T.tokenize_to_cache([str(empty)], tok, out, progress=False)

    for name in ("junk.jsonl.xz", "junk.parquet"):  # unreadable (corrupt) files
        (tmp_path / name).write_bytes(b"not really " + name.encode())
        with pytest.raises(UserError, match=rf"cannot read .*{name}") as e:
            T.tokenize_to_cache([str(tmp_path / name)], tok, out, progress=False)
        assert "\n" not in str(e.value)

    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"x\.csv: unsupported"):
        T.tokenize_to_cache([str(tmp_path / "x.csv")], tok, out, progress=False)

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(UserError, match=r"'datasets' package"):
        T.tokenize_to_cache(["hf:some/corpus:train"], tok, out, progress=False)
    with pytest.raises(UserError, match=r"hf:NAME"):
        T.tokenize_to_cache(["hf:only-a-name"], tok, out, progress=False)


# --------------------------------------------------------------------------- windows


def test_windows_cover_stream_without_overlap(cache):
    stream = np.load(cache)
    ctx = 64
    n = len(stream) // ctx
    ds = T.window_dataset(cache, ctx, seed=0, shuffle=False, num_epochs=1)
    windows = np.stack(list(iter(ds)))
    assert windows.shape == (n, ctx) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows.reshape(-1), stream[: n * ctx])

    # Shuffled, one epoch, batched: each window exactly once.
    ds = T.window_dataset(cache, ctx, seed=3, batch_size=4, num_epochs=1)
    batches = list(iter(ds))
    assert all(b.shape == (4, ctx) for b in batches) and len(batches) == n // 4
    got = np.concatenate(batches)
    assert len({w.tobytes() for w in got}) == len(got)
    assert {w.tobytes() for w in got} <= {w.tobytes() for w in windows}

    np.testing.assert_array_equal(T.validation_windows(cache, ctx, 5), windows[:5])
    held_out = T.window_dataset(cache, ctx, seed=0, skip_windows=5, num_epochs=1)
    assert not {w.tobytes() for w in windows[:5]} & {w.tobytes() for w in iter(held_out)}


def test_shuffle_determinism_and_per_epoch_reshuffle(cache):
    def order(seed, epochs=1):
        return np.stack(list(iter(T.window_dataset(cache, 64, seed=seed, num_epochs=epochs))))

    np.testing.assert_array_equal(order(7), order(7))
    assert not np.array_equal(order(7), order(8))
    two = order(7, epochs=2)
    first, second = np.split(two, 2)
    np.testing.assert_array_equal(first, order(7))
    assert not np.array_equal(first, second)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # same windows, new order


def test_multi_host_equals_single_host(cache):
    B, P, steps = 3, 2, 6
    single = iter(T.window_dataset(cache, 32, seed=5, batch_size=B * P))
    hosts = [
        iter(T.window_dataset(cache, 32, seed=5, batch_size=B, process_index=p, process_count=P))
        for p in range(P)
    ]
    for _ in range(steps):
        g = next(single)
        parts = [next(h) for h in hosts]
        assert all(p.shape == (B, 32) for p in parts)
        # Documented layout: host p holds rows [p*B, (p+1)*B) of the global batch.
        np.testing.assert_array_equal(np.concatenate(parts), g)
        assert not {w.tobytes() for w in parts[0]} & {w.tobytes() for w in parts[1]}


def test_resume_from_state_is_bitwise(cache, tmp_path):
    def fresh():
        return T.window_iterator(T.window_dataset(cache, 32, seed=11, batch_size=4), prefetch=3)

    it = fresh()
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # JSON-safe
    after = take(it, 5)

    it2 = fresh()
    it2.set_state(state)
    for a, b in zip(after, take(it2, 5)):
        np.testing.assert_array_equal(a, b)

    # Across an epoch boundary (n_windows // 4 steps per epoch).
    it = fresh()
    steps_per_epoch = len(np.load(cache)) // 32 // 4
    take(it, steps_per_epoch - 2)
    state = it.get_state()
    after = take(it, 5)
    it2 = fresh()
    it2.set_state(state)
    for a, b in zip(after, take(it2, 5)):
        np.testing.assert_array_equal(a, b)


def test_resume_via_orbax(cache, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")

    def fresh():
        return iter(T.window_dataset(cache, 32, seed=2, batch_size=2))

    it = fresh()
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=T.GrainCheckpointSave(it)))
        mngr.wait_until_finished()
    after = take(it, 5)

    it2 = fresh()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=T.GrainCheckpointRestore(it2)))
    for a, b in zip(after, take(it2, 5)):
        np.testing.assert_array_equal(a, b)


def test_window_errors(cache, tmp_path):
    n_tokens = len(np.load(cache))
    with pytest.raises(UserError, match=rf"ctx_len {n_tokens + 1} is larger than the corpus .*tokens\.npy"):
        T.window_dataset(cache, n_tokens + 1, seed=0)
    with pytest.raises(UserError, match=r"batch_size .* windows per step"):
        T.window_dataset(cache, n_tokens // 3, seed=0, batch_size=2, process_count=2)
    with pytest.raises(UserError, match=r"token file not found: .*missing\.npy"):
        T.window_dataset(tmp_path / "missing.npy", 8, seed=0)
    with pytest.raises(UserError, match=r"validation windows"):
        T.validation_windows(cache, 64, 10**6)
    # A cache directory works as well as its tokens.npy.
    assert T.window_dataset(cache.parent, 8, seed=0, batch_size=2)[0].shape == (2, 8)
