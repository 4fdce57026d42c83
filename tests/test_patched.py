"""The KV-cache path of the Flax GPT-NeoX and the patched evaluation built on it
(make_patched_eval, both modes): same CE as make_patched_ce, CE and KL against full hooked
forwards, several positions per window, bad positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import KV, GPTNeoX, GPTNeoXConfig, init_params
from nlrw_jax.rewrite.patched import MODES, check_positions, make_patched_ce, make_patched_eval, run_length
from nlrw_jax.sparse import coder as sc

CE_TOL = 2e-4


def small_config(parallel: bool, rotary_pct: float) -> GPTNeoXConfig:
    # initializer_range 0.1 (not Pythia's 0.02) so the random model's outputs depend on the patch.
    return GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, rotary_pct=rotary_pct,
                         use_parallel_residual=parallel, initializer_range=0.1)


@pytest.fixture(scope="module")
def tiny():
    return hf.load("assets/tiny-pythia/final")


def model_for(name, tiny):
    if name == "tiny":
        return tiny
    parallel, pct = name
    config = small_config(parallel, pct)
    return config, init_params(config, seed=1)


# ------------------------------------------------------------------------------ the KV cache


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("pct", [0.25, 1.0])
def test_prefix_then_decode_step_equals_full_forward(parallel, pct):
    """Keys/values of a prefix + new rows (one, then two at consecutive positions) == the full
    forward's logits there, also with left padding (attention_mask) in the prefix."""
    config = small_config(parallel, pct)
    params = init_params(config, seed=0)
    model = GPTNeoX(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)), jnp.int32)
    attn = jnp.ones((2, 16), jnp.int32).at[1, :3].set(0)  # sentence 1 left-padded by 3
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    layers = range(config.num_hidden_layers)
    full, _ = model.apply({"params": params}, ids, attn, pos)
    for p, n_new in [(9, 1), (11, 2), (15, 1)]:
        _, got = model.apply({"params": params}, ids[:, :p], attn[:, :p], pos[:, :p], capture=[(i, KV) for i in layers])
        cache = {i: got[(i, KV)] for i in layers}
        assert cache[0].k.shape == (2, p, 4, 8) and bool((cache[0].valid == attn[:, :p].astype(bool)).all())
        step, _ = model.apply({"params": params}, ids[:, p:p + n_new], attn[:, p:p + n_new], pos[:, p:p + n_new],
                              kv_cache=cache)
        np.testing.assert_allclose(step, full[:, p:p + n_new], atol=1e-5, rtol=0)
    # No padding, no positions given: the new row's position defaults to the cache's length.
    step, _ = model.apply({"params": params}, ids[:1, 9:10], kv_cache=_prefix(model, params, ids[:1, :9], layers))
    np.testing.assert_allclose(step, full[:1, 9:10], atol=1e-5, rtol=0)


def _prefix(model, params, ids, layers):
    _, got = model.apply({"params": params}, ids, capture=[(i, KV) for i in layers])
    return {i: got[(i, KV)] for i in layers}


def test_decode_without_a_cache_for_every_layer_is_refused():
    config = small_config(True, 0.25)
    params = init_params(config)
    model = GPTNeoX(config)
    ids = jnp.zeros((1, 5), jnp.int32)
    cache = _prefix(model, params, ids, [0, 1])
    with pytest.raises(UserError, match=r"no keys/values for layer\(s\) \[2\]"):
        model.apply({"params": params}, ids[:, :1], kv_cache=cache)
    with pytest.raises(UserError, match="unknown capture point"):
        model.apply({"params": params}, ids, capture=[(0, "kvv")])


# ------------------------------------------------------------------- the patched evaluation


def random_coder(d: int, n: int, kind: str):
    coder = sc.init_coder(jax.random.PRNGKey(1), d, n, kind=kind, skip=kind == "transcoder")
    coder["W_dec"] = jax.random.normal(jax.random.PRNGKey(2), (n, d)) * 0.3
    if kind == "transcoder":
        coder["W_skip"] = jax.random.normal(jax.random.PRNGKey(3), (d, d)) * 0.05
    return coder


