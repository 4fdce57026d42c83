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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nlrw_jax.errors import UserError
from nlrw_jax.models.gpt_neox import GPTNeoX, LayerNorm
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


def make_patched_ce(model: GPTNeoX, layer: int, kind: str, k: int):
    """jit(lm_params, coder_params, windows [B, S], positions [B], values [V, B, n], masks [M, n])
    -> CE [3 + V*M, B]: rows FIXED_CONDITIONS, then variant-major (v * M + m)."""
    c = model.config
    last = c.num_hidden_layers - 1
    in_point = sc.points_for(kind)[0]

    def decode(coder, acts, x):
        out = sc.decode(coder, *sc.topk_latents(acts, k))
        return out + x @ coder["W_skip"].T if "W_skip" in coder else out

    def patched_ce(lm_params, coder, windows, positions, values, masks):
        b = jnp.arange(windows.shape[0])
        _, got = model.apply({"params": lm_params}, windows, last_layer=layer,
                             capture=[(layer, "mlp_in"), (layer, "mlp_out"), (layer, "resid_post")])
        resid = got[(layer, "resid_post")]  # [B, S, d]: the clean stream after `layer`
        x = got[(layer, in_point)][b, positions].astype(jnp.float32)  # the coder's input at p
        resid_p = resid[b, positions].astype(jnp.float32)
        if kind == "transcoder":  # the MLP output at p is replaced; the rest of the row stays
            base, clean = resid_p - got[(layer, "mlp_out")][b, positions], got[(layer, "mlp_out")][b, positions]
        else:  # the SAE's reconstruction replaces the residual row itself
            base, clean = jnp.zeros_like(resid_p), resid_p
        top_acts, top_idx, _ = sc.encode(coder, x, k, kind=kind)
        dense = jnp.zeros((x.shape[0], coder["W_enc"].shape[0]), jnp.float32).at[b[:, None], top_idx].set(top_acts)
        if kind == "sae":
            x = x - coder["b_dec"]  # the skip term (if any) sees what the encoder sees

        def simulated(vals, mask):  # [B, n], [n] -> the decoded replacement [B, d]
            return decode(coder, jnp.where(mask, vals, dense), x)

        sims = jax.vmap(lambda v: jax.vmap(lambda m: simulated(v, m))(masks))(values)  # [V, M, B, d]
        outs = jnp.concatenate([jnp.stack([clean.astype(jnp.float32), decode(coder, dense, x), jnp.zeros_like(clean,
                                jnp.float32)]), sims.reshape(-1, *sims.shape[2:])])  # [C, B, d]
        rows = base[None] + outs

        def finish(row):  # one condition: the patched row through the rest of the model, logits at p
            if layer < last:
                stream = resid.at[b, positions].set(row.astype(resid.dtype))
                _, got = model.apply({"params": lm_params}, windows, resid=stream, first_layer=layer + 1,
                                     last_layer=last, capture=[(last, "resid_post")])
                row = got[(last, "resid_post")][b, positions]
            h = LayerNorm(c.layer_norm_eps, jnp.float32).apply({"params": lm_params["final_layer_norm"]}, row)
            logits = h.astype(jnp.float32) @ lm_params["embed_out"]["kernel"].astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -logp[b, windows[b, positions + 1]]

        return jax.lax.map(finish, rows)

    return jax.jit(patched_ce)
