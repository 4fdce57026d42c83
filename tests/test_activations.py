"""Activation store + capture (nlrw_jax.data.store, nlrw_jax.data.capture) on a tiny random GPT-NeoX. CPU, ~1 minute."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nlrw_jax.data import capture as A
from nlrw_jax.data import store as St
from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig, init_params

CTX, N_WIN, CHUNK_WIN, BATCH, LAYER = 16, 12, 4, 3, 1
TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


def make_model(folder, seed=0, **overrides):
    config = GPTNeoXConfig(**{**TINY, **overrides})
    return hf.save(config, init_params(config, seed=seed), folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (N_WIN, CTX)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(model_dir, windows):
    """The model's own intermediates at LAYER (full forward, no last_layer), [N_WIN*CTX, d]."""
    config, params = hf.load(model_dir)
    _, got = GPTNeoX(config).apply({"params": params}, jnp.asarray(windows),
                                   capture=[(LAYER, "mlp_in"), (LAYER, "mlp_out"), (LAYER, "resid_post")])
    return {name: np.asarray(got[(LAYER, name)]).reshape(-1, config.hidden_size) for _, name in got}


def run_capture(model, windows, store, **kw):
    kw = {"layer": LAYER, "batch_size": BATCH, "chunk_windows": CHUNK_WIN, "progress": False, **kw}
    return A.capture(model, windows, store, **kw)


@pytest.fixture(scope="module")
def store(model_dir, windows, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "fp32"
    run_capture(model_dir, windows, path)
    return path


def markers(path, host=0):
    """Done markers; the file kvstore's transient lock/temp files are not markers."""
    d = Path(path) / f"host{host:03d}" / "done"
    return sorted(f for f in os.listdir(d) if f.isdigit()) if d.exists() else []


# --------------------------------------------------------------------------- capture


def test_store_equals_model_intermediates(store, windows, reference):
    s = St.open_store(store)
    assert (s.num_tokens, s.d_model, s.points) == (N_WIN * CTX, 32, ["mlp_in", "mlp_out"])
    assert len(s.chunks) == 3 and markers(store) == ["000000", "000001", "000002"]
    for p in ("mlp_in", "mlp_out"):
        got = s.read(p, 0, s.num_tokens)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, reference[p], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s.read(p, 50, 130), got[50:130])  # across a chunk boundary
    np.testing.assert_array_equal(s.tokens(0, s.num_tokens), windows.reshape(-1))
    m = s.manifest
    assert (m["layer"], m["dtype"], m["ctx_len"], m["chunk_tokens"], m["d_model"]) == (LAYER, "float32", CTX, 64, 32)
    assert m["model_path"] and m["model_sha256"] and m["windows"]["num_windows"] == N_WIN


def test_bf16_store_and_sae_point(model_dir, windows, reference, tmp_path):
    run_capture(model_dir, windows, tmp_path / "bf16", dtype="bfloat16", points=["resid_post"])
    s = St.open_store(tmp_path / "bf16")
    assert s.dtype == "bfloat16" and s.points == ["resid_post"]
    got = s.read("resid_post", 0, s.num_tokens)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, got.astype(jnp.bfloat16).astype(np.float32))  # bf16 values
    np.testing.assert_allclose(got, reference["resid_post"], rtol=1e-2, atol=1e-2)
    zarr_chunk = next((tmp_path / "bf16" / "host000" / "resid_post").rglob("c/0/0"))
    assert zarr_chunk.stat().st_size == CHUNK_WIN * CTX * 32 * 2  # stored as 2 bytes, uncompressed


def test_capture_from_iterable_equals_array(model_dir, windows, store, tmp_path):
    batches = [windows[i:i + 5] for i in range(0, N_WIN, 5)] + [windows[:5]]  # 5, 5, 2, 5: not chunk sized; extra ignored
    run_capture(model_dir, batches, tmp_path / "it", num_windows=N_WIN)
    a, b = St.open_store(store), St.open_store(tmp_path / "it")
    for p in a.points:
        np.testing.assert_array_equal(a.read(p, 0, a.num_tokens), b.read(p, 0, b.num_tokens))
    # Resuming with other windows is caught by the stored tokens.
    (tmp_path / "it" / "host000" / "done" / "000002").unlink()
    other = windows[::-1].copy()
    with pytest.raises(UserError, match="other tokens"):
        run_capture(model_dir, iter([other]), tmp_path / "it", num_windows=N_WIN)