def hooked_logp(model, params, coder, windows, positions, real, values, masks, means, layer, kind, k):
    """Log-probabilities at each position [C, B, R, vocab] from one full forward per condition, the
    replacement spliced in at all the real positions of each window at once (mlp_replacements for
    a transcoder, resid_replacements for an SAE)."""
    B, S = windows.shape
    R = positions.shape[1]
    d, n = model.config.hidden_size, coder["W_enc"].shape[0]
    b = np.arange(B)[:, None]
    at_p = np.zeros((B, S), bool)
    at_p[np.broadcast_to(b, positions.shape)[real], positions[real]] = True
    at_p = jnp.asarray(at_p)[..., None]

    def run(row_fn=None):
        hook = {}
        if row_fn is not None:
            def repl(*args):
                x = args[0]
                new = row_fn(x.reshape(-1, d)).reshape(x.shape)
                old = args[1](x) if len(args) > 1 else x
                return jnp.where(at_p, new, old)
            hook = {"mlp_replacements": {layer: repl}} if kind == "transcoder" else {"resid_replacements": {layer: repl}}
        logits, _ = model.apply({"params": params}, windows, **hook)
        return jax.nn.log_softmax(logits[b, positions].astype(jnp.float32), axis=-1)

    def simulated(v, m):
        full = np.zeros((B, S, n), np.float32)  # each window's values at its positions
        for i in range(B):
            for r in range(R):
                if real[i, r]:
                    full[i, positions[i, r]] = values[v, i, r]
        full = jnp.asarray(full.reshape(B * S, n))

        def row_fn(x):
            acts, idx, _ = sc.encode(coder, x, k, kind=kind)
            dense = jnp.zeros((x.shape[0], n)).at[jnp.arange(x.shape[0])[:, None], idx].set(acts)
            xin = x - coder["b_dec"] if kind == "sae" else x
            out = sc.decode(coder, *jax.lax.top_k(jnp.where(m, full, dense), k))
            return out + xin @ coder["W_skip"].T if "W_skip" in coder else out
        return row_fn

    def decoded(latents):  # the coder's decode (+ skip) of fixed latent values at every row
        def row_fn(x):
            xin = x - coder["b_dec"] if kind == "sae" else x
            out = sc.decode(coder, *jax.lax.top_k(jnp.broadcast_to(latents, (x.shape[0], n)), k))
            return out + xin @ coder["W_skip"].T if "W_skip" in coder else out
        return row_fn

    out = [run(), run(lambda x: sc.forward(coder, x, k, kind=kind)["out"]), run(jnp.zeros_like),
           run(lambda x: jnp.broadcast_to(means["out"], x.shape)), run(decoded(jnp.zeros(n))),
           run(decoded(means["latents"]))]
    out += [run(simulated(v, masks[m])) for v in range(values.shape[0]) for m in range(masks.shape[0])]
    return jnp.stack(out)


def ce_kl(logp, windows, positions):
    """CE of the next token and KL(clean || condition) from log-probabilities [C, B, R, vocab]."""
    b = np.arange(windows.shape[0])[:, None]
    nxt = np.asarray(windows)[b, positions + 1]
    ce = -np.take_along_axis(np.asarray(logp), np.broadcast_to(nxt[None, :, :, None], logp.shape[:3] + (1,)), -1)[..., 0]
    kl = np.asarray(jnp.sum(jnp.exp(logp[0]) * (logp[0] - logp), axis=-1))
    return ce, kl


CASES = [(name, kind, layer) for name in [(True, 0.25), (False, 1.0)]
         for kind, layer in [("transcoder", 0), ("transcoder", 2), ("sae", 1)]]
CASES += [("tiny", "transcoder", 2), ("tiny", "transcoder", 5), ("tiny", "sae", 3)]


