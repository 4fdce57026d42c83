"""One compiled patched forward: per-sentence cross-entropy for every condition at once.

Each evaluated sentence has one position p. The reference's rule (METHOD.md, "Evaluation"): take
the transcoder's latent vector at p, overwrite the selected latents with their simulated values
(the others keep their true values), keep the top k of the combined vector, decode it
(acts @ W_dec + b_dec + x @ W_skip^T) and replace the MLP output at p only; the cross-entropy of
the next token at p is the score. For a residual SAE the decoded vector replaces the residual
stream at p instead.

Nothing before layer `layer`, and nothing at positions other than p, depends on the condition,
so the clean model runs once per sentence up to that layer; each condition only changes one row
of the residual stream, which then runs through the remaining layers (none for the tiny
default's last layer) and the unembedding at p alone. Conditions are: clean, transcoder (all
true latents), zero ablation, then every (values variant x selection mask) pair.

`make_patched_ce_kv` gives the same CE (and the KL to the clean next-token distribution) at a
fraction of the cost when layers follow the patched one: positions after p cannot change the
output at p, so the clean run stops at the batch's largest p; positions before p are the same in
every condition, so each later layer attends to the clean run's keys/values there (a KV cache)
and only the patched row is computed, for all conditions at once as one decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.models.gpt_neox import KV, GPTNeoX, LayerNorm
from nlrw_jax.sparse import coder as sc

FIXED_CONDITIONS = ("clean", "transcoder", "zero_ablation")


def check_shapes(values, masks, num_latents: int) -> None:
    """values [V, B, n] and masks [M, n] must be as wide as the transcoder (n latents)."""
    if masks.ndim != 2 or masks.shape[1] != num_latents:
        raise UserError(f"selection masks have shape {tuple(masks.shape)}, but the transcoder has {num_latents} "
                        f"latents: each mask must be [num_latents] wide")
    if values.ndim != 3 or values.shape[2] != num_latents:
        raise UserError(f"simulated values have shape {tuple(values.shape)}; expected [variants, sentences, "
                        f"{num_latents}]")


def check_positions(positions, seq_len: int, batch: int | None = None) -> None:
    """positions [B] must be integers in [0, seq_len - 2]: the scored next token p + 1 is in the window."""
    p = np.asarray(positions)
    if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer) or p.size == 0:
        raise UserError(f"positions must be a non-empty 1-D integer array, got shape {p.shape} of {p.dtype}")
    if batch is not None and p.shape[0] != batch:
        raise UserError(f"{p.shape[0]} positions for {batch} windows: give one position per window")
    bad = np.flatnonzero((p < 0) | (p > seq_len - 2))
    if bad.size:
        raise UserError(f"position {int(p[bad[0]])} (sentence {int(bad[0])}) is outside the window: positions must "
                        f"be in [0, {seq_len - 2}] so that the next token p + 1 is inside the {seq_len}-token window")


def _condition_rows(coder, got, positions, values, masks, layer: int, kind: str, k: int):
    """The patched residual row at p after `layer` for every condition -> [C, B, d] float32.
    `got`: the clean run's captures (mlp_in, mlp_out, resid_post) at `layer`."""
    b = jnp.arange(positions.shape[0])
    in_point = sc.points_for(kind)[0]

    def decode(acts, x):
        out = sc.decode(coder, *sc.topk_latents(acts, k))
        return out + x @ coder["W_skip"].T if "W_skip" in coder else out

    x = got[(layer, in_point)][b, positions].astype(jnp.float32)  # the coder's input at p
    resid_p = got[(layer, "resid_post")][b, positions].astype(jnp.float32)
    if kind == "transcoder":  # the MLP output at p is replaced; the rest of the row stays
        base, clean = resid_p - got[(layer, "mlp_out")][b, positions], got[(layer, "mlp_out")][b, positions]
    else:  # the SAE's reconstruction replaces the residual row itself
        base, clean = jnp.zeros_like(resid_p), resid_p
    top_acts, top_idx, _ = sc.encode(coder, x, k, kind=kind)
    dense = jnp.zeros((x.shape[0], coder["W_enc"].shape[0]), jnp.float32).at[b[:, None], top_idx].set(top_acts)
    if kind == "sae":
        x = x - coder["b_dec"]  # the skip term (if any) sees what the encoder sees

    def simulated(vals, mask):  # [B, n], [n] -> the decoded replacement [B, d]
        return decode(jnp.where(mask, vals, dense), x)

    sims = jax.vmap(lambda v: jax.vmap(lambda m: simulated(v, m))(masks))(values)  # [V, M, B, d]
    outs = jnp.concatenate([jnp.stack([clean.astype(jnp.float32), decode(dense, x), jnp.zeros_like(clean,
                            jnp.float32)]), sims.reshape(-1, *sims.shape[2:])])  # [C, B, d]
    return base[None] + outs


