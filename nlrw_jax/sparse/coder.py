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
from functools import partial

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


# Exact blocked top-k: the block maxima's top k picks k blocks of TOPK_BLOCK columns that hold
# the row's top k (see _topk); used when a row has at least TOPK_MIN_BLOCKS_PER_K * k blocks.
TOPK_BLOCK = 32
TOPK_MIN_BLOCKS_PER_K = 8  # at n = 4096, k = 32 (128 blocks) it is no faster than lax.top_k


def _order_key(v):
    """float32 -> int32 with the total order XLA:CPU's TopK sorts by (-0.0 < 0.0, NaNs by bits); an
    involution on int32, so _order_key(_order_key(v)) gives v's bits back."""
    i = lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _topk(vals, k: int, block: int | None = None):
    """lax.top_k of the last axis of [T, n] float32, exactly (values, indices, ties to the lower
    index, -0.0 below 0.0), without XLA:CPU's single-threaded TopK over all n columns.

    Rank elements by (value down, index up) and blocks of `block` columns by their maxima the
    same way; let S be the k top-ranked blocks. An element outside S ranks below its own block's
    maximum, which ranks below each of S's k maxima (an equal value sits in a lower block, so at
    lower indices), so k elements outrank it: the row's top k lies in S. Hence: block maxima (one
    pass, fused with whatever produced `vals`, over the int32 order key so they follow TopK's
    total order), lax.top_k of the n / block maxima, then lax.top_k of S's k * block candidates,
    laid out in ascending column order so ties resolve as lax.top_k's do."""
    block = block or TOPK_BLOCK
    T, n = vals.shape
    if vals.dtype != jnp.float32 or n % block or n // block < TOPK_MIN_BLOCKS_PER_K * k:
        return lax.top_k(vals, k)
    nb = n // block
    maxima = _order_key(_order_key(vals).reshape(T, nb, block).max(-1))
    _, blocks = lax.top_k(lax.bitcast_convert_type(maxima, jnp.float32), k)
    blocks = jnp.sort(blocks, axis=1)
    cols = (blocks[:, :, None] * block + jnp.arange(block, dtype=blocks.dtype)).reshape(T, k * block)
    cand = jnp.take_along_axis(vals, cols, axis=1)
    v, j = lax.top_k(cand, k)
    return v, jnp.take_along_axis(cols, j, axis=1)


def _local_topk(vals, k: int, axis_name):
    """Top k of the last axis where that axis is split over `axis_name` (or not split)."""
    n_local = vals.shape[-1]
    v, i = _topk(vals, min(k, n_local))
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


# ---------------------------------------------------------------------------- training gradients
# The training step's value and gradient, by hand: the same numbers as
# jax.value_and_grad(loss_fn) (within float rounding), computed sparsely and in token chunks.
# Each token's k chosen latents l = idx[t, j] get
#   dW_dec[l] += a[t, j] * g[t],   dW_enc[l] += d_a[t, j] * x[t],   db_enc[l] += d_a[t, j]
# with g = dL/d(out) and d_a[t, j] = g[t] . W_dec[l] (sparsify's FusedEncoder backward: no ReLU
# mask, pre-activations carry no gradient). Tokens go through in chunks of TRAIN_CHUNK (a scan):
# the [chunk, n] pre-activations stay in cache and are never materialised whole, the top k, the
# decode, the error and these gradient rows are per chunk, and the gradients accumulate in place.
# AuxK runs in the same pass, off the same chunk of pre-activations, and only when some latent
# is dead (it is exactly 0 otherwise, as is its gradient).
TRAIN_CHUNK = 512
TRAIN_SPLIT = 2  # chunks per scan step, so XLA can overlap one's single-threaded ops (top k, sort) with the other's
GATHER_GROUP = 32  # _gather_sum unrolls this many slots per loop step


def _gather_sum(W, acts, rows, group: int | None = None):
    """sum_j acts[:, j, None] * W[rows[:, j]], as fused gather loops (unrolled over j, in groups
    of `group` under a fori_loop), where the einsum over W[rows] is a [T, k, d] gather plus a
    batched dot."""
    def part(lo, hi, out):
        for j in range(lo, hi):
            out = out + acts[:, j, None] * W[rows[:, j]]
        return out

    k, group = rows.shape[1], group or GATHER_GROUP
    out = part(1, min(k, group), acts[:, 0, None] * W[rows[:, 0]])
    if k <= group:
        return out
    full = k // group
    out = lax.fori_loop(1, full, lambda i, o: _dyn_part(W, acts, rows, i * group, group, o), out)
    return part(full * group, k, out)