def problem(config, kind, n=64, R=1, seed=0):
    rng = np.random.default_rng(seed)
    S = 48
    windows = jnp.asarray(rng.integers(0, config.vocab_size, (4, S)), jnp.int32)
    if R == 1:
        positions = np.array([[30], [3], [17], [21]], np.int32)  # max 30: the clean run covers 32 of 48 tokens
        real = np.ones((4, 1), bool)
    else:  # consecutive positions, as all-at-once simulation reads them; window 2 has fewer
        positions = np.array([[27 + r for r in range(R)], [4 + r for r in range(R)],
                              [12 + r for r in range(R)], [20 + r for r in range(R)]], np.int32)
        real = np.ones((4, R), bool)
        real[2, R // 2:] = False
    values = rng.uniform(0, 2, (2, 4, R, n)).astype(np.float32)
    masks = np.zeros((2, n), bool)
    masks[0, :5] = True
    masks[1] = True
    means = {"out": jnp.asarray(rng.normal(0, 0.5, config.hidden_size), jnp.float32),
             "latents": jnp.asarray(rng.uniform(0, 0.5, n), jnp.float32)}
    return windows, positions, real, values, masks, means


@pytest.mark.parametrize("name, kind, layer", CASES)
def test_kv_path_equals_patched_ce_and_hooked_forwards(tiny, name, kind, layer):
    """One position per window: CE of make_patched_eval == make_patched_ce (and == full hooked
    forwards); KL(clean || patched) == the one from full hooked forwards; the clean row's KL is 0.
    The batch's positions differ (each sentence's cache is cut at its own p) and the clean run is
    truncated. Both modes agree here (one position: nothing else is patched)."""
    config, params = model_for(name, tiny)
    model = GPTNeoX(config)
    k = 4
    coder = random_coder(config.hidden_size, 64, kind)
    windows, positions, real, values, masks, means = problem(config, kind)
    ce_old = np.asarray(make_patched_ce(model, layer, kind, k)(params, coder, windows, jnp.asarray(positions[:, 0]),
                                                               jnp.asarray(values[:, :, 0]), jnp.asarray(masks), means))
    ce_ref, kl_ref = ce_kl(hooked_logp(model, params, coder, windows, positions, real, values, masks, means, layer,
                                       kind, k), windows, positions)
    for mode in MODES:
        ce, kl = map(np.asarray, make_patched_eval(model, layer, kind, k, mode, length_multiple=16)(
            params, coder, windows, positions, real, values, masks, means))
        assert ce.shape == kl.shape == (6 + 2 * 2, 4, 1)
        print(f"\n{name} {kind} layer {layer} {mode}: max |CE kv - CE old| {np.abs(ce[..., 0] - ce_old).max():.1e}, "
              f"|CE kv - hooked| {np.abs(ce - ce_ref).max():.1e}, |KL kv - hooked| {np.abs(kl - kl_ref).max():.1e}, "
              f"mean KL zero ablation {kl[2].mean():.3f}")
        np.testing.assert_allclose(ce[..., 0], ce_old, atol=CE_TOL, rtol=0)
        np.testing.assert_allclose(ce, ce_ref, atol=CE_TOL, rtol=0)
        np.testing.assert_allclose(kl, kl_ref, atol=CE_TOL, rtol=0)
        assert (kl[0] == 0).all()
        assert kl.max() > 1e-2  # the patches matter: the comparison is not between near-equal numbers


@pytest.mark.parametrize("name, kind, layer", [((True, 0.25), "transcoder", 0), ((False, 1.0), "sae", 1),
                                               ("tiny", "transcoder", 2), ("tiny", "transcoder", 5)])
def test_many_positions_each_alone_and_whole_layer(tiny, name, kind, layer):
    """Several positions per window (one window with unused slots). "each" == a hooked forward per
    position, patched alone; "whole_layer" == one hooked forward per condition with every real
    position of the window patched at once, so later positions see patched earlier ones."""
    config, params = model_for(name, tiny)
    model = GPTNeoX(config)
    k, R = 4, 4
    coder = random_coder(config.hidden_size, 64, kind)
    windows, positions, real, values, masks, means = problem(config, kind, R=R, seed=1)
    each, _ = map(np.asarray, make_patched_eval(model, layer, kind, k, "each", length_multiple=8)(
        params, coder, windows, positions, real, values, masks, means))
    _, kl_each = make_patched_eval(model, layer, kind, k, "each", length_multiple=8)(
        params, coder, windows, positions, real, values, masks, means)
    whole, kl_whole = map(np.asarray, make_patched_eval(model, layer, kind, k, "whole_layer")(
        params, coder, windows, positions, real, values, masks, means))
    for r in range(R):
        sel = real[:, r]
        one = (positions[:, r:r + 1], np.ones((4, 1), bool), values[:, :, r:r + 1])
        ce_ref, kl_ref = ce_kl(hooked_logp(model, params, coder, windows, one[0], one[1], one[2], masks, means,
                                           layer, kind, k), windows, one[0])
        np.testing.assert_allclose(each[:, sel, r], ce_ref[:, sel, 0], atol=CE_TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(kl_each)[:, sel, r], kl_ref[:, sel, 0], atol=CE_TOL, rtol=0)
    ce_ref, kl_ref = ce_kl(hooked_logp(model, params, coder, windows, positions, real, values, masks, means, layer,
                                       kind, k), windows, positions)
    np.testing.assert_allclose(whole[:, real], ce_ref[:, real], atol=CE_TOL, rtol=0)
    np.testing.assert_allclose(kl_whole[:, real], kl_ref[:, real], atol=CE_TOL, rtol=0)
    diff = np.abs(whole - each)[:, real].max()
    print(f"\n{name} {kind} layer {layer}: max |CE whole - CE each| {diff:.3f}")
    if layer < config.num_hidden_layers - 1:
        assert diff > 1e-2  # later layers see the other patched rows: the modes differ
    else:
        np.testing.assert_allclose(whole, each, atol=1e-5, rtol=0)  # nothing runs after the patch


def zero_means(config, n):
    return {"out": jnp.zeros(config.hidden_size), "latents": jnp.zeros(n)}


def test_truncation_length_does_not_change_the_result(tiny):
    """Truncated to max(p)+1 exactly, to a multiple of 16, or not at all (length_multiple >= S):
    the same CE and KL; and the run lengths are what run_length says."""
    config, params = tiny
    model = GPTNeoX(config)
    coder = random_coder(config.hidden_size, 64, "transcoder")
    rng = np.random.default_rng(1)
    windows = jnp.asarray(rng.integers(0, config.vocab_size, (3, 40)), jnp.int32)
    positions = np.array([[5], [12], [0]], np.int32)
    real = np.ones((3, 1), bool)
    values = rng.uniform(0, 2, (1, 3, 1, 64)).astype(np.float32)
    masks = np.ones((1, 64), bool)
    assert [run_length(positions, 40, m) for m in (1, 16, 64)] == [13, 16, 40]
    for mode in MODES:
        got = [make_patched_eval(model, 3, "transcoder", 4, mode, length_multiple=m)(
            params, coder, windows, positions, real, values, masks, zero_means(config, 64)) for m in (1, 16, 64)]
        for ce, kl in got[1:]:
            np.testing.assert_allclose(ce, got[0][0], atol=1e-5, rtol=0)
            np.testing.assert_allclose(kl, got[0][1], atol=1e-5, rtol=0)


def test_positions_outside_the_window_are_refused(tiny):
    config, params = tiny
    fn = make_patched_eval(GPTNeoX(config), 5, "transcoder", 4)
    coder = random_coder(config.hidden_size, 64, "transcoder")
    windows = jnp.zeros((2, 16), jnp.int32)
    values, masks = jnp.zeros((1, 2, 1, 64)), jnp.ones((1, 64), bool)
    real = np.ones((2, 1), bool)
    for bad, where in [([3, -1], "position -1 (sentence 1)"), ([15, 3], "position 15 (sentence 0)")]:
        with pytest.raises(UserError, match=r"is outside the window: positions must be in \[0, 14\]") as e:
            fn(params, coder, windows, np.asarray(bad, np.int32)[:, None], real, values, masks, zero_means(config, 64))
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="3 positions for 2 windows"):
        check_positions(np.array([1, 2, 3]), 16, 2)
    with pytest.raises(UserError, match="integer array"):
        check_positions(np.array([1.0, 2.0]), 16)
    check_positions(np.array([0, 14]), 16, 2)  # both ends are fine
    check_positions(np.array([[0, 99]]), 16, 1, real=np.array([[True, False]]))  # unused slots are not checked
    whole = make_patched_eval(GPTNeoX(config), 3, "transcoder", 4, "whole_layer")
    with pytest.raises(UserError, match=r"whole_layer mode needs consecutive positions in each window, but window 1 "
                                        r"has \[2, 4\]"):
        whole(params, coder, windows, np.array([[1, 2], [2, 4]], np.int32), np.ones((2, 2), bool),
              jnp.zeros((1, 2, 2, 64)), masks, zero_means(config, 64))
    with pytest.raises(UserError, match="evaluation mode 'all' is not one of"):
        make_patched_eval(GPTNeoX(config), 5, "transcoder", 4, "all")


