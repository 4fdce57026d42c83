"""`nlrw train`: a TopK transcoder (or SAE) on one layer, sharded over a ('data', 'model') mesh.

Tokens shard over 'data'; latents (W_enc rows, b_enc, W_dec rows) over 'model'; b_dec and
W_skip replicate. Adam with sparsify's learning-rate scaling, linear warm-up then linear
decay, gradient clipping. orbax checkpoints hold everything a resumed run needs (params,
optimiser, step, RNG, dead-latent counters; the data position is the step), so a run
killed at any point and rerun ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nlrw_jax import distributed
from nlrw_jax.config import Config, config_hash
from nlrw_jax.errors import UserError
from nlrw_jax.io import abstract_like, claim_run_folder, restore_checkpoint, truncate_jsonl, write_json
from nlrw_jax.models.gpt_neox import DTYPES, GPTNeoX, token_cross_entropy
from nlrw_jax.parallel import batch_sharding, global_batch, make_mesh, replicated
from nlrw_jax.sparse import coder
from nlrw_jax.sparse.sparsify_format import save_sparsify

KINDS = {"transcoder": ("mlp_in", "mlp_out"), "sae": ("resid_post", "resid_post")}


def points_for(kind: str) -> tuple[str, str]:
    """(input, target) capture points of a sparse-coder kind."""
    if kind not in KINDS:
        raise UserError(f"config key sparse.kind: {kind!r} is not one of {sorted(KINDS)}")
    return KINDS[kind]


def make_optimizer(s, num_latents: int) -> optax.GradientTransformation:
    lr = s.learning_rate if s.learning_rate is not None else coder.lr_for(num_latents)
    if not 0 <= s.warmup_steps < s.steps:
        raise UserError(f"sparse.warmup_steps {s.warmup_steps} must be in [0, sparse.steps={s.steps})")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, s.warmup_steps),
                                     optax.linear_schedule(lr, 0.0, s.steps - s.warmup_steps)], [s.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), optax.adam(schedule))


class Trainer:
    """The jitted pieces of sparse-coder training for one config, with explicit shardings."""

    def __init__(self, cfg: Config, d_model: int, mesh=None):
        s = self.s = cfg.sparse
        points_for(s.kind)
        if not 0 < s.k <= s.num_latents:
            raise UserError(f"sparse.k {s.k} must be in [1, sparse.num_latents={s.num_latents}]")
        if s.compute_dtype not in DTYPES:
            raise UserError(f"config key sparse.compute_dtype: {s.compute_dtype!r} is not one of {sorted(DTYPES)}")
        self.mesh = mesh or make_mesh(cfg.mesh.data, cfg.mesh.model)
        if s.num_latents % self.mesh.shape["model"]:
            raise UserError(f"sparse.num_latents {s.num_latents} must divide over mesh.model={self.mesh.shape['model']}")
        if s.batch_tokens % self.mesh.shape["data"]:
            raise UserError(f"sparse.batch_tokens {s.batch_tokens} must divide over mesh.data={self.mesh.shape['data']}")
        self.d_model = d_model
        self.optimizer = make_optimizer(s, s.num_latents)
        self.compute_dtype = DTYPES[s.compute_dtype]
        abstract = jax.eval_shape(lambda: self._init_params(jax.random.PRNGKey(0)))
        param_shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), coder.param_specs(abstract))
        self.batch_sharding = NamedSharding(self.mesh, P("data", None))
        latent_sharding = NamedSharding(self.mesh, P("model"))
        rep = NamedSharding(self.mesh, P())
        opt_shardings = _opt_shardings(self.optimizer, abstract, param_shardings, rep)
        self.state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": rep, "rng": rep,
                                "since_fired": latent_sharding}
        self.init_state = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding,
                                                                  self.batch_sharding),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=0)

    def _init_params(self, key):
        skip = self.s.kind == "transcoder" if self.s.skip is None else self.s.skip
        return coder.init_coder(key, self.d_model, self.s.num_latents, kind=self.s.kind, skip=skip)

    def _init_state(self, seed_key, first_x, first_y):
        init_key, rng = jax.random.split(seed_key)
        # As sparsify's trainer: b_dec from the first batch's target mean (and b_enc for a transcoder).
        params = coder.init_from_batch(self._init_params(init_key), first_x.astype(jnp.float32),
                                       first_y.astype(jnp.float32), kind=self.s.kind)
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": rng, "since_fired": jnp.zeros((self.s.num_latents,), jnp.int32)}

    def _train_step(self, state, x, y):
        s = self.s
        dead = state["since_fired"] > s.dead_tokens  # sparsify's rule

        def loss(params):
            cast = jax.tree.map(lambda p: p.astype(self.compute_dtype), params)
            return coder.loss_fn(cast, x.astype(self.compute_dtype), y.astype(self.compute_dtype), s.k, kind=s.kind,
                                 dead_mask=dead if s.auxk_alpha else None,  # AuxK's top-k is costly: skip at 0
                                 auxk_alpha=s.auxk_alpha, mesh=self.mesh)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        if s.kind == "sae":
            grads = coder.remove_parallel_grad(grads, state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if s.kind == "sae":
            params = coder.normalize_decoder(params)
        fired = jnp.zeros((s.num_latents,), bool).at[metrics["top_indices"].reshape(-1)].set(True)
        since = jnp.where(fired, 0, state["since_fired"] + x.shape[0])
        rng, _ = jax.random.split(state["rng"])
        out = {"loss": value, "fvu": metrics["fvu"], "auxk": metrics["auxk"],
               "l0": (metrics["top_acts"] > 0).sum(-1).mean(), "dead_fraction": dead.mean(),
               "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng,
                "since_fired": since}, out


def _opt_shardings(optimizer, abstract_params, param_shardings, rep):
    """Adam moments shard like their parameters; counters replicate."""
    opt_abstract = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_abstract, param_shardings,
                                 transform_non_params=lambda _: rep)


def make_spliced_ce(model: GPTNeoX, layer: int, kind: str, k: int):
    """jitted (lm_params, coder_params, windows) -> summed next-token CE of the clean model, the model
    with the sparse coder spliced in, and with the MLP (or the residual, for an SAE) zero-ablated."""

    def splice(coder_params, x):
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return coder.forward(coder_params, flat, k, kind=kind)["out"].reshape(x.shape)

    @jax.jit
    def ce_sums(lm_params, coder_params, windows):
        variables = {"params": lm_params}
        if kind == "transcoder":
            spliced = {"mlp_replacements": {layer: lambda x, mlp: splice(coder_params, x)}}
            zeroed = {"mlp_replacements": {layer: lambda x, mlp: jnp.zeros_like(x)}}
        else:
            spliced = {"resid_replacements": {layer: lambda r: splice(coder_params, r)}}
            zeroed = {"resid_replacements": {layer: jnp.zeros_like}}
        out = {}
        for name, kwargs in (("clean", {}), ("spliced", spliced), ("zero_ablated", zeroed)):
            logits, _ = model.apply(variables, windows, **kwargs)
            out[name] = token_cross_entropy(logits, windows).sum()
        return out

    return ce_sums


def spliced_eval(ce_sums, lm_params, coder_params, windows: np.ndarray, batch_size: int, mesh=None) -> dict:
    """`mesh`: split each batch over its 'data' axis (every process passes the same windows)."""
    totals = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    usable = len(windows) - len(windows) % batch_size or len(windows)
    split = mesh is not None and batch_size % mesh.shape["data"] == 0 and usable % batch_size == 0
    place = (lambda w: jax.device_put(w, batch_sharding(mesh) if split else replicated(mesh))) if mesh else jnp.asarray
    for start in range(0, usable, batch_size):
        sums = ce_sums(lm_params, coder_params, place(windows[start:start + batch_size]))
        for name in totals:
            totals[name] += float(sums[name])
    count = usable * (windows.shape[1] - 1)
    ce = {f"ce_{name}": v / count for name, v in totals.items()}
    gap = ce["ce_zero_ablated"] - ce["ce_clean"]
    ce["loss_recovered"] = (ce["ce_zero_ablated"] - ce["ce_spliced"]) / gap if gap else float("nan")
    return ce


def _on_the_fly_batches(cfg: Config, model: GPTNeoX, lm_params, train_cache, start_step: int):
    """(x, y) per step straight from the model's forward: step i reads window batch i of the
    seeded grain order, so resuming at a step needs no other state."""
    from nlrw_jax.data import tokens as token_data

    s, layer = cfg.sparse, cfg.model.layer
    if s.batch_tokens % cfg.data.ctx_len:
        raise UserError(f"sparse.batch_tokens {s.batch_tokens} must be a multiple of data.ctx_len {cfg.data.ctx_len} "
                        f"for sparse.source=on_the_fly")
    windows = s.batch_tokens // cfg.data.ctx_len
    if windows % jax.process_count():
        raise UserError(f"sparse.batch_tokens {s.batch_tokens} is {windows} windows, which do not split over "
                        f"{jax.process_count()} processes")
    # Each host reads and runs only its own windows of every step.
    dataset = token_data.window_dataset(train_cache, cfg.data.ctx_len, seed=s.seed,
                                        batch_size=windows // jax.process_count(),
                                        process_index=jax.process_index(), process_count=jax.process_count())
    in_pt, out_pt = points_for(s.kind)

    @jax.jit
    def activations(windows):
        _, acts = model.apply({"params": lm_params}, windows, capture=[(layer, in_pt), (layer, out_pt)],
                              last_layer=layer)
        d = acts[(layer, in_pt)].shape[-1]
        return (acts[(layer, in_pt)].reshape(-1, d).astype(jnp.float32),
                acts[(layer, out_pt)].reshape(-1, d).astype(jnp.float32))

    step = start_step
    while True:
        yield activations(jnp.asarray(dataset[step]))  # this host's rows, still on its device
        step += 1


def _store_batches(cfg: Config, store_path: Path, start_step: int):
    from nlrw_jax.data.activations import open_store

    s = cfg.sparse
    in_pt, out_pt = points_for(s.kind)
    store = open_store(store_path)
    if store.manifest["layer"] != cfg.model.layer or not {in_pt, out_pt} <= set(store.points):
        raise UserError(f"activation store {store_path} holds {store.points} of layer {store.manifest['layer']}, "
                        f"but training needs {sorted({in_pt, out_pt})} of layer {cfg.model.layer}")
    # Every host reads the same shuffled stream and keeps its block of rows of each batch.
    n, p = s.batch_tokens // jax.process_count(), jax.process_index()
    for batch in store.batches(sorted({in_pt, out_pt}), s.batch_tokens, seed=s.seed, start_batch=start_step):
        yield batch[in_pt][p * n:(p + 1) * n], batch[out_pt][p * n:(p + 1) * n]


def train(cfg: Config, progress: bool = True) -> dict:
    from nlrw_jax.models import hf
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.tokenizer import load_tokenizer

    s = cfg.sparse
    lm_config, lm_params = hf.load(cfg.model.checkpoint, revision=cfg.model.revision)
    if not 0 <= cfg.model.layer < lm_config.num_hidden_layers:
        raise UserError(f"config key model.layer: {cfg.model.layer} is out of range: the model has layers "
                        f"0..{lm_config.num_hidden_layers - 1}")
    model = GPTNeoX(lm_config, dtype=DTYPES[cfg.model.dtype])
    trainer = Trainer(cfg, lm_config.hidden_size)
    run_dir = Path(cfg.run_dir).absolute()
    out_dir = run_dir / "sparse"
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_primary():
        claim_run_folder(out_dir, {"model": config_hash(cfg.model), "data": config_hash(cfg.data),
                               "sparse": config_hash(cfg.sparse)})
    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    tokenizer = load_tokenizer(token_data.subject_tokenizer_path(folder, cfg.data.tokenizer))
    train_cache, val_cache = token_data.token_caches(cfg.data, tokenizer)
    val_windows = token_data.validation_windows(
        val_cache, cfg.data.ctx_len, min(s.eval_windows, len(np.load(val_cache, mmap_mode="r")) // cfg.data.ctx_len))

    manager = ocp.CheckpointManager(out_dir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=s.keep_checkpoints, save_interval_steps=s.checkpoint_every))
    start = manager.latest_step() or 0
    if s.source == "store":
        batches = _store_batches(cfg, run_dir / "activations", start)
    elif s.source == "on_the_fly":
        batches = _on_the_fly_batches(cfg, model, lm_params, train_cache, start)
    else:
        raise UserError(f"config key sparse.source: {s.source!r} is not one of ['store', 'on_the_fly']")

    if s.batch_tokens % jax.process_count():
        raise UserError(f"sparse.batch_tokens {s.batch_tokens} must split over {jax.process_count()} processes")
    x, y = next(batches)
    if x.shape[-1] != lm_config.hidden_size:
        raise UserError(f"activation store {run_dir / 'activations'} has width {x.shape[-1]}, but the model's "
                        f"hidden size is {lm_config.hidden_size}")
    # Each host holds its rows of the batch; together they form one global array over 'data'.
    mesh = trainer.mesh
    state = trainer.init_state(jax.random.PRNGKey(s.seed), global_batch(mesh, x), global_batch(mesh, y))
    if start:
        state = restore_checkpoint(manager, start, ocp.args.StandardRestore(abstract_like(state)))
    metrics_path = out_dir / "metrics.jsonl"
    if distributed.is_primary():
        truncate_jsonl(metrics_path, start)
    ce_sums = make_spliced_ce(model, cfg.model.layer, s.kind, s.k)
    lm_params = jax.device_put(lm_params, replicated(mesh))  # the spliced eval runs on the whole mesh

    bar = tqdm(total=s.steps * s.batch_tokens, initial=start * s.batch_tokens, desc=f"train {s.kind}", unit="tok",
               unit_scale=True, disable=not progress or jax.process_index() != 0)
    t0, last = time.perf_counter(), start
    for step in range(start + 1, s.steps + 1):
        if step > start + 1:
            x, y = next(batches)
        state, m = trainer.train_step(state, global_batch(mesh, x), global_batch(mesh, y))
        bar.update(s.batch_tokens)
        if step % s.log_every == 0 or step == s.steps:
            record = {"step": step, **{k: float(v) for k, v in m.items()}}
            record["tokens_per_s"] = (step - last) * s.batch_tokens / (time.perf_counter() - t0)
            t0, last = time.perf_counter(), step
            if step % s.eval_every == 0 or step == s.steps:
                record.update(spliced_eval(ce_sums, lm_params, state["params"], val_windows, cfg.eval.batch_size,
                                           mesh))
            bar.set_postfix(fvu=f"{record['fvu']:.3f}", dead=f"{record['dead_fraction']:.2f}")
            if jax.process_index() == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        manager.save(step, force=step == s.steps, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    bar.close()

    final = spliced_eval(ce_sums, lm_params, state["params"], val_windows, cfg.eval.batch_size, mesh)
    params = distributed.gather(state["params"])  # collective: every process takes part
    if distributed.is_primary():
        save_sparsify(params, out_dir / "sparsify", k=s.k, kind=s.kind,
                      d_in=lm_config.hidden_size, num_latents=s.num_latents)
        write_json(out_dir / "summary.json", {"steps": s.steps, "tokens": s.steps * s.batch_tokens, **final})
    return final
