"""The simulator: an LLM predicts each explained latent's activation from its explanation.

One prediction per (context, latent): the context is a validation window and one random
position p in it; the prompt shows the 32 tokens ending at p with p's token marked, and the
explanation (METHOD.md, "The simulator"). The answer is forced to start with "[", so one
generation step's log-probs over the digits 0-9 are the prediction: no list is generated or
parsed, and the prompt's shared part (system prompt, few-shot turns, then the window or the
explanation, `simulate.order`) is a common prefix that vLLM's prefix cache serves.

The work is a grid of shards (contexts_per_shard contexts x latents_per_shard latents), each
with the digit log-probs [c, l, 10] (the stage, nlrw_jax.stages.simulate, writes and resumes them).
"""

from __future__ import annotations

import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P

ORDERS = ("window_first", "explanation_first")
READOUTS = ("renormalised", "reference")


# ------------------------------------------------------------------------------------ contexts


def true_values(contexts: dict, latents: np.ndarray) -> np.ndarray:
    """[N, L] true activations of `latents` at each context's position (0 outside the top k)."""
    hit = contexts["top_idx"][:, :, None] == np.asarray(latents)[None, None, :]
    return np.where(hit, contexts["top_acts"][:, :, None], 0.0).max(axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------- shards


def shard_grid(n_contexts: int, n_latents: int, contexts_per_shard: int,
               latents_per_shard: int) -> list[tuple[int, int, int, int]]:
    """[(context start, stop, latent start, stop)] in shard order."""
    return [(c, min(c + contexts_per_shard, n_contexts), lo, min(lo + latents_per_shard, n_latents))
            for c in range(0, n_contexts, contexts_per_shard)
            for lo in range(0, n_latents, latents_per_shard)]


def shard_prompts(backend, tok, explanations, latents, contexts, width, c0, c1, order):
    """The shard's prompts (and their (context, latent) slots) in prefix-sharing order: context-major
    when the window leads the prompt, latent-major when the explanation does."""
    pieces = {}
    for c in range(c0, c1):
        p = int(contexts["positions"][c])
        pieces[c] = P.token_strings(tok, contexts["windows"][c, p - width + 1:p + 1])
    pairs = [(c, j) for c in range(c0, c1) for j in range(len(latents))]
    if order == "explanation_first":
        pairs.sort(key=lambda cj: (cj[1], cj[0]))
    pairs = [(c, j) for c, j in pairs if explanations.get(int(latents[j])) is not None]
    prompts = [backend.render(P.simulator_messages(explanations[int(latents[j])], pieces[c], order),
                              P.ANSWER_PREFIX) for c, j in pairs]
    return prompts, pairs


def check_finite_or_inf(logprobs: np.ndarray, latents: np.ndarray, where: str) -> None:
    """-inf is a digit outside the top-N log-probs; NaN is a broken prediction and is refused."""
    bad = np.isnan(logprobs).any(axis=(0, 2)) | (logprobs > 1e-3).any(axis=(0, 2))
    if bad.any():
        raise UserError(f"{where}: NaN or positive log-probs in the predictions of latent {int(latents[bad][0])}")


# ------------------------------------------------------------------------------ reading them back


def expected_digit(logprobs: np.ndarray, readout: str) -> np.ndarray:
    """The expected rating sum_d p(d) d over the digits found in the top-N log-probs, in [0, 9].
    reference: not renormalised (the mass outside the digits counts as 0, as the paper read it);
    renormalised: divided by the digits' total mass (0 when no digit is in the top N)."""
    p = np.exp(logprobs.astype(np.float64))
    ev = (p * np.arange(10)).sum(-1)
    if readout == "reference":
        return ev.astype(np.float32)
    mass = p.sum(-1)
    return np.where(mass > 0, ev / np.where(mass > 0, mass, 1.0), 0.0).astype(np.float32)


def raw_activation(expected: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """The raw mapping: a rating e in [0, 9] onto linspace(0, max activation of the latent, 10)."""
    return (expected / 9.0 * max_act).astype(np.float32)
