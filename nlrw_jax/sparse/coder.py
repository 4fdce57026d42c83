"""TopK transcoder / sparse autoencoder, as EleutherAI's `sparsify` defines it.

Parameters are a dict in sparsify's layout: W_enc [n, d] (encoder.weight), b_enc [n]
(encoder.bias), W_dec [n, d], b_dec [d] and, with a skip connection, W_skip [d, d]
(applied as x @ W_skip.T).

Gradients follow sparsify's FusedEncoder rather than plain autodiff of ReLU + top-k:
 - d(top_acts) goes straight to the pre-activation x @ W_enc.T + b_enc of the chosen
   latents, ignoring the ReLU (matters only when fewer than k latents are positive), and
   it is computed sparsely (gather / scatter-add over the k chosen rows, not a dense
   [T, n] matmul);
 - pre_acts carries no gradient, so AuxK trains only W_dec.

With a mesh ('data', 'model'), tokens shard over 'data' and latents over 'model'. TopK
never gathers the [T, n] pre-activations: each model shard takes its local top k, the
k x shards candidates are all-gathered, and the top k of those is taken. Candidates are
laid out in shard order, so ties resolve to the lower global index exactly like a
single-device lax.top_k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nlrw_jax.errors import UserError

# The sparse-coder kinds and the model's capture points each reads and reconstructs:
# a transcoder maps the MLP's input to its output, an SAE reconstructs the residual stream.
POINTS = {"transcoder": ("mlp_in", "mlp_out"), "sae": ("resid_post", "resid_post")}
KINDS = tuple(POINTS)
# Sparse decode implementation: "gather" (autodiff of a gather + weighted sum) or "vjp"
# (custom_vjp with a segment_sum backward). XLA compiles both to the same gather +
# scatter-add and they time the same on CPU (benchmarks/sparse_decode.py), so the default
# is the plain one.
DECODE_IMPL = "gather"


def points_for(kind: str) -> tuple[str, str]:
    """(input, target) capture points of a sparse-coder kind."""
    _check_kind(kind)
    return POINTS[kind]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"sparse coder kind must be one of {KINDS}, got {kind!r}")


def init_coder(key, d_in: int, num_latents: int, *, kind: str = "transcoder", skip: bool = True,
               dtype=jnp.float32) -> dict:
    """Fresh parameters. W_skip exists iff skip (pass skip=False for a plain SAE)."""
    _check_kind(kind)
    if d_in <= 0:
        raise UserError(f"sparse coder d_in must be positive, got {d_in}")
    if num_latents <= 0:
        raise UserError(f"sparse coder num_latents must be positive, got {num_latents}")
    # torch nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(d_in)
    W_enc = jax.random.uniform(key, (num_latents, d_in), jnp.float32, -bound, bound)
    if kind == "transcoder":
        W_dec = jnp.zeros_like(W_enc)
    else:
        W_dec = _unit_rows(W_enc)
    params = dict(W_enc=W_enc, b_enc=jnp.zeros((num_latents,), jnp.float32), W_dec=W_dec,
                  b_dec=jnp.zeros((d_in,), jnp.float32))
    if skip:
        params["W_skip"] = jnp.zeros((d_in, d_in), jnp.float32)
    return {name: v.astype(dtype) for name, v in params.items()}


def init_from_batch(params: dict, x, y, *, kind: str = "transcoder") -> dict:
    """What sparsify's trainer does on step 0: b_dec = mean(y); for a transcoder also
    b_enc = -mean(x) @ W_enc.T, so pre-activations start centred."""
    _check_kind(kind)
    params = dict(params)
    dtype = params["b_dec"].dtype
    params["b_dec"] = jnp.mean(y.astype(jnp.float32), axis=0).astype(dtype)
    if kind == "transcoder":
        mean_x = jnp.mean(x.astype(jnp.float32), axis=0).astype(dtype)
        params["b_enc"] = (-mean_x @ params["W_enc"].T).astype(dtype)
    return params


def param_specs(params: dict) -> dict:
    """PartitionSpecs: latents over 'model'; b_dec and W_skip replicated."""
    specs = dict(W_enc=P("model", None), b_enc=P("model"), W_dec=P("model", None), b_dec=P(),
                 W_skip=P())
    return {name: specs[name] for name in params}


def lr_for(num_latents: int) -> float:
    return 2e-4 / math.sqrt(num_latents / 2**14)


# ---------------------------------------------------------------------------- encode


def _check_mesh(mesh, tokens: int, num_latents: int) -> None:
    if mesh is None:
        return
    if num_latents % mesh.shape["model"]:
        raise UserError(f"num_latents={num_latents} is not divisible by mesh model={mesh.shape['model']}")
    if tokens % mesh.shape["data"]:
        raise UserError(f"token count {tokens} is not divisible by mesh data={mesh.shape['data']}")


def _local_topk(vals, k: int, axis_name):
    """Top k of the last axis where that axis is split over `axis_name` (or not split)."""
    n_local = vals.shape[-1]
    v, i = lax.top_k(vals, min(k, n_local))
    if axis_name is None:
        return v, i
    i = i + lax.axis_index(axis_name) * n_local
    # Only k values + indices per shard travel, in shard order (keeps lax.top_k's ties).
    v = lax.all_gather(v, axis_name, axis=1, tiled=True, to="invarying")
    i = lax.all_gather(i, axis_name, axis=1, tiled=True, to="invarying")
    v, j = lax.top_k(v, k)
    return v, jnp.take_along_axis(i, j, axis=1)


def _rows_of(idx, n_local: int, axis_name):
    """Global latent ids -> (local row ids, mask of those this shard owns)."""
    off = 0 if axis_name is None else lax.axis_index(axis_name) * n_local
    li = idx - off
    mine = (li >= 0) & (li < n_local)
    return jnp.where(mine, li, 0), mine


def _encode_body(x, W_enc, b_enc, k: int, axis_name):
    pre_lin = x @ W_enc.T + b_enc
    pre_acts = lax.stop_gradient(jax.nn.relu(pre_lin))
    vals, idx = _local_topk(pre_acts, k, axis_name)
    # Gradient path (value 0): recompute the chosen pre-activations sparsely, like
    # sparsify's FusedEncoder backward (embedding_bag / index_add, no ReLU mask).
    li, mine = _rows_of(idx, W_enc.shape[0], axis_name)
    r = jnp.einsum("td,tkd->tk", x, W_enc[li]) + b_enc[li]
    r = jnp.where(mine, r, 0)
    st = r - lax.stop_gradient(r)
    if axis_name is not None:
        st = lax.psum(st, axis_name)
    return vals + st, idx, pre_acts


def encode(params: dict, x, k: int, *, kind: str = "transcoder", mesh=None):
    """-> (top_acts [T, k], top_indices [T, k] int32, pre_acts [T, n] (ReLU'd, no grad))."""
    _check_kind(kind)
    n = params["W_enc"].shape[0]
    if not 1 <= k <= n:
        raise UserError(f"k={k} must be between 1 and num_latents={n}")
    _check_mesh(mesh, x.shape[0], n)
    x = x.astype(params["W_enc"].dtype)
    if kind == "sae":
        x = x - params["b_dec"]
    if mesh is None:
        return _encode_body(x, params["W_enc"], params["b_enc"], k, None)
    return jax.shard_map(
        lambda x, W, b: _encode_body(x, W, b, k, "model"), mesh=mesh,
        in_specs=(P("data", None), P("model", None), P("model")),
        out_specs=(P("data", None), P("data", None), P("data", "model")),
    )(x, params["W_enc"], params["b_enc"])


def topk_latents(vals, k: int, *, mesh=None):
    """Top k over the latent axis of a [T, n] array that may be sharded (data, model)."""
    _check_mesh(mesh, vals.shape[0], vals.shape[1])
    if mesh is None:
        return _local_topk(vals, k, None)
    return jax.shard_map(
        lambda v: _local_topk(v, k, "model"), mesh=mesh,
        in_specs=P("data", "model"), out_specs=(P("data", None), P("data", None)),
    )(vals)


# ---------------------------------------------------------------------------- decode


def _decode_gather(W_dec, acts, idx):
    return jnp.einsum("tk,tkd->td", acts, W_dec[idx])


@jax.custom_vjp
def _decode_vjp(W_dec, acts, idx):
    return _decode_gather(W_dec, acts, idx)


def _decode_vjp_fwd(W_dec, acts, idx):
    return _decode_gather(W_dec, acts, idx), (W_dec, acts, idx)


def _decode_vjp_bwd(res, g):
    W_dec, acts, idx = res
    d_acts = jnp.einsum("td,tkd->tk", g, W_dec[idx])
    contrib = (acts[:, :, None] * g[:, None, :]).reshape(-1, g.shape[-1])
    dW = jax.ops.segment_sum(contrib, idx.reshape(-1), num_segments=W_dec.shape[0])
    return dW.astype(W_dec.dtype), d_acts.astype(acts.dtype), None


_decode_vjp.defvjp(_decode_vjp_fwd, _decode_vjp_bwd)
_DECODERS = dict(gather=_decode_gather, vjp=_decode_vjp)


def _sparse_decode(W_dec, acts, idx, *, mesh=None, impl=None):
    """sum_j acts[t, j] * W_dec[idx[t, j]] (no b_dec)."""
    impl = impl or DECODE_IMPL
    if impl not in _DECODERS:
        raise UserError(f"decode impl must be one of {tuple(_DECODERS)}, got {impl!r}")
    fn = _DECODERS[impl]
    acts = acts.astype(W_dec.dtype)
    if mesh is None:
        return fn(W_dec, acts, idx)
    _check_mesh(mesh, acts.shape[0], W_dec.shape[0])

    def body(W, a, i):
        # Each model shard decodes the latents it owns; partial sums are psum'd (T x d).
        li, mine = _rows_of(i, W.shape[0], "model")
        # Mark W as varying over 'data' so a custom_vjp's local dW is psum'd over 'data'.
        W = lax.pcast(W, "data", to="varying")
        return lax.psum(fn(W, jnp.where(mine, a, 0), li), "model")

    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(P("model", None), P("data", None), P("data", None)),
        out_specs=P("data", None),
    )(W_dec, acts, idx)


def decode(params: dict, top_acts, top_indices, *, mesh=None, impl=None):
    """Sparse decode: gather the k rows of W_dec per token, weighted sum, + b_dec."""
    return _sparse_decode(params["W_dec"], top_acts, top_indices, mesh=mesh, impl=impl) + params["b_dec"]


# ---------------------------------------------------------------------------- forward / loss


def forward(params: dict, x, k: int, *, kind: str = "transcoder", mesh=None) -> dict:
    top_acts, top_indices, pre_acts = encode(params, x, k, kind=kind, mesh=mesh)
    out = decode(params, top_acts, top_indices, mesh=mesh)
    if "W_skip" in params:
        out = out + x.astype(params["W_skip"].dtype) @ params["W_skip"].T
    return dict(out=out, top_acts=top_acts, top_indices=top_indices, pre_acts=pre_acts)


def total_variance(y):
    y = y.astype(jnp.float32)
    return jnp.sum((y - jnp.mean(y, axis=0)) ** 2)


def fvu(y_hat, y):
    """sparsify's FVU: sum (y_hat - y)^2 / sum (y - mean_over_tokens(y))^2."""
    return jnp.sum((y_hat.astype(jnp.float32) - y.astype(jnp.float32)) ** 2) / total_variance(y)


def loss_fn(params: dict, x, y, k: int, *, kind: str = "transcoder", dead_mask=None,
            auxk_alpha: float = 0.0, mesh=None):
    """-> (fvu + auxk_alpha * auxk, dict(fvu, auxk, top_acts, top_indices)). jit-safe; dead_mask [n] bool."""
    f = forward(params, x, k, kind=kind, mesh=mesh)
    y = y.astype(jnp.float32)
    e = y - f["out"].astype(jnp.float32)
    tv = total_variance(y)
    l_fvu = jnp.sum(e**2) / tv
    auxk = jnp.zeros((), jnp.float32)
    if dead_mask is not None:
        d, n = y.shape[-1], params["W_dec"].shape[0]
        k_aux = d // 2  # sparsify: heuristic from Appendix B.1 of the TopK paper
        scale = jnp.minimum(jnp.sum(dead_mask) / k_aux, 1.0)
        # Static k_aux; sparsify uses min(k_aux, num_dead), here non-dead picks (-inf) get act 0.
        masked = jnp.where(dead_mask[None, :], f["pre_acts"], -jnp.inf)
        a_vals, a_idx = topk_latents(masked, min(k_aux, n), mesh=mesh)
        a_acts = jnp.where(a_vals > -jnp.inf, a_vals, 0)
        # The residual e already contains b_dec, so e_hat leaves it out.
        e_hat = _sparse_decode(params["W_dec"], a_acts, a_idx, mesh=mesh).astype(jnp.float32)
        auxk = scale * jnp.sum((e_hat - lax.stop_gradient(e)) ** 2) / tv
    loss = l_fvu + auxk_alpha * auxk
    return loss, dict(fvu=l_fvu, auxk=auxk, top_acts=f["top_acts"], top_indices=f["top_indices"])


# ---------------------------------------------------------------------------- SAE decoder norm


def _unit_rows(W):
    eps = jnp.finfo(W.dtype).eps
    return W / (jnp.linalg.norm(W, axis=1, keepdims=True) + eps)


def normalize_decoder(params: dict) -> dict:
    """sparsify's set_decoder_norm_to_unit_norm: W_dec rows / (norm + eps)."""
    return {**params, "W_dec": _unit_rows(params["W_dec"])}


def remove_parallel_grad(grads: dict, params: dict) -> dict:
    """sparsify's remove_gradient_parallel_to_decoder_directions (assumes unit-norm rows)."""
    W, g = params["W_dec"], grads["W_dec"]
    par = jnp.sum(g * W, axis=1, keepdims=True)
    return {**grads, "W_dec": g - par * W}
