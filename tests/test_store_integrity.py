"""A damaged activation store is refused, not read; a model is identified by its content. CPU, seconds."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nlrw_jax.data import capture as A
from nlrw_jax.data import store as St
from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoXConfig, init_params

CTX, N_WIN, CHUNK_WIN = 8, 10, 2  # two hosts of 5 windows: chunks of 2, 2, 1 windows (16, 16, 8 rows)
HOST_ROWS, CHUNK_ROWS = 5 * CTX, CHUNK_WIN * CTX
TINY = dict(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32)
TINY_PYTHIA = Path(__file__).resolve().parents[1] / "assets" / "tiny-pythia" / "final"
DAMAGED = "the store is damaged; delete it and rerun nlrw capture"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    config = GPTNeoXConfig(**TINY)
    model = (config, init_params(config, seed=0))
    windows = np.random.default_rng(0).integers(0, TINY["vocab_size"], (N_WIN, CTX)).astype(np.int32)
    path = tmp_path_factory.mktemp("stores") / "intact"
    for p in (0, 1):
        A.capture(model, windows, path, layer=0, batch_size=2, chunk_windows=CHUNK_WIN, progress=False,
                  process_index=p, process_count=2)
    return path


@pytest.fixture
def copy(intact, tmp_path):
    """A fresh copy of the intact store, to damage."""
    return Path(shutil.copytree(intact, tmp_path / "store"))


def flip_byte(f: Path, offset: int | None = None):
    data = bytearray(f.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    f.write_bytes(bytes(data))


def all_batches(store, point):
    return list(store.batches([point], 8, seed=0, buffer_chunks=2, epochs=1))


# --------------------------------------------------------------------------- chunk checksums


def test_intact_store_is_checked_once_per_chunk(intact, monkeypatch):
    s = St.open_store(intact)
    marker = json.loads((intact / "host001" / "done" / "000002").read_text())
    assert sorted(marker["sha256"]) == ["mlp_in", "mlp_out", "tokens"]
    part = s.read("mlp_in", 37, 45)  # across the hosts: checks host000 chunk 2 and host001 chunk 0, whole
    assert s._verified == {(0, 2, "mlp_in"), (1, 0, "mlp_in")}
    whole = s.read("mlp_in", 0, s.num_tokens)
    np.testing.assert_array_equal(part, whole[37:45])
    assert s._verified == {(h, c, "mlp_in") for h in (0, 1) for c in range(3)}
    tokens = s.tokens(0, s.num_tokens)
    assert len(all_batches(s, "mlp_out")) == N_WIN * CTX // 8
    assert s._verified == {(h, c, n) for h in (0, 1) for c in range(3) for n in ("mlp_in", "mlp_out", "tokens")}

    # Verified chunks are not hashed again.
    monkeypatch.setattr(A, "_digest", lambda a: pytest.fail("a verified chunk was hashed again"))
    np.testing.assert_array_equal(s.read("mlp_in", 3, 70), whole[3:70])
    np.testing.assert_array_equal(s.tokens(17, 18), tokens[17:18])
    all_batches(s, "mlp_in")


def test_flipped_byte_is_caught_on_read_and_in_batches(copy):
    flip_byte(copy / "host001" / "mlp_in" / "c" / "1" / "0")
    s = St.open_store(copy)
    s.read("mlp_in", 0, HOST_ROWS)  # host000 is intact
    s.read("mlp_out", 0, s.num_tokens)  # so is every other array
    first = HOST_ROWS + CHUNK_ROWS  # host001 chunk 1: a read of two of its rows checks all of it
    with pytest.raises(UserError, match=r"chunk 1 of host001 \(mlp_in\) fails its checksum") as e:
        s.read("mlp_in", first + 3, first + 5)
    assert str(e.value) == f"activation store {copy}: chunk 1 of host001 (mlp_in) fails its checksum: {DAMAGED}"
    with pytest.raises(UserError, match=r"chunk 1 of host001 \(mlp_in\) fails its checksum"):
        all_batches(St.open_store(copy), "mlp_in")

    flip_byte(copy / "host000" / "tokens" / "c" / "2", offset=0)  # the short last chunk
    with pytest.raises(UserError, match=r"chunk 2 of host000 \(tokens\) fails its checksum"):
        s.tokens(0, HOST_ROWS)


def test_deleted_chunk_file_is_caught(copy):
    (copy / "host000" / "mlp_out" / "c" / "0" / "0").unlink()  # zarr would read zeros
    s = St.open_store(copy)
    with pytest.raises(UserError, match=r"chunk 0 of host000 \(mlp_out\) fails its checksum"):
        s.read("mlp_out", 0, 4)
    with pytest.raises(UserError, match=r"chunk 0 of host000 \(mlp_out\) fails its checksum"):
        all_batches(St.open_store(copy), "mlp_out")


def test_other_damage_is_a_one_line_user_error(copy):
    (copy / "host000" / "done" / "000001").write_text("{}")
    (copy / "host001" / "mlp_in" / "c" / "0" / "0").write_bytes(b"short")
    s = St.open_store(copy)
    with pytest.raises(UserError, match=r"chunk 1 of host000 \(mlp_out\) has a missing or unreadable done marker"):
        s.read("mlp_out", CHUNK_ROWS, CHUNK_ROWS + 1)
    with pytest.raises(UserError, match=rf"host001 \(mlp_in\) cannot be read: .*host001/mlp_in/c/0/0.*; {DAMAGED}") as e:
        s.read("mlp_in", HOST_ROWS, HOST_ROWS + 1)
    assert "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)

    (copy / "host000" / "tokens" / "zarr.json").write_text("{")
    with pytest.raises(UserError, match=r"cannot open host000/tokens: .*Invalid JSON"):
        St.open_store(copy)

    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))  # markers without checksums
    with pytest.raises(UserError, match=rf"has version 1, expected {St.STORE_VERSION}"):
        St.open_store(copy)


# --------------------------------------------------------------------------- model identity


def test_model_identity_is_its_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    shutil.copytree(TINY_PYTHIA, a)
    shutil.copytree(TINY_PYTHIA, b)
    assert hf.content_hash(a) == hf.content_hash(b) == hf.content_hash(TINY_PYTHIA)
    misses = hf._file_sha256.cache_info().misses
    hf.content_hash(a)
    assert hf._file_sha256.cache_info().misses == misses  # memoized: nothing read again

    # One byte in the middle of the weights (far from both ends, same size).
    weights = b / "model.safetensors"
    st = weights.stat()
    assert st.st_size > 4 << 20
    flip_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtimes tick coarsely: make the write visible
    assert hf.content_hash(b) != hf.content_hash(a)

    # The store records the content hash; a copy of the model in another place resumes the same capture.
    windows = np.random.default_rng(0).integers(0, 8192, (4, CTX)).astype(np.int32)
    store = tmp_path / "store"
    A.capture(str(a), windows, store, layer=0, points=["mlp_out"], batch_size=2, chunk_windows=2, progress=False)
    assert St.open_store(store).manifest["model_sha256"] == hf.content_hash(a)
    shutil.rmtree(a)
    c = Path(shutil.copytree(TINY_PYTHIA, tmp_path / "c"))
    A.capture(str(c), windows, store, layer=0, points=["mlp_out"], batch_size=2, chunk_windows=2, progress=False)
    with pytest.raises(UserError, match="different model_sha256"):
        A.capture(str(b), windows, store, layer=0, points=["mlp_out"], batch_size=2, chunk_windows=2, progress=False)
