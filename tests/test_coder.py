"""TopK transcoder / SAE core: sharded == single device, AuxK, init, decode variants."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # conftest sets it too

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.parallel import make_mesh
from nlrw_jax.sparse import coder as C

# Latent shards of >= 64 columns: XLA:CPU then computes x @ W_enc.T bitwise the same per
# shard as whole (smaller dots take another code path and differ in the last ulp).
D, N, K, T = 32, 512, 8, 64
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
TIED = (5, 170, 400)  # identical encoder rows -> identical pre-activations


def _params(kind="transcoder", skip=True, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    p = C.init_coder(ks[0], D, N, kind=kind, skip=skip)
    p["W_enc"] = p["W_enc"].at[jnp.array(TIED)].set(p["W_enc"][TIED[-1]])
    p["W_dec"] = jax.random.normal(ks[1], (N, D)) * 0.3
    p["b_dec"] = jax.random.normal(ks[2], (D,)) * 0.1
    p["b_enc"] = jax.random.normal(ks[3], (N,)) * 0.05
    p["b_enc"] = p["b_enc"].at[jnp.array(TIED)].set(0.02)
    if skip:
        p["W_skip"] = jax.random.normal(ks[4], (D, D)) * 0.1
    return p


def _data(seed=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (T, D))
    # Make the tied latents win for the first tokens: x along their shared encoder row.
    x = x.at[:8].add(4.0 * _params()["W_enc"][TIED[-1]] / jnp.linalg.norm(_params()["W_enc"][TIED[-1]]))
    y = jnp.tanh(x @ jax.random.normal(ky, (D, D)) * 0.5) + 0.3
    return x, y


DEAD = jnp.arange(N) % 3 == 0


def _loss(kind, mesh, impl="gather"):
    def f(p, x, y):
        C.DECODE_IMPL, old = impl, C.DECODE_IMPL
        try:
            return C.loss_fn(p, x, y, K, kind=kind, dead_mask=DEAD, auxk_alpha=0.5, mesh=mesh)
        finally:
            C.DECODE_IMPL = old
    return f


def test_inputs_have_ties():
    f = jax.jit(lambda p, x: C.forward(p, x, K))(_params(), _data()[0])
    idx = np.asarray(f["top_indices"])
    hits = np.isin(idx, TIED).sum(1)
    assert (hits >= 2).any(), "test data should put several tied latents in one token's top k"
    # The ties resolve to the lower index, like lax.top_k.
    for row in idx[hits >= 2]:
        picked = [i for i in row if i in TIED]
        assert picked == sorted(picked)


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_matches_single_device(shape, kind):
    p, (x, _) = _params(kind), _data()
    ref = jax.jit(lambda p, x: C.forward(p, x, K, kind=kind))(p, x)
    mesh = make_mesh(*shape)
    got = jax.jit(lambda p, x: C.forward(p, x, K, kind=kind, mesh=mesh))(p, x)
    np.testing.assert_array_equal(np.asarray(got["top_indices"]), np.asarray(ref["top_indices"]))
    np.testing.assert_array_equal(np.asarray(got["top_acts"]), np.asarray(ref["top_acts"]))
    np.testing.assert_array_equal(np.asarray(got["pre_acts"]), np.asarray(ref["pre_acts"]))
    np.testing.assert_allclose(np.asarray(got["out"]), np.asarray(ref["out"]), rtol=1e-5, atol=1e-5)
    assert got["top_indices"].dtype == jnp.int32


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_grad_matches_single_device(shape, kind):
    p, (x, y) = _params(kind), _data()
    y = x if kind == "sae" else y
    ref_g, ref_m = jax.jit(jax.grad(_loss(kind, None), has_aux=True))(p, x, y)
    mesh = make_mesh(*shape)
    g, m = jax.jit(jax.grad(_loss(kind, mesh), has_aux=True))(p, x, y)
    np.testing.assert_array_equal(np.asarray(m["top_indices"]), np.asarray(ref_m["top_indices"]))
    np.testing.assert_allclose(float(m["fvu"]), float(ref_m["fvu"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["auxk"]), float(ref_m["auxk"]), rtol=1e-6)
    for name in p:
        np.testing.assert_allclose(np.asarray(g[name]), np.asarray(ref_g[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_topk_ties_match_lax_top_k(shape):
    # Heavy ties everywhere (values in {0, 1, 2, 3}): the merge must pick the same indices.
    v = jax.random.randint(jax.random.PRNGKey(3), (T, N), 0, 4).astype(jnp.float32)
    ref = jax.lax.top_k(v, K)
    got = jax.jit(lambda v: C.topk_latents(v, K, mesh=make_mesh(*shape)))(v)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))


def test_sharded_topk_does_not_gather_pre_acts():
    mesh = make_mesh(2, 4)
    hlo = jax.jit(lambda p, x: C.forward(p, x, K, mesh=mesh)["out"]).lower(_params(), _data()[0]).compile().as_text()
    gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", ln)]
    assert gathers, "expected the candidate all-gather"
    for line in gathers:
        dims = [int(d) for s in re.findall(r"\[([\d,]+)\]", line.split("=", 1)[1].split("all-gather")[0])
                for d in s.split(",")]
        assert max(dims) <= K * 4, line  # only k x shards candidates travel


def _np_reference(p, x, y, dead):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y, dead = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(dead)
    pre = np.maximum(x @ p["W_enc"].T + p["b_enc"], 0)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :K]
    acts = np.take_along_axis(pre, idx, 1)
    out = np.einsum("tk,tkd->td", acts, p["W_dec"][idx]) + p["b_dec"] + x @ p["W_skip"].T
    e = y - out
    tv = ((y - y.mean(0)) ** 2).sum()
    num_dead = int(dead.sum())
    if num_dead == 0:
        return (e**2).sum() / tv, 0.0
    k_aux = D // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    masked = np.where(dead[None], pre, -np.inf)
    aidx = np.argsort(-masked, axis=1, kind="stable")[:, :k_aux]
    aacts = np.take_along_axis(masked, aidx, 1)
    e_hat = np.einsum("tk,tkd->td", aacts, p["W_dec"][aidx])
    return (e**2).sum() / tv, scale * ((e_hat - e) ** 2).sum() / tv


@pytest.mark.parametrize("dead", [DEAD, jnp.arange(N) < 5, jnp.zeros(N, bool)],
                         ids=["many_dead", "5_dead", "none_dead"])
def test_auxk_matches_numpy(dead):
    p, (x, y) = _params(), _data()
    loss, m = jax.jit(lambda p: C.loss_fn(p, x, y, K, dead_mask=dead, auxk_alpha=0.25))(p)
    fvu_ref, auxk_ref = _np_reference(p, x, y, dead)
    np.testing.assert_allclose(float(m["fvu"]), fvu_ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["auxk"]), auxk_ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(float(loss), fvu_ref + 0.25 * auxk_ref, rtol=1e-5)
    if dead.any():
        assert float(m["auxk"]) > 0
    else:
        assert float(m["auxk"]) == 0.0


def test_auxk_trains_only_w_dec():
    # sparsify's FusedEncoder drops pre_acts' gradient and AuxK detaches e.
    p, (x, y) = _params(), _data()
    g = jax.grad(lambda p: C.loss_fn(p, x, y, K, dead_mask=DEAD, auxk_alpha=1.0)[0]
                 - C.loss_fn(p, x, y, K, dead_mask=DEAD, auxk_alpha=0.0)[0])(p)
    assert float(jnp.abs(g["W_dec"]).max()) > 0
    for name in ("W_enc", "b_enc", "b_dec", "W_skip"):
        assert float(jnp.abs(g[name]).max()) < 1e-7, name


def test_fvu():
    y = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    assert float(C.fvu(y, y)) == 0.0
    np.testing.assert_allclose(float(C.fvu(jnp.broadcast_to(y.mean(0), y.shape), y)), 1.0, rtol=1e-6)


def test_init_properties():
    p = C.init_coder(jax.random.PRNGKey(0), D, N)
    assert set(p) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    assert p["W_enc"].shape == (N, D) and p["W_dec"].shape == (N, D) and p["W_skip"].shape == (D, D)
    for name in ("W_dec", "b_enc", "b_dec", "W_skip"):
        assert not p[name].any(), name
    bound = 1 / np.sqrt(D)
    assert float(jnp.abs(p["W_enc"]).max()) <= bound and float(jnp.abs(p["W_enc"]).max()) > 0.9 * bound

    s = C.init_coder(jax.random.PRNGKey(0), D, N, kind="sae", skip=False, dtype=jnp.bfloat16)
    assert set(s) == {"W_enc", "b_enc", "W_dec", "b_dec"} and s["W_dec"].dtype == jnp.bfloat16
    s = C.init_coder(jax.random.PRNGKey(0), D, N, kind="sae", skip=False)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(s["W_dec"]), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s["W_dec"]) * np.linalg.norm(np.asarray(s["W_enc"]), axis=1, keepdims=True),
                               np.asarray(s["W_enc"]), rtol=1e-5, atol=1e-7)


def test_init_from_batch():
    p, (x, y) = C.init_coder(jax.random.PRNGKey(0), D, N), _data()
    q = C.init_from_batch(p, x, y)
    np.testing.assert_allclose(np.asarray(q["b_dec"]), np.asarray(y.mean(0)), rtol=1e-6)
    pre = x @ q["W_enc"].T + q["b_enc"]
    np.testing.assert_allclose(np.asarray(pre.mean(0)), 0.0, atol=1e-5)


def test_param_specs_and_lr():
    from jax.sharding import PartitionSpec as P
    specs = C.param_specs(_params())
    assert specs == dict(W_enc=P("model", None), b_enc=P("model"), W_dec=P("model", None), b_dec=P(), W_skip=P())
    assert C.lr_for(2**14) == pytest.approx(2e-4)
    assert C.lr_for(32768) == pytest.approx(2e-4 / np.sqrt(2))


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_custom_vjp_decode_grads_equal_gather(mesh_shape):
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    p, (x, y) = _params(), _data()
    f = jax.jit(lambda p, x: C.forward(p, x, K))(p, x)
    G = jax.random.normal(jax.random.PRNGKey(9), (T, D))

    def dec(impl):
        return jax.jit(jax.grad(lambda W, a: jnp.sum(C.decode({"W_dec": W, "b_dec": p["b_dec"]}, a, f["top_indices"],
                                                              mesh=mesh, impl=impl) * G), argnums=(0, 1)))
    for a, b in zip(dec("gather")(p["W_dec"], f["top_acts"]), dec("vjp")(p["W_dec"], f["top_acts"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Through the whole loss (AuxK decodes too).
    ga = jax.jit(jax.grad(lambda p: _loss("transcoder", mesh, "gather")(p, x, y)[0]))(p)
    gv = jax.jit(jax.grad(lambda p: _loss("transcoder", mesh, "vjp")(p, x, y)[0]))(p)
    for name in p:
        np.testing.assert_allclose(np.asarray(ga[name]), np.asarray(gv[name]), rtol=1e-6, atol=1e-7, err_msg=name)


def test_normalize_and_remove_parallel_grad():
    p = C.normalize_decoder(_params("sae", skip=False))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(p["W_dec"]), axis=1), 1.0, rtol=1e-5)
    g = {name: jax.random.normal(jax.random.PRNGKey(1), v.shape) for name, v in p.items()}
    g2 = C.remove_parallel_grad(g, p)
    np.testing.assert_allclose(np.asarray(jnp.sum(g2["W_dec"] * p["W_dec"], axis=1)), 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(g2["W_enc"]), np.asarray(g["W_enc"]))


def test_user_errors():
    p, (x, _) = _params(), _data()
    with pytest.raises(UserError, match="k=600"):
        C.encode(p, x, 600)
    with pytest.raises(UserError, match="kind"):
        C.init_coder(jax.random.PRNGKey(0), D, N, kind="crosscoder")
    with pytest.raises(UserError, match="num_latents"):
        C.init_coder(jax.random.PRNGKey(0), D, 0)
    with pytest.raises(UserError, match="token count 63"):
        C.forward(p, x[:63], K, mesh=make_mesh(8, 1))
    with pytest.raises(UserError, match="impl"):
        C.decode(p, jnp.ones((T, K)), jnp.zeros((T, K), jnp.int32), impl="dense")


def test_topk_gradient_ignores_relu_like_sparsify():
    # sparsify's FusedEncoder backward sends d(top_acts) to every chosen latent's
    # pre-activation, even one the ReLU zeroed (fewer than k positive latents).
    p, (x, _) = _params(), _data()
    p["b_enc"] = p["b_enc"] - 3.0  # almost everything negative
    f = C.forward(p, x, K)
    assert float((f["top_acts"] == 0).mean()) > 0.5
    g = jax.grad(lambda b: jnp.sum(C.encode({**p, "b_enc": b}, x, K)[0]))(p["b_enc"])
    counts = np.bincount(np.asarray(f["top_indices"]).ravel(), minlength=N)
    np.testing.assert_allclose(np.asarray(g), counts, atol=1e-6)


@pytest.mark.parametrize("data", ["normal", "ties", "zeros_nan_inf"])
def test_blocked_topk_equals_lax_top_k(data):
    # n / block = 32 blocks >= 8 k: the blocked path runs; it must give lax.top_k's values and
    # indices bit for bit, ties to the lower index, -0.0 below 0.0, NaN and -inf where TopK puts them.
    rng = np.random.default_rng(0)
    n, k = 1024, 4
    if data == "normal":
        v = rng.standard_normal((48, n)).astype(np.float32)
    elif data == "ties":
        v = rng.integers(0, 4, (48, n)).astype(np.float32)
    else:
        v = np.maximum(rng.standard_normal((48, n)).astype(np.float32), 0) * (rng.random((48, n)) < 0.002)
        v[rng.random((48, n)) < 0.3] = -0.0
        v[3, 100] = np.nan
        v[4, :] = -np.inf
        v[5, 7], v[5, 900] = np.inf, np.inf
    assert n // C.TOPK_BLOCK >= C.TOPK_MIN_BLOCKS_PER_K * k
    got = jax.jit(lambda v: C._topk(v, k))(v)
    ref = jax.lax.top_k(jnp.asarray(v), k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(ref[0]).view(np.int32))


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("shape", [None, *MESHES])
@pytest.mark.parametrize("dead", [DEAD, jnp.zeros(N, bool)], ids=["dead", "none_dead"])
def test_loss_and_grads_matches_autodiff_of_loss_fn(monkeypatch, kind, shape, dead):
    # The hand-written sparse gradient (what the trainer uses) against plain autodiff of loss_fn,
    # in several token chunks and with the gather loop's fori_loop path (small chunk and group).
    monkeypatch.setattr(C, "TRAIN_CHUNK", 16)
    monkeypatch.setattr(C, "GATHER_GROUP", 3)
    mesh = None if shape is None else make_mesh(*shape)
    p, (x, y) = _params(kind), _data()
    y = x if kind == "sae" else y
    (ref_loss, ref_m), ref_g = jax.jit(jax.value_and_grad(_loss(kind, mesh), has_aux=True))(p, x, y)
    loss, m, g = jax.jit(lambda p: C.loss_and_grads(p, x, y, K, kind=kind, dead_mask=dead, auxk_alpha=0.5,
                                                    mesh=mesh))(p)
    if not dead.any():  # _loss uses DEAD; with nothing dead AuxK is 0 and skipped
        (ref_loss, ref_m), ref_g = jax.jit(jax.value_and_grad(
            lambda p: C.loss_fn(p, x, y, K, kind=kind, dead_mask=dead, auxk_alpha=0.5, mesh=mesh), has_aux=True))(p)
        assert float(m["auxk"]) == 0.0
    np.testing.assert_array_equal(np.asarray(m["top_indices"]), np.asarray(ref_m["top_indices"]))
    np.testing.assert_allclose(np.asarray(m["top_acts"]), np.asarray(ref_m["top_acts"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6)
    np.testing.assert_allclose(float(m["fvu"]), float(ref_m["fvu"]), rtol=2e-6)
    np.testing.assert_allclose(float(m["auxk"]), float(ref_m["auxk"]), rtol=2e-6)
    for name in p:
        scale = float(jnp.abs(ref_g[name]).max())
        np.testing.assert_allclose(np.asarray(g[name]), np.asarray(ref_g[name]), rtol=1e-5, atol=2e-6 * scale,
                                   err_msg=name)