def _dyn_part(W, acts, rows, start, size, out):
    a = lax.dynamic_slice_in_dim(acts, start, size, axis=1)
    r = lax.dynamic_slice_in_dim(rows, start, size, axis=1)
    for j in range(size):
        out = out + a[:, j, None] * W[r[:, j]]
    return out


def _gather_dot(W, g, rows):
    """[T, k]: g[t] . W[rows[t, j]], one fused reduction per j."""
    return jnp.stack([jnp.sum(g * W[rows[:, j]], axis=-1) for j in range(rows.shape[1])], axis=1)


def _add_rows(acc, rows, mine, weights, vectors):
    """acc[rows[t, j]] += weights[t, j] * vectors[t] for the (token, slot)s this shard owns
    (rows, mine, weights: [T, k]; vectors: [T, width]), sorted by row first (stable: a row's
    terms add in token order), so the scatter walks acc in order."""
    T, k = rows.shape
    n = acc.shape[0]
    key = jnp.where(mine, rows, n).reshape(-1)
    if (n + 1) * T * k < 2**31:  # one int32 sort of row * T k + position: a stable argsort, 2x faster
        packed = jnp.sort(key * (T * k) + jnp.arange(T * k, dtype=key.dtype))
        key, order = packed // (T * k), packed % (T * k)
    else:
        order = jnp.argsort(key, stable=True)
        key = key[order]
    upd = weights.reshape(-1)[order, None].astype(acc.dtype) * vectors[order // k].astype(acc.dtype)
    if acc.ndim == 1:
        upd = upd[:, 0]
    return acc.at[key].add(upd, mode="drop", indices_are_sorted=True)


def _chunk_step(params, dead, tv, aux_scale, carry, xy, *, k, k_aux, kind, aux, auxk_alpha, model_axis):
    """One chunk of tokens: top k, decode, error, and its gradient terms added to `carry`."""
    x, y = xy
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    n_local = W_enc.shape[0]

    def psum_model(v):
        return _psum(v, model_axis)

    xe = x - b_dec if kind == "sae" else x
    pre = jax.nn.relu(xe @ W_enc.T + b_enc)
    vals, idx = _local_topk(pre, k, model_axis)
    li, mine = _rows_of(idx, n_local, model_axis)
    acts = jnp.where(mine, vals, 0).astype(W_dec.dtype)
    out = psum_model(_gather_sum(W_dec, acts, li)) + b_dec
    if "W_skip" in params:
        out = out + x @ params["W_skip"].T
    e = y - out.astype(jnp.float32)
    g = ((-2.0 / tv) * e).astype(W_dec.dtype)  # d l_fvu / d out
    d_acts = jnp.where(mine, _gather_dot(W_dec, g, li), 0)

    c = dict(carry)
    c["sse"] = c["sse"] + jnp.sum(e**2)
    c["b_dec"] = c["b_dec"] + jnp.sum(g, axis=0, dtype=jnp.float32)
    if kind == "sae":  # the encoder reads x - b_dec
        c["b_dec"] = c["b_dec"] - jnp.sum(psum_model(_gather_sum(W_enc, d_acts, li)), axis=0, dtype=jnp.float32)
    if "W_skip" in params:
        c["W_skip"] = c["W_skip"] + (g.T @ x).astype(jnp.float32)
    c["W_enc"] = _add_rows(c["W_enc"], li, mine, d_acts, xe)
    c["W_dec"] = _add_rows(c["W_dec"], li, mine, acts, g)
    c["b_enc"] = _add_rows(c["b_enc"], li, mine, d_acts, jnp.ones((x.shape[0], 1), d_acts.dtype))
    if aux:
        masked = jnp.where(dead[None, :], pre, -jnp.inf)
        a_vals, a_idx = _local_topk(masked, k_aux, model_axis)
        ali, amine = _rows_of(a_idx, n_local, model_axis)
        a_acts = jnp.where(amine & (a_vals > -jnp.inf), a_vals, 0).astype(W_dec.dtype)
        r = psum_model(_gather_sum(W_dec, a_acts, ali)).astype(jnp.float32) - e  # e_hat - e (e: no grad)
        c["aux_sse"] = c["aux_sse"] + jnp.sum(r**2)
        c["W_dec"] = _add_rows(c["W_dec"], ali, amine, a_acts, (auxk_alpha * aux_scale * 2.0 / tv) * r)
    return c, (vals, idx)


def _psum(v, axis):
    return v if axis is None else lax.psum(v, axis)


def train_chunk(tokens: int) -> int:
    """Tokens per chunk of loss_and_grads for a (per-shard) batch of `tokens`: TRAIN_CHUNK on CPU
    (cache-sized pre-activations; an accelerator takes the batch whole)."""
    if jax.default_backend() == "cpu" and tokens > TRAIN_CHUNK and tokens % TRAIN_CHUNK == 0:
        return TRAIN_CHUNK
    return tokens


def _grads_body(params, x, y, dead, *, k, kind, aux, auxk_alpha, data_axis, model_axis):
    """One shard's loss pieces and gradients (tokens over data_axis, latents over model_axis)."""
    f32 = jnp.float32

    def psum_data(v):
        return _psum(v, data_axis)

    d = x.shape[1]
    x = x.astype(params["W_enc"].dtype)
    y = y.astype(f32)
    tokens = psum_data(jnp.asarray(y.shape[0], f32))
    mean = psum_data(jnp.sum(y, axis=0)) / tokens
    tv = psum_data(jnp.sum((y - mean) ** 2))
    k_aux = d // 2  # sparsify: heuristic from Appendix B.1 of the TopK paper
    n_dead = _psum(jnp.sum(dead), model_axis)
    aux_scale = jnp.minimum(n_dead / k_aux, 1.0)
    n = params["W_enc"].shape[0] * (1 if model_axis is None else lax.axis_size(model_axis))
    carry = {name: jnp.zeros(v.shape, f32) for name, v in params.items()}
    carry.update(sse=jnp.zeros((), f32), aux_sse=jnp.zeros((), f32))
    for name, v in carry.items():  # the sums vary over tokens' shards, latent rows also over latents'
        axes = tuple(a for a in (data_axis, model_axis if name in ("W_enc", "W_dec", "b_enc") else None) if a)
        if axes:
            carry[name] = lax.pcast(v, axes, to="varying")
    step = partial(_chunk_step, params, dead, tv, aux_scale, k=k, k_aux=min(k_aux, n), kind=kind, aux=aux,
                   auxk_alpha=auxk_alpha, model_axis=model_axis)
    T = x.shape[0]
    chunk = train_chunk(T)
    if chunk == T:
        carry, (vals, idx) = step(carry, (x, y))
    else:
        split = TRAIN_SPLIT if (T // chunk) % TRAIN_SPLIT == 0 else 1

        def steps(carry, xy):  # `split` chunks per scan step: independent until they add their rows
            outs = []
            for i in range(split):
                carry, out = step(carry, (xy[0][i], xy[1][i]))
                outs.append(out)
            return carry, tuple(jnp.stack(o) for o in zip(*outs))

        carry, (vals, idx) = lax.scan(steps, carry, (x.reshape(-1, split, chunk, d), y.reshape(-1, split, chunk, d)))
        vals, idx = vals.reshape(T, k), idx.reshape(T, k)
    grads = {name: psum_data(carry[name]) for name in params}
    l_fvu = psum_data(carry["sse"]) / tv
    auxk = aux_scale * psum_data(carry["aux_sse"]) / tv if aux else jnp.zeros((), f32)
    return grads, dict(fvu=l_fvu, auxk=auxk, top_acts=vals, top_indices=idx)


def loss_and_grads(params: dict, x, y, k: int, *, kind: str = "transcoder", dead_mask=None,
                   auxk_alpha: float = 0.0, mesh=None):
    """-> (loss, dict(fvu, auxk, top_acts, top_indices), grads): loss_fn's value and its gradient
    with respect to params (the same numbers as jax.value_and_grad(loss_fn, has_aux=True) up to
    float rounding; gradients in float32), computed by hand, sparsely, in token chunks."""
    _check_kind(kind)
    n = params["W_enc"].shape[0]
    if not 1 <= k <= n:
        raise UserError(f"k={k} must be between 1 and num_latents={n}")
    _check_mesh(mesh, x.shape[0], n)
    use_aux = dead_mask is not None and auxk_alpha != 0
    if dead_mask is None:
        dead_mask = jnp.zeros((n,), bool)

    def run(aux):
        body = partial(_grads_body, k=k, kind=kind, aux=aux, auxk_alpha=auxk_alpha)
        if mesh is None or mesh.devices.size == 1:  # no shard_map: its psums would copy every gradient
            return body(params, x, y, dead_mask, data_axis=None, model_axis=None)
        specs = param_specs(params)
        out_specs = (specs, dict(fvu=P(), auxk=P(), top_acts=P("data", None), top_indices=P("data", None)))
        return jax.shard_map(partial(body, data_axis="data", model_axis="model"), mesh=mesh,
                             in_specs=(specs, P("data", None), P("data", None), P("model")),
                             out_specs=out_specs)(params, x, y, dead_mask)

    if use_aux:  # AuxK's top k only when something is dead; without, AuxK and its gradient are 0
        grads, res = lax.cond(jnp.any(dead_mask), lambda: run(True), lambda: run(False))
    else:
        grads, res = run(False)
    loss = res["fvu"] + auxk_alpha * res["auxk"]
    return loss, res, grads


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