def test_two_hosts_concatenate_to_one(model_dir, windows, store, tmp_path):
    for p in (0, 1):
        run_capture(model_dir, windows, tmp_path / "mh", process_index=p, process_count=2)
    assert markers(tmp_path / "mh", 0) == markers(tmp_path / "mh", 1) == ["000000", "000001"]
    a, b = St.open_store(store), St.open_store(tmp_path / "mh")
    assert b.num_tokens == a.num_tokens and len(b.chunks) == 4
    np.testing.assert_array_equal(a.read("mlp_out", 0, a.num_tokens), b.read("mlp_out", 0, b.num_tokens))
    np.testing.assert_array_equal(b.tokens(0, b.num_tokens), windows.reshape(-1))


# --------------------------------------------------------------------------- errors


def test_manifest_mismatches_are_user_errors(model_dir, windows, store, tmp_path):
    with pytest.raises(UserError, match=r"different layer \(store: 1, now: 0\)"):
        run_capture(model_dir, windows, store, layer=0)
    with pytest.raises(UserError, match="different dtype"):
        run_capture(model_dir, windows, store, dtype="bfloat16")
    other = make_model(tmp_path / "other", seed=1)  # same shapes and file sizes, other weights
    with pytest.raises(UserError, match="different model_sha256"):
        run_capture(other, windows, store)
    wide = make_model(tmp_path / "wide", hidden_size=64)
    with pytest.raises(UserError, match="d_model"):
        run_capture(wide, windows, store)
    with pytest.raises(UserError, match="different windows"):
        run_capture(model_dir, windows[:8], store)
    with pytest.raises(UserError, match=r"layer 2 is out of range: the model has layers 0\.\.1"):
        run_capture(model_dir, windows, tmp_path / "x", layer=2)
    assert not (tmp_path / "x").exists()  # nothing written for a bad request
    run_capture(model_dir, windows, store)  # the matching request still resumes (a no-op)


def test_incomplete_store_refuses_to_read(model_dir, windows, store, tmp_path):
    import shutil
    path = tmp_path / "s"
    shutil.copytree(store, path)
    (path / "host000" / "done" / "000001").unlink()  # as if killed between the data and the marker
    with pytest.raises(UserError, match="is incomplete: 2 of 3 chunks"):
        St.open_store(path)
    with pytest.raises(UserError, match="not an activation store"):
        St.open_store(tmp_path / "nothing")
    run_capture(model_dir, windows, path)  # recomputes only chunk 1
    np.testing.assert_array_equal(St.open_store(path).read("mlp_in", 0, N_WIN * CTX),
                                  St.open_store(store).read("mlp_in", 0, N_WIN * CTX))


# --------------------------------------------------------------------------- kill and resume

_CAPTURE = """
import sys, time
import numpy as np
import nlrw_jax.data.capture as A
model, windows, store, layer, chunk, slow = sys.argv[1:]
if slow == "slow":  # a slow model: the kill lands mid-run
    orig = A.forward_fn
    def slowed(*a, **k):
        f = orig(*a, **k)
        return lambda p, x: (time.sleep(0.15), f(p, x))[1]
    A.forward_fn = slowed
A.capture(model, np.load(windows), store, layer=int(layer), batch_size=1, chunk_windows=int(chunk), progress=False)
"""


