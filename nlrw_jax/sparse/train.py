"""Training a TopK transcoder (or SAE) on one layer, sharded over a ('data', 'model') mesh.

Tokens shard over 'data'; latents (W_enc rows, b_enc, W_dec rows) over 'model'; b_dec and
W_skip replicate. Adam with sparsify's learning-rate scaling, linear warm-up then linear
decay, gradient clipping. orbax checkpoints hold everything a resumed run needs (params,
optimiser, step, RNG, dead-latent counters; the data position is the step), so a run
killed at any point and rerun ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nlrw_jax.errors import UserError
from nlrw_jax.models.gpt_neox import DTYPES, GPTNeoX, token_cross_entropy
from nlrw_jax.parallel import batch_sharding, make_mesh, replicated
from nlrw_jax.sparse import coder
from nlrw_jax.sparse.coder import points_for

def make_optimizer(s, num_latents: int) -> optax.GradientTransformation:
    lr = s.learning_rate if s.learning_rate is not None else coder.lr_for(num_latents)
    if not 0 <= s.warmup_steps < s.steps:
        raise UserError(f"sparse.warmup_steps {s.warmup_steps} must be in [0, sparse.steps={s.steps})")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, s.warmup_steps),
                                     optax.linear_schedule(lr, 0.0, s.steps - s.warmup_steps)], [s.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), optax.adam(schedule))


class Trainer:
    """The jitted pieces of sparse-coder training for one config, with explicit shardings."""

    def __init__(self, cfg, d_model: int, mesh=None):
        """`cfg`: anything with .sparse and .mesh sections (a Config)."""
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

        # coder.loss_fn's value and gradient, computed by hand and sparsely (coder.loss_and_grads).
        cast = jax.tree.map(lambda p: p.astype(self.compute_dtype), state["params"])
        value, metrics, grads = coder.loss_and_grads(
            cast, x.astype(self.compute_dtype), y.astype(self.compute_dtype), s.k, kind=s.kind,
            dead_mask=dead if s.auxk_alpha else None,  # AuxK's top-k is costly: skip at 0
            auxk_alpha=s.auxk_alpha, mesh=self.mesh)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
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
