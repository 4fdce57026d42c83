"""`nlrw simulate`: the LLM predicts each explained latent's activation at one position of each
evaluation and calibration context, from its explanation (nlrw_jax.rewrite.simulate).

The work is a grid of shards, each written atomically to simulate/shards/NNNNN.npz.
`nlrw simulate --shard i --num-shards n` does the shards k with k % n == i (one GPU node of a
pool each, in parallel on one folder by design); a rerun skips finished shards, a killed worker
loses only the shard in flight, and a shard is one file, so nothing is counted twice. Contexts
0..sentences-1 are for evaluation, the next `calibration` ones only for fitting the quantile maps.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.config import Config, identity
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.io import save_npz
from nlrw_jax.rewrite.simulate import check_finite_or_inf, shard_grid, shard_prompts
from nlrw_jax.run_folder import file_digest
from nlrw_jax.stages.common import LazyBackend, data_identity, llm_identity, load_coder, load_explanations, \
    model_folder, model_identity, run_folder, subject_tokenizer, token_caches


def make_contexts(cfg: Config) -> dict:
    """Validation windows, one position each, and the transcoder's true latents there.

    {windows [N, ctx] int32, positions [N], n_eval, top_acts [N, k], top_idx [N, k]}; the first
    n_eval contexts are the evaluation sentences, the rest the calibration contexts."""
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.capture import forward_fn
    from nlrw_jax.interpret.examples import encoder
    from nlrw_jax.models import hf
    from nlrw_jax.sparse.coder import points_for

    s, width, ctx = cfg.simulate, cfg.examples.window_tokens, cfg.data.ctx_len
    _, val_cache = token_caches(cfg)
    n = s.sentences + s.calibration
    windows = token_data.validation_windows(val_cache, ctx, n)  # a clear error if the split is too small
    positions = np.random.default_rng([s.seed, 1]).integers(width - 1, ctx - 1, size=n).astype(np.int32)
    config, lm_params = hf.load(model_folder(cfg), dtype=jnp.dtype(cfg.model.dtype))
    point = points_for(cfg.sparse.kind)[0]
    fwd = forward_fn(config, cfg.model.layer, (point,), cfg.model.dtype, jnp.float32)
    coder, meta, _ = load_coder(cfg)
    acts, idx = [], []
    for lo in range(0, n, cfg.eval.batch_size):
        x = np.asarray(fwd(lm_params, jnp.asarray(windows[lo:lo + cfg.eval.batch_size]))[point])
        x = x.reshape(-1, ctx, x.shape[-1])[np.arange(len(x) // ctx), positions[lo:lo + cfg.eval.batch_size]]
        a, i = encoder(meta["k"], meta["kind"])(coder, jnp.asarray(x))
        acts.append(np.asarray(a, np.float32))
        idx.append(np.asarray(i, np.int32))
    return dict(windows=windows, positions=positions, n_eval=np.int32(s.sentences),
                top_acts=np.concatenate(acts), top_idx=np.concatenate(idx))


def simulate_identity(cfg: Config) -> dict:
    """What the predictions depend on (the readout is applied later, so it is not part of it)."""
    sim = {k: v for k, v in identity(cfg.simulate).items() if k != "readout"}
    run = run_folder(cfg)
    if not run.explanations.exists():
        raise UserError(f"{run.explanations}: no explanations; run `nlrw explain` first")
    return {**model_identity(cfg), **data_identity(cfg, token_caches(cfg)), "coder": load_coder(cfg)[2],
            "window_tokens": cfg.examples.window_tokens, "explanations": file_digest(run.explanations),
            "simulate": sim, **llm_identity(cfg)}


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
        grid = shard_grid(len(contexts["positions"]), len(latents), s.contexts_per_shard, s.latents_per_shard)
        (out / "shards").mkdir(exist_ok=True)
        mine = [k for k in range(len(grid)) if shard is None or k % num_shards == shard]
        todo = [k for k in mine if not run.shard(k).exists()]
        if todo:
            tok = subject_tokenizer(cfg)
            backend = backend or LazyBackend(cfg, progress)
            backend.candidate_ids(P.DIGITS)
            n_prompts = sum((c1 - c0) * sum(explanations[int(x)] is not None for x in latents[l0:l1])
                            for c0, c1, l0, l1 in (grid[k] for k in todo))
            bar = tqdm(total=n_prompts, desc=f"simulate ({len(todo)} of {len(grid)} shards)", unit="prediction",
                       disable=not progress, smoothing=0.1)
            for k in todo:
                c0, c1, l0, l1 = grid[k]
                lat = latents[l0:l1]
                prompts, pairs = shard_prompts(backend, tok, explanations, lat, contexts, cfg.examples.window_tokens,
                                               c0, c1, s.order)
                logprobs = np.full((c1 - c0, l1 - l0, len(P.DIGITS)), -np.inf, np.float32)
                if prompts:
                    got = backend.next_token_logprobs(prompts, P.DIGITS, bar=bar)
                    for (c, j), row in zip(pairs, got):
                        logprobs[c - c0, j] = row
                check_finite_or_inf(logprobs, lat, f"shard {k}")
                save_npz(run.shard(k), dict(logprobs=logprobs, contexts=np.array([c0, c1]), latents=lat))
            bar.close()
    return out


def load_predictions(cfg: Config) -> dict:
    """All shards assembled: {latents [L], explained [L] bool, logprobs [N, L, 10], contexts}.

    Refuses predictions made for another run (model, transcoder, explanations, data, LLM or simulate
    config), a missing shard, and NaN log-probs (naming the latent)."""
    run = run_folder(cfg)
    run.check("simulate", simulate_identity(cfg))
    explanations = load_explanations(cfg)
    latents = np.asarray(sorted(explanations), np.int32)
    contexts = run.read_contexts()
    n = len(contexts["positions"])
    grid = shard_grid(n, len(latents), cfg.simulate.contexts_per_shard, cfg.simulate.latents_per_shard)
    explained = np.array([explanations[int(x)] is not None for x in latents])
    return dict(latents=latents, explained=explained, logprobs=run.read_predictions(grid, latents, n),
                contexts=contexts)