def test_kill_mid_capture_and_rerun(model_dir, tmp_path):
    n, chunk = 40, 1
    wins = np.random.default_rng(1).integers(0, TINY["vocab_size"], (n, CTX)).astype(np.int32)
    np.save(tmp_path / "w.npy", wins)
    store = tmp_path / "killed"
    args = [str(model_dir), str(tmp_path / "w.npy"), str(store), str(LAYER), str(chunk)]
    proc = subprocess.Popen([sys.executable, "-c", _CAPTURE, *args, "slow"])
    tok_dir = store / "host000" / "tokens" / "c"

    def data():
        return len([f for f in tok_dir.iterdir() if f.name.isdigit()]) if tok_dir.exists() else 0

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # Kill while some chunk's data is written but its marker is not (the next forward is running).
        if len(markers(store)) >= 2 and data() > len(markers(store)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_markers = len(markers(store))
    assert 1 <= killed_markers < n, f"kill came too late or too early: {killed_markers} of {n} chunks"
    data_chunks = data()
    assert data_chunks > killed_markers  # a chunk with data but no marker: it must count as not done
    with pytest.raises(UserError, match=f"incomplete: {killed_markers} of {n} chunks"):
        St.open_store(store)

    subprocess.run([sys.executable, "-c", _CAPTURE, *args, "fast"], check=True)  # rerun
    run_capture(model_dir, wins, tmp_path / "clean", batch_size=1, chunk_windows=chunk)  # uninterrupted
    a, b = St.open_store(store), St.open_store(tmp_path / "clean")
    assert a.manifest == b.manifest
    assert markers(store) == markers(tmp_path / "clean") == [f"{c:06d}" for c in range(n)]
    for p in ("mlp_in", "mlp_out"):
        np.testing.assert_array_equal(a.read(p, 0, a.num_tokens), b.read(p, 0, b.num_tokens))
    np.testing.assert_array_equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    print(f"killed after {killed_markers} of {n} chunks ({data_chunks} chunks of data on disk)")


# --------------------------------------------------------------------------- reading batches


def test_batches_deterministic_and_resumable(store):
    s = St.open_store(store)
    all_in = s.read("mlp_in", 0, s.num_tokens)

    def take(it, k):
        return [next(it) for _ in range(k)]

    first = take(s.batches(["mlp_in", "mlp_out"], 40, seed=3, buffer_chunks=2), 12)  # > 2 epochs of 192 rows
    again = take(s.batches(["mlp_in", "mlp_out"], 40, seed=3, buffer_chunks=2), 12)
    other = take(s.batches(["mlp_in", "mlp_out"], 40, seed=4, buffer_chunks=2), 12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["mlp_in"], b["mlp_in"])
        np.testing.assert_array_equal(a["mlp_out"], b["mlp_out"])
    assert not np.array_equal(first[0]["mlp_in"], other[0]["mlp_in"])
    assert not np.array_equal(first[0]["mlp_in"], all_in[:40])  # shuffled
    # Rows stay paired across points, and one epoch is a permutation of the store.
    epoch = np.concatenate([b["mlp_in"] for b in take(s.batches(["mlp_in"], 64, seed=3, epochs=1), 3)])
    np.testing.assert_array_equal(epoch[np.lexsort(epoch.T)], all_in[np.lexsort(all_in.T)])
    pairs = {tuple(r): tuple(o) for r, o in zip(all_in, s.read("mlp_out", 0, s.num_tokens))}
    assert all(pairs[tuple(r)] == tuple(o) for r, o in zip(first[5]["mlp_in"], first[5]["mlp_out"]))
    # Resume: start_batch, and get_state / set_state on a fresh iterator.
    for k in (1, 4, 5, 9):
        resumed = take(s.batches(["mlp_in", "mlp_out"], 40, seed=3, buffer_chunks=2, start_batch=k), 12 - k)
        for a, b in zip(first[k:], resumed):
            np.testing.assert_array_equal(a["mlp_out"], b["mlp_out"])
    it = s.batches(["mlp_in"], 40, seed=3, buffer_chunks=2)
    take(it, 7)
    state = it.get_state()
    fresh = s.batches(["mlp_in"], 40, seed=3, buffer_chunks=2)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["mlp_in"], first[7]["mlp_in"])
    # No shuffle: the store in order; a finite run drops the last partial batch.
    ordered = list(s.batches(["mlp_in"], 50, shuffle=False, epochs=1))
    assert len(ordered) == 3
    np.testing.assert_array_equal(np.concatenate([b["mlp_in"] for b in ordered]), all_in[:150])


def test_on_the_fly_equals_store(model_dir, windows, store):
    config, params = hf.load(model_dir)
    s = St.open_store(store)
    stored = {p: s.read(p, 0, s.num_tokens) for p in s.points}

    def batches(shuffle):
        window_iter = (windows[i:i + 3] for i in range(0, N_WIN, 3))
        return list(A.on_the_fly(GPTNeoX(config), params, window_iter, LAYER, ["mlp_in", "mlp_out"], 32,
                                 shuffle=shuffle, buffer_tokens=64))

    plain = batches(False)
    assert len(plain) == 6 and plain[0]["mlp_in"].shape == (32, 32)
    for p in s.points:
        np.testing.assert_allclose(np.concatenate([np.asarray(b[p]) for b in plain]), stored[p], rtol=1e-5, atol=1e-5)
    shuffled = batches(True)
    got = np.concatenate([np.asarray(b["mlp_in"]) for b in shuffled])
    assert not np.allclose(got, stored["mlp_in"])
    np.testing.assert_allclose(got[np.lexsort(got.T)], stored["mlp_in"][np.lexsort(stored["mlp_in"].T)],
                               rtol=1e-5, atol=1e-5)


def test_gs_paths_use_the_gcs_kvstore():
    # Only the kvstore spec differs between local and gs:// stores (no network here).
    assert St._kvstore(St._norm("gs://bkt/runs/a/"), "host000/done") == {
        "driver": "gcs", "bucket": "bkt", "path": "runs/a/host000/done/"}
    assert St._kvstore("/x/y", "host000/mlp_in") == {"driver": "file", "path": "/x/y/host000/mlp_in/"}