def _head_logp(model: GPTNeoX, lm_params, rows):
    """Final LayerNorm + unembedding in float32 -> next-token log-probabilities [..., vocab]."""
    h = LayerNorm(model.config.layer_norm_eps, jnp.float32).apply({"params": lm_params["final_layer_norm"]}, rows)
    logits = h.astype(jnp.float32) @ lm_params["embed_out"]["kernel"].astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def make_patched_ce(model: GPTNeoX, layer: int, kind: str, k: int):
    """jit(lm_params, coder_params, windows [B, S], positions [B], values [V, B, n], masks [M, n])
    -> CE [3 + V*M, B]: rows FIXED_CONDITIONS, then variant-major (v * M + m)."""
    c = model.config
    last = c.num_hidden_layers - 1
    sc.points_for(kind)  # an unknown kind is refused here, not at the first call

    def patched_ce(lm_params, coder, windows, positions, values, masks):
        b = jnp.arange(windows.shape[0])
        _, got = model.apply({"params": lm_params}, windows, last_layer=layer,
                             capture=[(layer, "mlp_in"), (layer, "mlp_out"), (layer, "resid_post")])
        resid = got[(layer, "resid_post")]  # [B, S, d]: the clean stream after `layer`
        rows = _condition_rows(coder, got, positions, values, masks, layer, kind, k)

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


def make_patched_ce_kv(model: GPTNeoX, layer: int, kind: str, k: int, length_multiple: int = 32):
    """fn(lm_params, coder_params, windows [B, S], positions [B], values [V, B, n], masks [M, n])
    -> (CE [C, B], KL [C, B]), C = 3 + V*M in make_patched_ce's row order; KL = KL(clean || patched)
    of the next-token distribution at p (0 for the clean row).

    Cost: one clean forward over the first run_length(positions) tokens, then C rows per sentence
    through the later layers as one decode step against the clean keys/values. fn checks the
    positions on the host (UserError), then calls a jit compiled once per run length."""
    c = model.config
    last = c.num_hidden_layers - 1
    later = list(range(layer + 1, last + 1))
    sc.points_for(kind)
    if length_multiple < 1:
        raise UserError(f"length_multiple must be >= 1, got {length_multiple}")

    def patched(lm_params, coder, windows, positions, values, masks, length):
        bsz = windows.shape[0]
        b = jnp.arange(bsz)
        capture = [(layer, "mlp_in"), (layer, "mlp_out"), (layer, "resid_post"), *[(i, KV) for i in later]]
        # Causal: nothing after max(p) can reach any sentence's output at its p.
        _, got = model.apply({"params": lm_params}, windows[:, :length], last_layer=last, capture=capture)
        rows = _condition_rows(coder, got, positions, values, masks, layer, kind, k)  # [C, B, d]
        if later:
            # Sentence b's row sees the clean keys/values before its own p_b (p_b and later were clean
            # tokens of the full run, not what the patched row sees) and itself.
            valid = jnp.arange(length)[None, :] < positions[:, None]
            cache = {i: got[(i, KV)]._replace(valid=valid) for i in later}
            n_cond = rows.shape[0]
            # The C conditions are C alternative rows at the same position p_b: one decode step.
            stream = jnp.swapaxes(rows, 0, 1).astype(model.dtype)  # [B, C, d]
            at_p = jnp.broadcast_to(positions[:, None], (bsz, n_cond))
            _, out = model.apply({"params": lm_params}, jnp.zeros((bsz, n_cond), jnp.int32), position_ids=at_p,
                                 resid=stream, first_layer=layer + 1, last_layer=last, kv_cache=cache,
                                 capture=[(last, "resid_post")])
            rows = jnp.swapaxes(out[(last, "resid_post")], 0, 1)  # [C, B, d]
        logp = _head_logp(model, lm_params, rows)  # [C, B, vocab]
        ce = -logp[:, b, windows[b, positions + 1]]
        kl = jnp.sum(jnp.exp(logp[0]) * (logp[0] - logp), axis=-1)
        return ce, kl

    jitted = jax.jit(patched, static_argnames="length")

    def patched_ce_kv(lm_params, coder, windows, positions, values, masks):
        check_positions(positions, windows.shape[1], windows.shape[0])
        return jitted(lm_params, coder, windows, positions, values, masks,
                      length=run_length(positions, windows.shape[1], length_multiple))

    return patched_ce_kv
