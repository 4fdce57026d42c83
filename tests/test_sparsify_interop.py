"""Interop with EleutherAI's sparsify: same files, same forward, same gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sparsify = pytest.importorskip("sparsify")
torch = pytest.importorskip("torch")

from nlrw_jax.errors import UserError  # noqa: E402
from nlrw_jax.sparse import coder as C  # noqa: E402
from nlrw_jax.sparse.sparsify_format import load_sparsify, save_sparsify  # noqa: E402

D, N, K, T = 32, 256, 8, 48


def _ours(kind, skip, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    p = C.init_coder(ks[0], D, N, kind=kind, skip=skip)
    p["W_dec"] = jax.random.normal(ks[1], (N, D)) * 0.3
    p["b_dec"] = jax.random.normal(ks[2], (D,)) * 0.1
    p["b_enc"] = jax.random.normal(ks[3], (N,)) * 0.05
    if skip:
        p["W_skip"] = jax.random.normal(ks[4], (D, D)) * 0.1
    return p


def _xy(seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((T, D)).astype(np.float32)
    y = np.tanh(x @ g.standard_normal((D, D)).astype(np.float32) * 0.5).astype(np.float32)
    return x, y


def _by_index(acts, idx):
    """sparsify's topk is unsorted: order each token's picks by latent index."""
    acts, idx = np.asarray(acts), np.asarray(idx)
    o = np.argsort(idx, axis=1)
    return np.take_along_axis(acts, o, 1), np.take_along_axis(idx, o, 1)


def _compare(sc, params, kind, x, y):
    with torch.no_grad():
        ref = sc(torch.from_numpy(x), torch.from_numpy(y) if kind == "transcoder" else None)
    ours = C.forward(params, jnp.asarray(x), sc.cfg.k, kind=kind)
    np.testing.assert_allclose(np.asarray(ours["out"]), ref.sae_out.numpy(), rtol=1e-5, atol=1e-5)
    a1, i1 = _by_index(ours["top_acts"], ours["top_indices"])
    a2, i2 = _by_index(ref.latent_acts.numpy(), ref.latent_indices.numpy())
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-5)
    _, m = C.loss_fn(params, jnp.asarray(x), jnp.asarray(y if kind == "transcoder" else x), sc.cfg.k, kind=kind)
    np.testing.assert_allclose(float(m["fvu"]), float(ref.fvu), rtol=1e-5)


@pytest.mark.parametrize("kind,skip", [("transcoder", True), ("transcoder", False), ("sae", False)])
def test_ours_loads_in_sparsify(tmp_path, kind, skip):
    p = _ours(kind, skip)
    save_sparsify(p, tmp_path / "layer", k=K, kind=kind, d_in=D, num_latents=N, extra_cfg={"note": "x"})
    cfg = json.loads((tmp_path / "layer" / "cfg.json").read_text())
    assert cfg["transcode"] == (kind == "transcoder") and cfg["skip_connection"] == skip and cfg["d_in"] == D
    sc = sparsify.SparseCoder.load_from_disk(tmp_path / "layer")
    assert sc.num_latents == N and sc.cfg.k == K and (sc.W_skip is not None) == skip
    np.testing.assert_array_equal(sc.encoder.weight.detach().numpy(), np.asarray(p["W_enc"]))
    x, y = _xy()
    _compare(sc, p, kind, x, y)
    # Round trip through our loader, and overwrite in place.
    q, meta = load_sparsify(tmp_path / "layer")
    assert meta["k"] == K and meta["kind"] == kind and meta["d_in"] == D and meta["num_latents"] == N
    for name in p:
        np.testing.assert_array_equal(np.asarray(q[name]), np.asarray(p[name]))
    save_sparsify(q, tmp_path / "layer", k=K + 1, kind=kind, d_in=D, num_latents=N)
    assert load_sparsify(tmp_path / "layer")[1]["k"] == K + 1
    assert [f.name for f in tmp_path.iterdir()] == ["layer"]  # no temp folders left behind


def _sparsify_coder(kind, skip, seed=0):
    torch.manual_seed(seed)
    cfg = sparsify.SparseCoderConfig(k=K, num_latents=N, transcode=kind == "transcoder", skip_connection=skip)
    sc = sparsify.SparseCoder(D, cfg)
    with torch.no_grad():
        sc.W_dec.normal_(0, 0.3)
        sc.b_dec.normal_(0, 0.1)
        sc.encoder.bias.normal_(0, 0.05)
        if skip:
            sc.W_skip.normal_(0, 0.1)
    return sc


@pytest.mark.parametrize("kind,skip", [("transcoder", True), ("sae", False)])
def test_sparsify_files_load_here(tmp_path, kind, skip):
    sc = _sparsify_coder(kind, skip)
    sc.save_to_disk(tmp_path / "hook")
    p, meta = load_sparsify(tmp_path / "hook")
    assert meta == dict(k=K, kind=kind, d_in=D, num_latents=N, skip=skip, cfg=meta["cfg"])
    assert set(p) == ({"W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if skip else set()))
    x, y = _xy(2)
    _compare(sc, p, kind, x, y)


def test_gradients_match_sparsify():
    """jax.grad(loss_fn) == sparsify's backward of fvu + alpha * auxk (FusedEncoder included)."""
    sc = _sparsify_coder("transcoder", True, seed=3)
    x, y = _xy(4)
    dead = np.arange(N) % 4 == 0
    out = sc(torch.from_numpy(x), torch.from_numpy(y), dead_mask=torch.from_numpy(dead))
    (out.fvu + 0.5 * out.auxk_loss).backward()
    params = {"W_enc": sc.encoder.weight, "b_enc": sc.encoder.bias, "W_dec": sc.W_dec, "b_dec": sc.b_dec,
              "W_skip": sc.W_skip}
    p = {name: jnp.asarray(t.detach().numpy()) for name, t in params.items()}
    g, m = jax.grad(lambda p: C.loss_fn(p, jnp.asarray(x), jnp.asarray(y), K, dead_mask=jnp.asarray(dead),
                                        auxk_alpha=0.5), has_aux=True)(p)
    np.testing.assert_allclose(float(m["auxk"]), float(out.auxk_loss.detach()), rtol=1e-5)
    for name, t in params.items():
        np.testing.assert_allclose(np.asarray(g[name]), t.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_bad_files(tmp_path):
    p = _ours("transcoder", True)
    good = save_sparsify(p, tmp_path / "good", k=K, kind="transcoder", d_in=D, num_latents=N)

    with pytest.raises(UserError, match="cfg.json"):
        load_sparsify(tmp_path / "nothing")

    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cfg.json"):
        load_sparsify(bad)

    cut = save_sparsify(p, tmp_path / "cut", k=K, kind="transcoder", d_in=D, num_latents=N)
    blob = (cut / "sae.safetensors").read_bytes()
    (cut / "sae.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="sae.safetensors"):
        load_sparsify(cut)

    missing = save_sparsify(p, tmp_path / "missing", k=K, kind="transcoder", d_in=D, num_latents=N)
    (missing / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="sae.safetensors"):
        load_sparsify(missing)

    cfg = json.loads((good / "cfg.json").read_text())
    (good / "cfg.json").write_text(json.dumps({**cfg, "d_in": D * 2}))
    with pytest.raises(UserError, match="shape"):
        load_sparsify(good)
    (good / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(UserError, match="groupmax"):
        load_sparsify(good)
    (good / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": False}))
    with pytest.raises(UserError, match="W_skip"):
        load_sparsify(good)

    with pytest.raises(UserError, match="shape"):
        save_sparsify(p, tmp_path / "x", k=K, kind="transcoder", d_in=D, num_latents=N * 2)
    with pytest.raises(UserError, match="k=999"):
        save_sparsify(p, tmp_path / "x", k=999, kind="transcoder", d_in=D, num_latents=N)
    assert not (tmp_path / "x").exists()
