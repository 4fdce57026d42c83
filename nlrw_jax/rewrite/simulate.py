"""The simulator: an LLM predicts each explained latent's activation from its explanation.

A context is a position p of a validation window. Two modes (`simulate.mode`):
- one_at_a_time (the paper's protocol): one prompt per (context, latent). The prompt shows the 32
  tokens ending at p with p's token marked, and the explanation (METHOD.md, "The simulator"). The
  answer is forced to start with "[", so one generation step's log-probs over the digits 0-9 are
  the prediction: no list is generated or parsed, and the prompt's shared part (system prompt,
  few-shot turns, then the window or the explanation, `simulate.order`) is a common prefix that
  vLLM's prefix cache serves.
- all_at_once: one prompt per (window, latent). The explanation, then the window's displayed tokens
  one per line, each followed by a tab and a rating slot; the digit log-probs after the tab of each
  read position come from one forward pass (backend.slot_logprobs). A window's contexts are
  read_positions contiguous positions, each with window_tokens-1 displayed tokens before it.

The work is a grid of shards (contexts_per_shard contexts x latents_per_shard latents; in
all_at_once the context blocks are whole windows), each with the digit log-probs [c, l, 10] (the
stage, nlrw_jax.stages.simulate, writes and resumes them).
"""

from __future__ import annotations

import numpy as np

from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P

ORDERS = ("window_first", "explanation_first")
READOUTS = ("renormalised", "reference")


# ------------------------------------------------------------------------------------ contexts


def true_values(contexts: dict, latents: np.ndarray, rows=slice(None)) -> np.ndarray:
    """[R, L] true activations of `latents` at the context `rows` (a slice or index array; default
    all), 0 outside the top k. Made in blocks of rows: the [rows, k, L] comparison of all contexts
    at once would be tens of GB at the paper's widths."""
    idx, acts, latents = contexts["top_idx"][rows], contexts["top_acts"][rows], np.asarray(latents)
    out = np.zeros((len(idx), len(latents)), np.float32)
    step = max(1, (1 << 24) // max(1, idx.shape[1] * len(latents)))
    for lo in range(0, len(idx), step):
        hit = idx[lo:lo + step, :, None] == latents[None, None, :]
        out[lo:lo + step] = np.where(hit, acts[lo:lo + step, :, None], 0.0).max(axis=1)
    return out


# --------------------------------------------------------------------------------------- shards


def shard_grid(n_contexts: int, n_latents: int, contexts_per_shard: int,
               latents_per_shard: int, per_window: int = 1) -> list[tuple[int, int, int, int]]:
    """[(context start, stop, latent start, stop)] in shard order. With per_window > 1 (all_at_once,
    window-major contexts) a shard's contexts are whole windows: contexts_per_shard rounded down to a
    multiple of per_window, at least one window, so no prompt is split over two shards."""
    step = max(1, contexts_per_shard // per_window) * per_window
    return [(c, min(c + step, n_contexts), lo, min(lo + latents_per_shard, n_latents))
            for c in range(0, n_contexts, step)
            for lo in range(0, n_latents, latents_per_shard)]


def shard_prompts(backend, tok, explanations, latents, contexts, width, c0, c1, order):
    """The shard's prompts (and their (context, latent) slots) in prefix-sharing order: context-major
    when the window leads the prompt, latent-major when the explanation does."""
    pieces = {}
    for c in range(c0, c1):
        p = int(contexts["positions"][c])
        pieces[c] = P.token_strings(tok, contexts["windows"][contexts["window"][c], p - width + 1:p + 1])
    pairs = [(c, j) for c in range(c0, c1) for j in range(len(latents))]
    if order == "explanation_first":
        pairs.sort(key=lambda cj: (cj[1], cj[0]))
    pairs = [(c, j) for c, j in pairs if explanations.get(int(latents[j])) is not None]
    prompts = [backend.render(P.simulator_messages(explanations[int(latents[j])], pieces[c], order),
                              P.ANSWER_PREFIX) for c, j in pairs]
    return prompts, pairs


def window_prompts(backend, tok, explanations, latents, contexts, width, c0, c1):
    """all_at_once: the shard's prompts, one per (window, explained latent), latent-major (a latent's
    prompts share the explanation as prefix), with each prompt's read slots and the contexts they
    give, [(contexts [r], latent slot j)]. A slot is the index of the tab after a read position's
    token: the next token there is its rating."""
    sep = backend.tokenizer.encode(P.SEPARATOR, add_special_tokens=False)
    rest = backend.tokenizer.encode(P.PLACEHOLDER + "\n", add_special_tokens=False)
    bodies = []  # per window in the shard: (line ids, slot offsets, its contexts)
    window, positions = contexts["window"], contexts["positions"]
    for w in np.unique(window[c0:c1]):
        cs = c0 + np.flatnonzero(window[c0:c1] == w)
        ps = positions[cs]
        if not np.array_equal(ps, ps[0] + np.arange(len(ps))):
            raise UserError(f"contexts of window {w} are not contiguous positions; delete the simulate "
                            f"folder and rerun `nlrw simulate`")
        shown = contexts["windows"][w, ps[0] - width + 1:ps[-1] + 1]
        ids, slots = [], []
        for piece in P.token_strings(tok, shown):
            ids += backend.tokenizer.encode(P.line_text(piece), add_special_tokens=False) + sep
            slots.append(len(ids) - 1)
            ids += rest
        bodies.append((ids, slots[-len(cs):], cs))
    prompts, slots, pairs = [], [], []
    for j, lat in enumerate(latents):
        expl = explanations.get(int(lat))
        if expl is None:
            continue
        head = backend.render(P.simulator_all_messages(expl))
        for ids, offsets, cs in bodies:
            prompts.append(head + ids)
            slots.append([len(head) + o for o in offsets])
            pairs.append((cs, j))
    return prompts, slots, pairs


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
