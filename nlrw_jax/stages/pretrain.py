"""`nlrw pretrain`: train a GPT-NeoX language model from scratch (the tiny offline Pythia).

optax AdamW with warm-up + cosine decay and gradient clipping; grain windows; orbax
checkpoints of parameters, optimiser, step and data-iterator position, so a killed run
resumes exactly. HF-format exports at fractions of training (`export_fractions`) and at
the end, each with its held-out cross-entropy in `checkpoints.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from tqdm import tqdm

from nlrw_jax.config import Config, config_hash, identity
from nlrw_jax.data import tokens as token_data
from nlrw_jax.data.tokenizer import load_tokenizer
from nlrw_jax.errors import UserError
from nlrw_jax.io import abstract_like, restore_checkpoint, truncate_jsonl, write_json
from nlrw_jax.run_folder import RunFolder
from nlrw_jax.models import hf
from nlrw_jax.models.cross_entropy import mean_cross_entropy, unigram_cross_entropy
from nlrw_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig, init_params, token_cross_entropy
from nlrw_jax.parallel import global_batch, make_mesh


def _optimizer(p) -> optax.GradientTransformation:
    if not 0 <= p.warmup_steps < p.steps:
        raise UserError(f"pretrain.warmup_steps {p.warmup_steps} must be in [0, pretrain.steps={p.steps})")
    schedule = optax.warmup_cosine_decay_schedule(0.0, p.learning_rate, p.warmup_steps, p.steps, p.min_learning_rate)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on biases / norms
    return optax.chain(optax.clip_by_global_norm(p.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=p.weight_decay, mask=decay_mask))


def _export_steps(p) -> dict[int, str]:
    steps = {max(1, round(f * p.steps)): f"step{max(1, round(f * p.steps))}" for f in p.export_fractions}
    steps[p.steps] = "final"
    return steps


def run(cfg: Config, progress: bool = True) -> dict:
    p = cfg.pretrain
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.get_vocab_size() > p.arch.vocab_size:
        raise UserError(f"pretrain.arch.vocab_size {p.arch.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.get_vocab_size()} tokens ({cfg.data.tokenizer})")
    if cfg.data.ctx_len > p.arch.max_position_embeddings:
        raise UserError(f"data.ctx_len {cfg.data.ctx_len} is longer than pretrain.arch.max_position_embeddings "
                        f"{p.arch.max_position_embeddings}")
    model_cfg = GPTNeoXConfig(**dataclasses.asdict(p.arch))
    model = GPTNeoX(model_cfg)
    train_cache, val_cache = token_data.token_caches(cfg.data, tokenizer)
    val_windows = token_data.validation_windows(val_cache, cfg.data.ctx_len,
                                                min(p.eval_windows, _window_count(val_cache, cfg.data.ctx_len)))

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    n_proc, proc = jax.process_count(), jax.process_index()
    if p.batch_size % (mesh.shape["data"]) or p.batch_size % n_proc:
        raise UserError(f"pretrain.batch_size {p.batch_size} must divide over {mesh.shape['data']} data shards "
                        f"and {n_proc} processes")
    dataset = token_data.window_dataset(train_cache, cfg.data.ctx_len, seed=p.seed, batch_size=p.batch_size // n_proc,
                                        process_index=proc, process_count=n_proc)
    data_iter = token_data.window_iterator(dataset)

    optimizer = _optimizer(p)
    param_shardings = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, hf.fit_spec(hf.default_sharding_rule(tuple(k.key for k in path), x.shape),
                                                         x.shape, mesh)),
        jax.eval_shape(lambda: init_params(model_cfg, p.seed)))

    @jax.jit
    def init_state():
        params = jax.lax.with_sharding_constraint(init_params(model_cfg, p.seed), param_shardings)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch)
        return token_cross_entropy(logits, batch).mean()

    @jax.jit
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {
            "loss": loss, "grad_norm": optax.tree.norm(grads)}

    run = RunFolder(Path(cfg.run_dir).absolute())
    caches = (train_cache, val_cache)
    ident = {"pretrain": identity(cfg.pretrain), "data": identity(cfg.data),
             "tokens": [token_data.cache_identity(c) for c in caches]}
    with contextlib.ExitStack() as stack:  # process 0 claims the folder; the others write checkpoints there too
        if proc == 0:
            stack.enter_context(run.claim("pretrain", ident))
        manager = ocp.CheckpointManager(run.pretrain_checkpoints, options=ocp.CheckpointManagerOptions(
            max_to_keep=p.keep_checkpoints, save_interval_steps=p.checkpoint_every))
        state = init_state()
        start = manager.latest_step()
        if start is not None:
            state = restore_checkpoint(manager, start, ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(state)),
                data=token_data.GrainCheckpointRestore(data_iter)))["state"]
        start = start or 0
        metrics_path = run.pretrain_metrics
        truncate_jsonl(metrics_path, start)

        out_dir = Path(p.out_dir)
        exports = _export_steps(p)
        tokens_per_step = p.batch_size * cfg.data.ctx_len
        bar = tqdm(total=p.steps * tokens_per_step, initial=start * tokens_per_step, desc="pretrain", unit="tok",
                   unit_scale=True, disable=not progress or proc != 0)
        t0, last_step = time.perf_counter(), start
        for step in range(start + 1, p.steps + 1):
            batch = global_batch(mesh, next(data_iter))
            state, metrics = train_step(state, batch)
            bar.update(tokens_per_step)
            if step % p.log_every == 0 or step == p.steps:
                loss = float(metrics["loss"])
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                          "tokens": step * tokens_per_step, "tokens_per_s": (step - last_step) * tokens_per_step / dt}
                t0, last_step = time.perf_counter(), step
                bar.set_postfix(loss=f"{loss:.3f}")
                if step % p.eval_every == 0 or step == p.steps:
                    record["val_ce"] = mean_cross_entropy(model, state["params"], val_windows, progress=False)
                if proc == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if step in exports and proc == 0:
                _export(model, model_cfg, state["params"], out_dir / exports[step], cfg, step, tokens_per_step,
                        val_windows, p)
            manager.save(step, force=step == p.steps, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=token_data.GrainCheckpointSave(data_iter)))
        manager.wait_until_finished()
        bar.close()

        summary = json.loads((out_dir / "checkpoints.json").read_text())
        train_tokens = np.load(train_cache, mmap_mode="r")
        summary["unigram_val_ce"] = unigram_cross_entropy(train_tokens, val_windows, model_cfg.vocab_size)
        write_json(out_dir / "checkpoints.json", summary)
        return summary


def _window_count(cache: Path, ctx_len: int) -> int:
    return len(np.load(cache, mmap_mode="r")) // ctx_len


def _export(model, model_cfg, params, folder: Path, cfg: Config, step, tokens_per_step, val_windows, p):
    """Writes the HF folder, then records it (step, tokens, fraction, val CE) in checkpoints.json."""
    hf.save(model_cfg, params, folder, dtype=p.export_dtype, tokenizer_file=cfg.data.tokenizer)
    # Evaluate what was written (the export dtype), not the fp32 training copy.
    _, saved = hf.load(folder)
    val_ce = mean_cross_entropy(model, saved, val_windows, progress=False)
    index_path = folder.parent / "checkpoints.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"checkpoints": {}}
    index["checkpoints"][folder.name] = {"step": step, "tokens": step * tokens_per_step,
                                         "fraction": step / p.steps, "val_ce": val_ce}
    index["config_hash"] = config_hash(p)
    index["ctx_len"] = cfg.data.ctx_len
    write_json(index_path, index)
