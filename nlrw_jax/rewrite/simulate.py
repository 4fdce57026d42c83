"""`nlrw simulate`: an LLM predicts each explained latent's activation from its explanation.

One prediction per (context, latent): the context is a validation window and one random
position p in it; the prompt shows the 32 tokens ending at p with p's token marked, and the
explanation (METHOD.md, "The simulator"). The answer is forced to start with "[", so one
generation step's log-probs over the digits 0-9 are the prediction: no list is generated or
parsed, and the prompt's shared part (system prompt, few-shot turns, then the window or the
explanation, `simulate.order`) is a common prefix that vLLM's prefix cache serves.

The work is a grid of shards (contexts_per_shard contexts x latents_per_shard latents), each
written atomically to run_dir/simulate/shards/NNNNN.npz with the digit log-probs [c, l, 10].
`nlrw simulate --shard i --num-shards n` does the shards k with k % n == i (one GPU node of a
pool each); a rerun skips finished shards, a killed worker loses only the shard in flight, and
a shard is one file, so nothing is counted twice. Contexts 0..sentences-1 are for evaluation,
the next `calibration` ones only for fitting the quantile maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nlrw_jax.config import config_hash
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import prompts as P
from nlrw_jax.io import claim_run_folder, file_hash, read_json_object, read_npz, save_npz

ORDERS = ("window_first", "explanation_first")
READOUTS = ("renormalised", "reference")


def sim_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "simulate"


# ------------------------------------------------------------------------------------ contexts


def make_contexts(cfg) -> dict:
    """Validation windows, one position each, and the transcoder's true latents there.

    {windows [N, ctx] int32, positions [N], n_eval, top_acts [N, k], top_idx [N, k]}; the first
    n_eval contexts are the evaluation sentences, the rest the calibration contexts."""
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.activations import _forward_fn
    from nlrw_jax.interpret.examples import _encoder, load_coder
    from nlrw_jax.interpret.explain import subject_tokenizer
    from nlrw_jax.models import hf
    from nlrw_jax.sparse.train import points_for

    s, width, ctx = cfg.simulate, cfg.examples.window_tokens, cfg.data.ctx_len
    if s.sentences <= 0 or s.calibration < 0:
        raise UserError(f"config keys simulate.sentences ({s.sentences}) must be > 0 and simulate.calibration "
                        f"({s.calibration}) >= 0")
    if ctx < width + 2:
        raise UserError(f"config key data.ctx_len: {ctx} leaves no position with {width} tokens before it "
                        f"and a next token after it")
    _, val_cache = token_data.token_caches(cfg.data, subject_tokenizer(cfg))
    n = s.sentences + s.calibration
    windows = token_data.validation_windows(val_cache, ctx, n)  # a clear error if the split is too small
    positions = np.random.default_rng([s.seed, 1]).integers(width - 1, ctx - 1, size=n).astype(np.int32)
    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    config, lm_params = hf.load(folder, dtype=jnp.dtype(cfg.model.dtype))
    point = points_for(cfg.sparse.kind)[0]
    fwd = _forward_fn(config, cfg.model.layer, (point,), cfg.model.dtype, jnp.float32)
    coder, meta, _ = load_coder(cfg)
    acts, idx = [], []
    for lo in range(0, n, cfg.eval.batch_size):
        x = np.asarray(fwd(lm_params, jnp.asarray(windows[lo:lo + cfg.eval.batch_size]))[point])
        x = x.reshape(-1, ctx, x.shape[-1])[np.arange(len(x) // ctx), positions[lo:lo + cfg.eval.batch_size]]
        a, i = _encoder(meta["k"], meta["kind"])(coder, jnp.asarray(x))
        acts.append(np.asarray(a, np.float32))
        idx.append(np.asarray(i, np.int32))
    return dict(windows=windows, positions=positions, n_eval=np.int32(s.sentences),
                top_acts=np.concatenate(acts), top_idx=np.concatenate(idx))


def load_contexts(cfg) -> dict:
    path = sim_dir(cfg) / "contexts.npz"
    if not path.exists():
        raise UserError(f"{path}: no simulation contexts; run `nlrw simulate` first")
    contexts = read_npz(path, "delete the simulate folder and rerun `nlrw simulate`",
                        ("windows", "positions", "n_eval", "top_acts", "top_idx"))
    return contexts


def true_values(contexts: dict, latents: np.ndarray) -> np.ndarray:
    """[N, L] true activations of `latents` at each context's position (0 outside the top k)."""
    hit = contexts["top_idx"][:, :, None] == np.asarray(latents)[None, None, :]
    return np.where(hit, contexts["top_acts"][:, :, None], 0.0).max(axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------- shards


def shard_grid(n_contexts: int, n_latents: int, s) -> list[tuple[int, int, int, int]]:
    """[(context start, stop, latent start, stop)] in shard order."""
    if s.contexts_per_shard <= 0 or s.latents_per_shard <= 0:
        raise UserError("config keys simulate.contexts_per_shard and simulate.latents_per_shard must be positive")
    return [(c, min(c + s.contexts_per_shard, n_contexts), lo, min(lo + s.latents_per_shard, n_latents))
            for c in range(0, n_contexts, s.contexts_per_shard)
            for lo in range(0, n_latents, s.latents_per_shard)]


def _identity(cfg) -> dict:
    """What the predictions depend on: a folder made for anything else is refused."""
    from nlrw_jax.interpret.examples import load_coder
    from nlrw_jax.interpret.explain import llm_identity

    sim = {k: v for k, v in vars(cfg.simulate).items() if k != "readout"}  # the readout is applied later
    return {"coder": load_coder(cfg)[2], "data": config_hash(cfg.data), "window_tokens": cfg.examples.window_tokens,
            "explanations": file_hash(Path(cfg.run_dir) / "explain" / "explanations.jsonl"),
            "simulate": json.dumps(sim, sort_keys=True), **llm_identity(cfg)}


def _prompts(backend, tok, explanations, latents, contexts, width, c0, c1, order):
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


def simulate_from_config(cfg, shard: int | None = None, num_shards: int = 1, progress: bool = True,
                         backend=None) -> Path:
    from nlrw_jax.interpret.explain import load_explanations, subject_tokenizer
    from nlrw_jax.llm.backends import make_backend

    s = cfg.simulate
    if s.order not in ORDERS:
        raise UserError(f"config key simulate.order: {s.order!r} is not one of {list(ORDERS)}")
    if s.readout not in READOUTS:
        raise UserError(f"config key simulate.readout: {s.readout!r} is not one of {list(READOUTS)}")
    if num_shards < 1 or (shard is not None and not 0 <= shard < num_shards):
        raise UserError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")
    explanations = load_explanations(cfg)
    latents = np.asarray(sorted(explanations), np.int32)
    out = sim_dir(cfg)
    claim_run_folder(out, _identity(cfg))
    ctx_path = out / "contexts.npz"
    if not ctx_path.exists():
        save_npz(ctx_path, make_contexts(cfg))
    contexts = load_contexts(cfg)
    grid = shard_grid(len(contexts["positions"]), len(latents), s)
    (out / "shards").mkdir(exist_ok=True)
    mine = [k for k in range(len(grid)) if shard is None or k % num_shards == shard]
    todo = [k for k in mine if not _shard_path(out, k).exists()]
    if todo:
        tok = subject_tokenizer(cfg)
        backend = backend or make_backend(cfg.llm, progress)
        backend.candidate_ids(P.DIGITS)
        n_prompts = sum((c1 - c0) * sum(explanations[int(x)] is not None for x in latents[l0:l1])
                        for c0, c1, l0, l1 in (grid[k] for k in todo))
        bar = tqdm(total=n_prompts, desc=f"simulate ({len(todo)} of {len(grid)} shards)", unit="prediction",
                   disable=not progress, smoothing=0.1)
        for k in todo:
            c0, c1, l0, l1 = grid[k]
            lat = latents[l0:l1]
            prompts, pairs = _prompts(backend, tok, explanations, lat, contexts, cfg.examples.window_tokens,
                                      c0, c1, s.order)
            logprobs = np.full((c1 - c0, l1 - l0, len(P.DIGITS)), -np.inf, np.float32)
            if prompts:
                got = backend.next_token_logprobs(prompts, P.DIGITS, bar=bar)
                for (c, j), row in zip(pairs, got):
                    logprobs[c - c0, j] = row
            _check_finite_or_inf(logprobs, lat, f"shard {k}")
            save_npz(_shard_path(out, k), dict(logprobs=logprobs, contexts=np.array([c0, c1]), latents=lat))
        bar.close()
    return out


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"{k:05d}.npz"


def _check_finite_or_inf(logprobs: np.ndarray, latents: np.ndarray, where: str) -> None:
    """-inf is a digit outside the top-N log-probs; NaN is a broken prediction and is refused."""
    bad = np.isnan(logprobs).any(axis=(0, 2)) | (logprobs > 1e-3).any(axis=(0, 2))
    if bad.any():
        raise UserError(f"{where}: NaN or positive log-probs in the predictions of latent {int(latents[bad][0])}")


# ------------------------------------------------------------------------------ reading them back


def load_predictions(cfg) -> dict:
    """All shards assembled: {latents [L], explained [L] bool, logprobs [N, L, 10], contexts}.

    Refuses predictions made for another run (transcoder, explanations, data, LLM or simulate
    config), a missing shard, and NaN log-probs (naming the latent)."""
    from nlrw_jax.interpret.explain import load_explanations

    out = sim_dir(cfg)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{manifest_path}: no predictions; run `nlrw simulate` first")
    old = read_json_object(manifest_path, f"the predictions cannot be matched to this run: delete {out} and rerun "
                                          f"`nlrw simulate`")
    now = _identity(cfg)
    differs = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    if differs:
        raise UserError(f"{out}: predictions from another run (differs: {', '.join(differs)}); rerun "
                        f"`nlrw simulate` in a new run_dir or delete {out}")
    explanations = load_explanations(cfg)
    latents = np.asarray(sorted(explanations), np.int32)
    contexts = load_contexts(cfg)
    grid = shard_grid(len(contexts["positions"]), len(latents), cfg.simulate)
    missing = [k for k in range(len(grid)) if not _shard_path(out, k).exists()]
    if missing:
        raise UserError(f"{out / 'shards'}: {len(missing)} of {len(grid)} shards missing (first: {missing[0]}); "
                        f"run `nlrw simulate` (or the remaining --shard workers) first")
    logprobs = np.empty((len(contexts["positions"]), len(latents), len(P.DIGITS)), np.float32)
    for k, (c0, c1, l0, l1) in enumerate(grid):
        path = _shard_path(out, k)
        shard = read_npz(path, "delete it and rerun `nlrw simulate`", ("logprobs", "contexts", "latents"))
        lp, crange, lat = shard["logprobs"], shard["contexts"], shard["latents"]
        if list(crange) != [c0, c1] or not np.array_equal(lat, latents[l0:l1]) or lp.shape != (c1 - c0, l1 - l0, 10):
            raise UserError(f"{path}: covers other contexts/latents than shard {k} of this grid; delete it and rerun")
        _check_finite_or_inf(lp, lat, str(path))
        logprobs[c0:c1, l0:l1] = lp
    explained = np.array([explanations[int(x)] is not None for x in latents])
    return dict(latents=latents, explained=explained, logprobs=logprobs, contexts=contexts)


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
