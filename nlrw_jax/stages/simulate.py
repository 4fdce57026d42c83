"""`nlrw simulate`: the LLM predicts each explained latent's activation at the evaluation and
calibration contexts from its explanation (nlrw_jax.rewrite.simulate).

The work is a grid of shards, each written atomically to simulate/shards/NNNNN.npz.
`nlrw simulate --shard i --num-shards n` does the shards k with k % n == i (one GPU node of a
pool each, in parallel on one folder by design); a rerun skips finished shards, a killed worker
loses only the shard in flight, and a shard is one file, so nothing is counted twice. Both modes
(simulate.mode) share this. `simulate.sentences` evaluation windows come first, then
`simulate.calibration` calibration windows (only for fitting the quantile maps); each window gives
one context (one_at_a_time) or read_positions contexts (all_at_once).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.io import save_npz
from nlrw_jax.rewrite.simulate import check_finite_or_inf, expected_digit, shard_grid, shard_prompts, \
    window_prompts
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.common import LazyBackend, data_identity, llm_identity, load_coder, load_explanations, \
    model_folder, model_identity, run_folder, subject_tokenizer, token_caches
from nlrw_jax.stages.live import live_progress


def make_contexts(cfg: Config) -> dict:
    """Validation windows, the contexts' positions in them, and the transcoder's true latents there.

    {windows [W, ctx] int32, window [N] int32 (each context's row of windows), positions [N] int32,
    n_eval, top_acts [N, k], top_idx [N, k]}. Contexts are window-major; the first n_eval are the
    evaluation contexts (in the first `sentences` windows), the rest calibration contexts (later
    windows). one_at_a_time: W == N, one random position per window (the paper's protocol).
    all_at_once: read_positions contiguous positions per window, the first after window_tokens-1
    tokens, the last before a next token, at a random offset."""
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.capture import forward_fn
    from nlrw_jax.interpret.examples import encoder
    from nlrw_jax.models import hf
    from nlrw_jax.sparse.coder import points_for

    s, width, ctx = cfg.simulate, cfg.examples.window_tokens, cfg.data.ctx_len
    _, val_cache = token_caches(cfg)
    n_win = s.sentences + s.calibration
    windows = token_data.validation_windows(val_cache, ctx, n_win)  # a clear error if the split is too small
    rng = np.random.default_rng([s.seed, 1])
    if s.mode == "one_at_a_time":
        per = 1
        positions = rng.integers(width - 1, ctx - 1, size=n_win).astype(np.int32)
    else:  # displayed: width-1 tokens of context, then the read positions; a next token follows the last
        per = s.read_positions
        starts = rng.integers(0, ctx - (width - 1 + per), size=n_win)
        positions = (starts[:, None] + width - 1 + np.arange(per)).reshape(-1).astype(np.int32)
    window = np.repeat(np.arange(n_win, dtype=np.int32), per)
    config, lm_params = hf.load(model_folder(cfg), dtype=jnp.dtype(cfg.model.dtype))
    point = points_for(cfg.sparse.kind)[0]
    fwd = forward_fn(config, cfg.model.layer, (point,), cfg.model.dtype, jnp.float32)
    coder, meta, _ = load_coder(cfg)
    acts, idx = [], []
    for lo in range(0, n_win, cfg.eval.batch_size):
        hi = min(lo + cfg.eval.batch_size, n_win)
        x = np.asarray(fwd(lm_params, jnp.asarray(windows[lo:hi]))[point])
        x = x.reshape(hi - lo, ctx, x.shape[-1])[window[lo * per:hi * per] - lo, positions[lo * per:hi * per]]
        a, i = encoder(meta["k"], meta["kind"])(coder, jnp.asarray(x))
        acts.append(np.asarray(a, np.float32))
        idx.append(np.asarray(i, np.int32))
    return dict(windows=windows, window=window, positions=positions, n_eval=np.int32(s.sentences * per),
                top_acts=np.concatenate(acts), top_idx=np.concatenate(idx))


def per_window(cfg: Config) -> int:
    """Contexts per window: read_positions in all_at_once, else 1."""
    return cfg.simulate.read_positions if cfg.simulate.mode == "all_at_once" else 1


def grid_for(cfg: Config, n_contexts: int, n_latents: int) -> list[tuple[int, int, int, int]]:
    s = cfg.simulate
    return shard_grid(n_contexts, n_latents, s.contexts_per_shard, s.latents_per_shard, per_window(cfg))


def simulate_identity(cfg: Config) -> dict:
    """What the predictions depend on (the readout is applied later, so it is not part of it)."""
    sim = {k: v for k, v in identity(cfg.simulate).items() if k != "readout"}
    if cfg.simulate.mode == "one_at_a_time":  # as before the modes existed: those run folders still resume
        del sim["mode"], sim["read_positions"]
    run = run_folder(cfg)
    if not run.explanations.exists():
        raise UserError(f"{run.explanations}: no explanations; run `nlrw explain` first")
    return {**model_identity(cfg), **data_identity(cfg, token_caches(cfg)), "coder": load_coder(cfg)[2],
            "window_tokens": cfg.examples.window_tokens, "explanations": file_digest(run.explanations),
            "simulate": sim, **llm_identity(cfg, "simulate")}


def run(cfg: Config, shard: int | None = None, num_shards: int = 1, progress: bool = True,
        backend=None) -> Path:
    s = cfg.simulate
    if num_shards < 1 or (shard is not None and not 0 <= shard < num_shards):
        raise UserError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")
    explanations = load_explanations(cfg)
    latents = np.asarray(sorted(explanations), np.int32)
    run = run_folder(cfg)
    part = None if shard is None else f"shard-{shard}-of-{num_shards}"
    with run.claim("simulate", simulate_identity(cfg), part=part) as out:
        if not run.contexts.exists():
            save_npz(run.contexts, make_contexts(cfg))  # the same on every worker: whoever is first writes it
        contexts = run.read_contexts()
        grid = grid_for(cfg, len(contexts["positions"]), len(latents))
        (out / "shards").mkdir(exist_ok=True)
        mine = [k for k in range(len(grid)) if shard is None or k % num_shards == shard]
        todo = [k for k in mine if not run.shard(k).exists()]
        if todo:
            tok = subject_tokenizer(cfg)
            backend = backend or LazyBackend(cfg, progress, "simulate")
            backend.candidate_ids(P.DIGITS)
            n_prompts = sum((c1 - c0) * sum(explanations[int(x)] is not None for x in latents[l0:l1])
                            for c0, c1, l0, l1 in (grid[k] for k in todo))
            bar = live_progress(cfg, "simulate", backend, progress, total=n_prompts, unit="prediction",
                                desc=f"simulate ({len(todo)} of {len(grid)} shards)", smoothing=0.1)
            for k in todo:
                c0, c1, l0, l1 = grid[k]
                lat = latents[l0:l1]
                logprobs = np.full((c1 - c0, l1 - l0, len(P.DIGITS)), -np.inf, np.float32)
                if s.mode == "all_at_once":
                    prompts, slots, pairs = window_prompts(backend, tok, explanations, lat, contexts,
                                                           cfg.examples.window_tokens, c0, c1)
                    if prompts:
                        got = backend.slot_logprobs(prompts, slots, P.DIGITS, bar=bar)
                        for (cs, j), rows in zip(pairs, got):
                            logprobs[cs - c0, j] = rows
                else:
                    prompts, pairs = shard_prompts(backend, tok, explanations, lat, contexts,
                                                   cfg.examples.window_tokens, c0, c1, s.order)
                    if prompts:
                        got = backend.next_token_logprobs(prompts, P.DIGITS, bar=bar)
                        for (c, j), row in zip(pairs, got):
                            logprobs[c - c0, j] = row
                check_finite_or_inf(logprobs, lat, f"shard {k}")
                save_npz(run.shard(k), dict(logprobs=logprobs, contexts=np.array([c0, c1]), latents=lat))
            bar.close()
    return out


def load_predictions(cfg: Config, rows=None, logprobs: bool = False) -> dict:
    """The predictions at the context `rows`: "evaluation" (the first n_eval contexts),
    "calibration" (the others), a slice or an index array of contexts; default all.

    {latents [L], explained [L] bool, contexts, rows [R] (the contexts read), expected [R, L]
    float32}: the expected rating under simulate.readout (rewrite.simulate.expected_digit), made
    shard by shard, so that the log-probs of every context ([N, L, 10] float32, 42 GB at the
    paper's 33K contexts x 32K latents) are never held. logprobs=True: "logprobs" [R, L, 10]
    instead (tests and benchmarks of small runs).

    Refuses predictions made for another run (model, transcoder, explanations, data, LLM or simulate
    config), a missing shard, and NaN log-probs (naming the latent) in a shard that is read."""
    run = run_folder(cfg)
    run.check("simulate", simulate_identity(cfg))
    explanations = load_explanations(cfg)
    latents = np.asarray(sorted(explanations), np.int32)
    contexts = run.read_contexts()
    n, n_eval = len(contexts["positions"]), int(contexts["n_eval"])
    if isinstance(rows, str) or rows is None:
        rows = {None: slice(0, n), "evaluation": slice(0, n_eval), "calibration": slice(n_eval, n)}[rows]
    rows = np.arange(n)[rows]
    grid = grid_for(cfg, n, len(latents))
    explained = np.array([explanations[int(x)] is not None for x in latents])
    readout = cfg.simulate.readout
    got = run.read_predictions(grid, latents, n, rows, None if logprobs else lambda lp: expected_digit(lp, readout))
    return dict(latents=latents, explained=explained, contexts=contexts, rows=rows,
                **{"logprobs" if logprobs else "expected": got})