class ArrayRows:
    """Token rows from arrays, in chunks (the interface of the activation store's rows)."""

    def __init__(self, points: dict, chunk: int):
        self.points, self.num_tokens = points, len(next(iter(points.values())))
        self.chunks = [(a, min(a + chunk, self.num_tokens)) for a in range(0, self.num_tokens, chunk)]

    def inputs(self, a, b):
        return self.read("mlp_in", a, b)

    def read(self, point, a, b):
        return self.points[point][a:b]


def test_baseline_means_by_hand():
    """Mean ablation's MLP-output mean and the latents' mean activations (zeros included) over the
    first `limit` tokens, against numpy by hand."""
    from nlrw_jax.rewrite.metrics import baseline_means

    rng = np.random.default_rng(5)
    d, n, k = 8, 16, 3
    coder = random_coder(d, n, "transcoder")
    x, out = rng.normal(size=(50, d)).astype(np.float32), rng.normal(size=(50, d)).astype(np.float32)
    rows = ArrayRows({"mlp_in": x, "mlp_out": out}, chunk=16)
    got = baseline_means(coder, {"k": k, "kind": "transcoder"}, rows, limit=40, progress=False)
    pre = np.maximum(x[:40] @ np.asarray(coder["W_enc"]).T + np.asarray(coder["b_enc"]), 0)
    dense = np.where(pre >= np.sort(pre, axis=1)[:, -k:][:, :1], pre, 0)  # top k per token
    assert got["tokens"] == 40
    np.testing.assert_allclose(got["out"], out[:40].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["latents"], dense.mean(0), rtol=1e-5, atol=1e-6)
