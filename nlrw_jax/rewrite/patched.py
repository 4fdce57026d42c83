"""The patched forward: the next-token cross-entropy (and KL to the clean model) of every
condition at once.

The reference's rule (METHOD.md, "Evaluation"): at an evaluated position p take the
transcoder's latent vector, overwrite the selected latents with their simulated values (the
others keep their true values), keep the top k of the combined vector, decode it
(acts @ W_dec + b_dec + x @ W_skip^T) and replace the MLP output at p; the cross-entropy of the
next token at p is the score. For a residual SAE the decoded vector replaces the residual
stream at p instead. Conditions are FIXED_CONDITIONS (clean, the coder with its true latents, and
the baselines), then every (values variant x selection mask) pair.

`make_patched_eval` is the one used: nothing before the coder's layer, and nothing after the
window's last evaluated position, depends on the condition, so the clean model runs once per
window up to that position, keeping each later layer's keys/values; the patched rows then run
through the later layers as decode steps against that cache (one row per condition and
position in "each" mode, the paper's protocol; all of a window's positions together in
"whole_layer" mode). `make_patched_ce` is the plain full-window version (one whole forward of
the later layers per condition), kept as the reference the tests and benchmarks compare with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.models.gpt_neox import KV, GPTNeoX, LayerNorm
from nlrw_jax.sparse import coder as sc

# The baselines beside clean and the coder: zero ablation (the paper's bar), mean ablation (the
# layer's output at p replaced by its mean over the activation store), the coder with every latent
# at zero (what b_dec and the skip term alone give) and every latent at its mean activation
# (decoded through the same top-k rule). Explanations add something only where a rewrite beats these.
FIXED_CONDITIONS = ("clean", "transcoder", "zero_ablation", "mean_ablation", "coder_zero", "latent_means")


def check_shapes(values, masks, num_latents: int) -> None:
    """values [V, B, n] and masks [M, n] must be as wide as the transcoder (n latents)."""
    if masks.ndim != 2 or masks.shape[1] != num_latents:
        raise UserError(f"selection masks have shape {tuple(masks.shape)}, but the transcoder has {num_latents} "
                        f"latents: each mask must be [num_latents] wide")
    if values.ndim != 3 or values.shape[2] != num_latents:
        raise UserError(f"simulated values have shape {tuple(values.shape)}; expected [variants, sentences, "
                        f"{num_latents}]")


def check_positions(positions, seq_len: int, batch: int | None = None, real=None) -> None:
    """positions [B] or [B, R] (`real` [B, R] marks the used slots) must be integers in
    [0, seq_len - 2]: the scored next token p + 1 is in the window."""
    p = np.asarray(positions)
    if p.ndim not in (1, 2) or not np.issubdtype(p.dtype, np.integer) or p.size == 0:
        raise UserError(f"positions must be a non-empty [windows] or [windows, positions] integer array, got shape "
                        f"{p.shape} of {p.dtype}")
    if batch is not None and p.shape[0] != batch:
        raise UserError(f"{p.shape[0]} positions for {batch} windows: give one row of positions per window")
    used = np.ones(p.shape, bool) if real is None else np.asarray(real, bool)
    bad = np.argwhere(used & ((p < 0) | (p > seq_len - 2)))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise UserError(f"position {int(p[where])} (sentence {where[0]}) is outside the window: positions must "
                        f"be in [0, {seq_len - 2}] so that the next token p + 1 is inside the {seq_len}-token window")


def check_consecutive(positions, real) -> None:
    """Whole-layer patching reuses the clean keys/values before a window's first patched position
    only: after it, every position sees patched rows, so the patched ones must be consecutive."""
    for i, (p, used) in enumerate(zip(np.asarray(positions), np.asarray(real, bool))):
        p = p[used]
        if p.size and not np.array_equal(p, np.arange(p[0], p[0] + p.size)):
            raise UserError(f"whole_layer mode needs consecutive positions in each window, but window {i} has "
                            f"{p.tolist()}")


def _condition_rows(coder, x, resid_p, mlp_out_p, values, masks, means, kind: str, k: int):
    """The patched residual rows after the coder's layer for every condition -> [C, P, d] float32.
    x, resid_p, mlp_out_p [P, d]: the coder's input, the clean residual stream and the clean MLP
    output at the P patched positions; values [V, P, n]; masks [M, n]; means {"out": [d] the mean
    of what the coder replaces (MLP output, or the residual for an SAE), "latents": [n]}."""
    p_rows, n = x.shape[0], coder["W_enc"].shape[0]
    rows = jnp.arange(p_rows)

    def decode(acts, x):
        out = sc.decode(coder, *sc.topk_latents(acts, k))
        return out + x @ coder["W_skip"].T if "W_skip" in coder else out

    if kind == "transcoder":  # the MLP output is replaced; the rest of the row stays
        base, clean = resid_p - mlp_out_p, mlp_out_p
    else:  # the SAE's reconstruction replaces the residual row itself
        base, clean = jnp.zeros_like(resid_p), resid_p
    top_acts, top_idx, _ = sc.encode(coder, x, k, kind=kind)
    dense = jnp.zeros((p_rows, n), jnp.float32).at[rows[:, None], top_idx].set(top_acts)
    if kind == "sae":
        x = x - coder["b_dec"]  # the skip term (if any) sees what the encoder sees

    # One (variant, mask) pair at a time, in chunks of whole conditions: a [P, n] dense matrix per
    # condition in flight, never [V * M, P, n] (at 32,768 latents and thousands of rows, GBs).
    n_var, n_mask = values.shape[0], masks.shape[0]
    pairs = (jnp.repeat(jnp.arange(n_var), n_mask), jnp.tile(jnp.arange(n_mask), n_var))
    chunk = max(1, min(n_var * n_mask, (64 << 20) // max(1, p_rows * n)))
    sims = jax.lax.map(lambda vm: decode(jnp.where(masks[vm[1]], values[vm[0]], dense), x), pairs,
                       batch_size=chunk)  # [V * M, P, d]
    mean_latents = jnp.broadcast_to(means["latents"].astype(jnp.float32), dense.shape)
    fixed = jnp.stack([clean.astype(jnp.float32), decode(dense, x), jnp.zeros_like(clean, jnp.float32),
                       jnp.broadcast_to(means["out"].astype(jnp.float32), clean.shape), decode(jnp.zeros_like(dense), x),
                       decode(mean_latents, x)])
    return base[None] + jnp.concatenate([fixed, sims])  # [C, P, d]


def _head_logp(model: GPTNeoX, lm_params, rows):
    """Final LayerNorm + unembedding in float32 -> next-token log-probabilities [..., vocab]."""
    h = LayerNorm(model.config.layer_norm_eps, jnp.float32).apply({"params": lm_params["final_layer_norm"]}, rows)
    logits = h.astype(jnp.float32) @ lm_params["embed_out"]["kernel"].astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def make_patched_ce(model: GPTNeoX, layer: int, kind: str, k: int):
    """jit(lm_params, coder_params, windows [B, S], positions [B], values [V, B, n], masks [M, n],
    means) -> CE [F + V*M, B]: rows FIXED_CONDITIONS (F of them), then variant-major (v * M + m)."""
    c = model.config
    last = c.num_hidden_layers - 1
    sc.points_for(kind)  # an unknown kind is refused here, not at the first call

    def patched_ce(lm_params, coder, windows, positions, values, masks, means):
        b = jnp.arange(windows.shape[0])
        in_point = sc.points_for(kind)[0]
        _, got = model.apply({"params": lm_params}, windows, last_layer=layer,
                             capture=[(layer, in_point), (layer, "mlp_out"), (layer, "resid_post")])
        resid = got[(layer, "resid_post")]  # [B, S, d]: the clean stream after `layer`
        at_p = [got[(layer, n)][b, positions].astype(jnp.float32) for n in (in_point, "resid_post", "mlp_out")]
        rows = _condition_rows(coder, *at_p, values, masks, means, kind, k)

        def finish(row):  # one condition: the patched row through the rest of the model, logits at p
            if layer < last:
                stream = resid.at[b, positions].set(row.astype(resid.dtype))
                _, got = model.apply({"params": lm_params}, windows, resid=stream, first_layer=layer + 1,
                                     last_layer=last, capture=[(last, "resid_post")])
                row = got[(last, "resid_post")][b, positions]
            logp = _head_logp(model, lm_params, row)
            return -logp[b, windows[b, positions + 1]]

        return jax.lax.map(finish, rows)

    return jax.jit(patched_ce)


def run_length(positions, seq_len: int, multiple: int) -> int:
    """Tokens the clean run needs: max(p) + 1, rounded up to `multiple` (one compiled shape per
    multiple, at most seq_len / multiple of them) and capped at seq_len."""
    need = int(np.max(np.asarray(positions))) + 1
    return min(seq_len, -(-need // multiple) * multiple)


MODES = ("each", "whole_layer")


def make_patched_eval(model: GPTNeoX, layer: int, kind: str, k: int, mode: str = "each",
                      length_multiple: int = 32):
    """fn(lm_params, coder_params, windows [B, S], positions [B, R], real [B, R], values [V, B, R, n],
    masks [M, n], means) -> (CE [C, B, R], KL [C, B, R]), C = F + V*M in make_patched_ce's row order;
    KL = KL(clean || patched) of the next-token distribution at p (0 for the clean row). `real`
    marks the used position slots (windows have different numbers of positions); the others'
    outputs are meaningless.

    mode "each": every position is patched alone (the paper's protocol with R = 1): each of the
    C x R rows is one decode step against the clean keys/values before its own p.
    mode "whole_layer": the window's positions are all patched at once, so a later position's
    attention sees the patched rows of earlier ones (the layer truly replaced there): per
    condition, the R rows run through the later layers together, as ordinary decoding, against
    the clean keys/values of the unpatched positions.

    Cost: one clean forward over the first run_length(positions) tokens (nothing after the last p
    can reach an output at or before it), then the patched rows through the later layers. fn
    checks the positions on the host (UserError), then calls a jit compiled once per run length."""
    c = model.config
    last = c.num_hidden_layers - 1
    later = list(range(layer + 1, last + 1))
    in_point = sc.points_for(kind)[0]
    if mode not in MODES:
        raise UserError(f"evaluation mode {mode!r} is not one of {MODES}")
    if length_multiple < 1:
        raise UserError(f"length_multiple must be >= 1, got {length_multiple}")

    def patched(lm_params, coder, windows, positions, real, values, masks, means, length):
        bsz, r = positions.shape
        b = jnp.arange(bsz)[:, None]
        capture = [(layer, in_point), (layer, "mlp_out"), (layer, "resid_post"), *[(i, KV) for i in later]]
        _, got = model.apply({"params": lm_params}, windows[:, :length], last_layer=last, capture=capture)
        at_p = [got[(layer, n)][b, positions].astype(jnp.float32).reshape(bsz * r, -1)
                for n in (in_point, "resid_post", "mlp_out")]
        rows = _condition_rows(coder, *at_p, values.reshape(values.shape[0], bsz * r, -1), masks, means, kind, k)
        n_cond = rows.shape[0]
        rows = rows.reshape(n_cond, bsz, r, -1)  # [C, B, R, d]

        def later_layers(stream, pos, valid, **kw):  # stream [B, s, d] at positions pos [B, s]
            cache = {i: got[(i, KV)]._replace(valid=valid) for i in later}
            _, out = model.apply({"params": lm_params}, jnp.zeros(pos.shape, jnp.int32), position_ids=pos,
                                 resid=stream.astype(model.dtype), first_layer=layer + 1, last_layer=last,
                                 capture=[(last, "resid_post")], kv_cache=cache, **kw)
            return out[(last, "resid_post")]

        if later:
            keys = jnp.arange(length)
            if mode == "each":
                # All C x R rows of a window in one decode step, each seeing only the clean keys
                # before its own p (and itself).
                stream = jnp.swapaxes(rows, 0, 1).reshape(bsz, n_cond * r, -1)
                pos = jnp.broadcast_to(positions[:, None, :], (bsz, n_cond, r)).reshape(bsz, n_cond * r)
                out = later_layers(stream, pos, keys[None, None, :] < pos[:, :, None], independent_rows=True)
                rows = jnp.swapaxes(out.reshape(bsz, n_cond, r, -1), 0, 1)
            else:
                # Per condition, the window's R patched rows decode together (earlier patched rows
                # are seen by later ones); the clean keys of patched positions are hidden.
                patched_key = ((keys[None, None, :] == positions[:, :, None]) & real[:, :, None]).any(1)
                valid = (keys[None, None, :] < positions[:, :, None]) & ~patched_key[:, None, :]
                rows = jax.lax.map(lambda row: later_layers(row, positions, valid, attention_mask=real), rows)
        logp = _head_logp(model, lm_params, rows)  # [C, B, R, vocab]
        nxt = windows[b, jnp.minimum(positions + 1, windows.shape[1] - 1)]
        ce = -jnp.take_along_axis(logp, jnp.broadcast_to(nxt[None, :, :, None], (n_cond, bsz, r, 1)), -1)[..., 0]
        kl = jnp.sum(jnp.exp(logp[0]) * (logp[0] - logp), axis=-1)
        return ce, kl

    jitted = jax.jit(patched, static_argnames="length")

    def patched_eval(lm_params, coder, windows, positions, real, values, masks, means):
        check_positions(positions, windows.shape[1], windows.shape[0], real)
        if mode == "whole_layer":
            check_consecutive(positions, real)
        used = np.where(np.asarray(real, bool), np.asarray(positions), 0)
        return jitted(lm_params, coder, windows, positions, real, values, masks, means,
                      length=run_length(used, windows.shape[1], length_multiple))

    return patched_eval
