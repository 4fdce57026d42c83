"""`nlrw train`: the run's TopK transcoder / SAE on the activation store (or on the fly from the
model's forward), sharded over the mesh of every host, orbax checkpoints, spliced evaluation, and
the result in sparsify's format (sparse/sparsify). Library: nlrw_jax.sparse.train and .coder."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from nlrw_jax import distributed
from nlrw_jax.config import Config, identity
from nlrw_jax.data import tokens as token_data
from nlrw_jax.errors import UserError
from nlrw_jax.io import abstract_like, read_json_object, restore_checkpoint, truncate_jsonl, write_json
from nlrw_jax.models.gpt_neox import DTYPES, GPTNeoX
from nlrw_jax.parallel import global_batch, replicated
from nlrw_jax.sparse.coder import points_for
from nlrw_jax.sparse.sparsify_format import save_sparsify
from nlrw_jax.sparse.train import Trainer, make_spliced_ce, spliced_eval
from nlrw_jax.stages.common import data_identity, model_folder, model_identity, run_folder, token_caches
from nlrw_jax.stages.live import tensorboard_writer


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


def _store_batches(cfg: Config, store, store_path: Path, start_step: int):
    s = cfg.sparse
    in_pt, out_pt = points_for(s.kind)
    if store.manifest["layer"] != cfg.model.layer or not {in_pt, out_pt} <= set(store.points):
        raise UserError(f"activation store {store_path} holds {store.points} of layer {store.manifest['layer']}, "
                        f"but training needs {sorted({in_pt, out_pt})} of layer {cfg.model.layer}")
    # Every host reads the same shuffled stream and keeps its block of rows of each batch.
    n, p = s.batch_tokens // jax.process_count(), jax.process_index()
    for batch in store.batches(sorted({in_pt, out_pt}), s.batch_tokens, seed=s.seed, start_batch=start_step):
        yield batch[in_pt][p * n:(p + 1) * n], batch[out_pt][p * n:(p + 1) * n]


def run(cfg: Config, progress: bool = True) -> dict:
    """Trains (or resumes) the run's coder; on process 0 only, it claims the folder and writes."""
    from nlrw_jax.data.store import open_store
    from nlrw_jax.models import hf

    s = cfg.sparse
    if s.from_ is not None:
        return _import(cfg)
    folder = model_folder(cfg)
    lm_config, lm_params = hf.load(folder)
    if not 0 <= cfg.model.layer < lm_config.num_hidden_layers:
        raise UserError(f"config key model.layer: {cfg.model.layer} is out of range: the model has layers "
                        f"0..{lm_config.num_hidden_layers - 1}")
    model = GPTNeoX(lm_config, dtype=DTYPES[cfg.model.dtype])
    trainer = Trainer(cfg, lm_config.hidden_size)
    run = run_folder(cfg)
    caches = token_caches(cfg)
    train_cache, val_cache = caches
    val_windows = token_data.validation_windows(
        val_cache, cfg.data.ctx_len, min(s.eval_windows, len(np.load(val_cache, mmap_mode="r")) // cfg.data.ctx_len))
    ident = {**model_identity(cfg), **data_identity(cfg, caches), "sparse": identity(s),
             "eval_batch_size": cfg.eval.batch_size}
    store = None
    if s.source == "store":
        store = open_store(run.activations)
        ident["store"] = run.identity_hash("capture")
    with contextlib.ExitStack() as stack:
        if distributed.is_primary():
            stack.enter_context(run.claim("train", ident))
        return _train(cfg, run, trainer, model, lm_config, lm_params, train_cache, val_windows, store, progress)


def _import(cfg: Config) -> dict:
    """sparse.from: the published coder, checked against the model, written where a trained one goes
    (run.coder, in sparsify's format) with a summary, so every later stage reads it unchanged."""
    from nlrw_jax.run_folder import file_digest
    from nlrw_jax.stages.common import imported_coder

    params, meta, folder = imported_coder(cfg)  # every host checks (one line, exit 2) before any work
    if not distributed.is_primary():
        return {}
    run = run_folder(cfg)
    weights = next(f for f in (folder / "sae.safetensors", folder / "sae_weights.safetensors") if f.exists())
    # By content: another coder at the same path (or this one elsewhere) is another (the same) import.
    ident = {**model_identity(cfg), "imported": {"weights": file_digest(weights),
                                                 "cfg": file_digest(folder / "cfg.json")}}
    with run.claim("train", ident):
        if run.train_summary.exists():
            return read_json_object(run.train_summary, f"delete {run.dir('train')} and rerun `nlrw train`")
        save_sparsify(params, run.coder, k=meta["k"], kind=meta["kind"], d_in=meta["d_in"],
                      num_latents=meta["num_latents"])
        summary = {"imported_from": cfg.sparse.from_, "format": "sparsify" if weights.name == "sae.safetensors"
                   else "saelens", "kind": meta["kind"], "num_latents": meta["num_latents"], "k": meta["k"]}
        write_json(run.train_summary, summary)  # last: its presence says the coder is complete
    return summary


def _train(cfg, run, trainer, model, lm_config, lm_params, train_cache, val_windows, store, progress) -> dict:
    s = cfg.sparse
    if run.train_summary.exists():  # finished (every host sees the shared folder, so all return here)
        return read_json_object(run.train_summary, f"delete {run.dir('train')} and rerun `nlrw train`")
    manager = ocp.CheckpointManager(run.checkpoints.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=s.keep_checkpoints, save_interval_steps=s.checkpoint_every))
    start = manager.latest_step() or 0
    if s.source == "store":
        batches = _store_batches(cfg, store, run.activations, start)
    else:
        batches = _on_the_fly_batches(cfg, model, lm_params, train_cache, start)

    if s.batch_tokens % jax.process_count():
        raise UserError(f"sparse.batch_tokens {s.batch_tokens} must split over {jax.process_count()} processes")
    x, y = next(batches)
    if x.shape[-1] != lm_config.hidden_size:
        raise UserError(f"activation store {run.activations} has width {x.shape[-1]}, but the model's "
                        f"hidden size is {lm_config.hidden_size}")
    # Each host holds its rows of the batch; together they form one global array over 'data'.
    mesh = trainer.mesh
    state = trainer.init_state(jax.random.PRNGKey(s.seed), global_batch(mesh, x), global_batch(mesh, y))
    if start:
        state = restore_checkpoint(manager, start, ocp.args.StandardRestore(abstract_like(state)))
    metrics_path = run.metrics
    tb = None
    if distributed.is_primary():
        truncate_jsonl(metrics_path, start)
        tb = tensorboard_writer(run.dir("train") / "tensorboard")
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
                if tb is not None:  # every number of the record, under train/ (FVU, L0, dead, CE/KL, tokens/s)
                    for key, value in record.items():
                        if key != "step":
                            tb.add_scalar(f"train/{key}", value, step)
        manager.save(step, force=step == s.steps, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    bar.close()
    if tb is not None:
        tb.close()

    final = spliced_eval(ce_sums, lm_params, state["params"], val_windows, cfg.eval.batch_size, mesh)
    params = distributed.gather(state["params"])  # collective: every process takes part
    if distributed.is_primary():
        save_sparsify(params, run.coder, k=s.k, kind=s.kind, d_in=lm_config.hidden_size, num_latents=s.num_latents)
    summary = {"steps": s.steps, "tokens": s.steps * s.batch_tokens, **final}
    if distributed.is_primary():
        write_json(run.train_summary, summary)  # last: its presence says training is complete
    return summary
