"""GPT-NeoX (Pythia) in Flax.

The forward matches transformers' GPTNeoXForCausalLM. Two additions serve the rest of the
pipeline, both as plain call arguments rather than hooks with hidden state:

* `capture`: a set of (layer, name) pairs; the forward returns those intermediates.
  Names: "resid_pre" (layer input), "mlp_in" (post-attention LayerNorm output, what the
  MLP sees), "mlp_out", "resid_post" (layer output).
* `mlp_replacements`: {layer: fn}. `fn(mlp_in, original_mlp) -> mlp_out` replaces that
  layer's MLP; `original_mlp` computes the real MLP, so a replacement can patch only some
  positions. This is how transcoders and simulated latents plug in.
* `resid_replacements`: {layer: fn(resid_post) -> resid_post} replaces the layer's output
  (a residual-stream SAE spliced in after the layer).
* A key/value cache: capture (layer, "kv") returns that layer's attention keys/values as a
  `KVCache`; `kv_cache={layer: KVCache}` runs new rows against those cached keys/values (one
  decode step), e.g. to push one patched row through the later layers of a clean prefix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlrw_jax.errors import UserError

CAPTURE_NAMES = ("resid_pre", "mlp_in", "mlp_out", "resid_post")
KV = "kv"  # capture name of a layer's attention keys/values (a KVCache), next to CAPTURE_NAMES
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
          "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}

# config.json keys that carry no meaning for the forward pass.
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "classifier_dropout", "_name_or_path",
    "is_decoder", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "tokenizer_class", "initializer_range",
}


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act {self.hidden_act!r} is not implemented; expected one of {sorted(ACTIVATIONS)}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "GPTNeoXConfig":
        """Reads a transformers GPTNeoXConfig dict; any attribute we do not implement is an error."""
        if d.get("model_type") != "gpt_neox":
            raise UserError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gpt_neox' (a GPT-NeoX/Pythia checkpoint)")
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        rope = dict(rope)
        if rope.pop("rope_type", rope.pop("type", "default")) != "default":
            raise UserError(f"{source}: only the default rotary embedding is implemented, got rope parameters {rope}")
        if "rope_theta" in rope:
            d.setdefault("rotary_emb_base", rope.pop("rope_theta"))
        if "partial_rotary_factor" in rope:
            d.setdefault("rotary_pct", rope.pop("partial_rotary_factor"))
        if rope:
            raise UserError(f"{source}: rope parameters {sorted(rope)} are not implemented")
        for key in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if d.pop(key, 0.0):
                raise UserError(f"{source}: {key} > 0 is not implemented (Pythia uses no dropout)")
        if d.pop("tie_word_embeddings", False):
            raise UserError(f"{source}: tie_word_embeddings=true is not implemented (Pythia unties embed_out)")
        if not d.pop("attention_bias", True):
            raise UserError(f"{source}: attention_bias=false is not implemented (Pythia uses biases)")
        if d.pop("head_dim", None) not in (None, d.get("hidden_size", 0) // max(d.get("num_attention_heads", 1), 1)):
            raise UserError(f"{source}: a head_dim other than hidden_size / num_attention_heads is not implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise UserError(f"{source}: config attribute(s) {unknown} are not implemented by the Flax GPT-NeoX port")
        kwargs = {k: v for k, v in d.items() if k in names}
        for ident in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(ident), list) or kwargs.get(ident) is None:
                kwargs.pop(ident, None)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise UserError(f"{source}: missing required attribute(s) {missing}")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """config.json in the classic Pythia form, which transformers 4.x and 5.x both read."""
        d = dataclasses.asdict(self)
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], tie_word_embeddings=False,
                 attention_dropout=0.0, hidden_dropout=0.0, attention_bias=True, use_cache=True)
        return d


def rotary_tables(positions: jax.Array, ndims: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [batch, seq, ndims], as GPT-NeoX builds them (halves concatenated)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, ndims, 2, dtype=jnp.float32) / ndims))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first `ndims` features of each head (x: [b, s, heads, head_size])."""
    nd = cos.shape[-1]
    rot, rest = x[..., :nd], x[..., nd:]
    x1, x2 = rot[..., : nd // 2], rot[..., nd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


class LayerNorm(nn.Module):
    """LayerNorm with statistics in fp32 whatever the compute dtype (fp16 overflows otherwise)."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        ln = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, param_dtype=jnp.float32, name="ln")
        return ln(x.astype(jnp.float32)).astype(self.dtype)


class KVCache(NamedTuple):
    """One layer's attention keys/values for T positions: k, v [b, T, heads, head_size] (rotary
    already applied, at each key's own position) and valid bool, [b, T] or [b, s, T] per new row
    (the keys a new row may attend to: False for padding, or for positions at or after a row's own
    in a patched run)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class Attention(nn.Module):
    config: GPTNeoXConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVCache | None = None):
        """-> (output, (k, v) of these rows). Without a cache, causal self-attention (mask hides
        padding keys). With one, every row sees the cache's valid keys, and `mask` [b, 1, s, s] says
        which new rows each new row sees; mask None: each new row sees itself only (independent
        rows: no [s, s] scores, so thousands of alternative rows cost O(s T), not O(s^2))."""
        c = self.config
        b, s, _ = x.shape
        init = nn.initializers.normal(c.initializer_range)
        qkv = nn.Dense(3 * c.hidden_size, dtype=self.dtype, kernel_init=init, name="query_key_value")(x)
        # GPT-NeoX interleaves q, k, v per head: [b, s, heads, 3 * head_size].
        qkv = qkv.reshape(b, s, c.num_attention_heads, 3 * c.head_size)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        if c.rotary_ndims:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = 1.0 / math.sqrt(c.head_size)
        if cache is None:
            # jax.nn.dot_product_attention: softmax in fp32, and on CPU ~3x faster than the plain
            # einsum/where/softmax chain; on GPU it can dispatch to cuDNN's fused kernel.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale)
        else:
            valid = cache.valid.astype(bool)
            old = jnp.broadcast_to(valid[:, None, None, :] if valid.ndim == 2 else valid[:, None],
                                   (b, 1, s, cache.k.shape[1]))
            if mask is not None:
                keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
                values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
                out = jax.nn.dot_product_attention(q, keys, values, mask=jnp.concatenate([old, mask], axis=-1),
                                                   scale=scale)
            else:
                out = _attend_cache_and_self(q, k, v, cache, old, scale)
        out = out.reshape(b, s, c.hidden_size)
        out_init = nn.initializers.normal(c.initializer_range / math.sqrt(2 * c.num_hidden_layers))
        return nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=out_init, name="dense")(out), (k, v)


def _attend_cache_and_self(q, k, v, cache: KVCache, visible, scale: float):
    """Softmax attention of each new row over the cache's visible keys and its own key, in float32."""
    qf = q.astype(jnp.float32)
    to_cache = jnp.einsum("bshd,bthd->bhst", qf, cache.k.astype(jnp.float32)) * scale
    to_cache = jnp.where(visible, to_cache, -jnp.inf)  # visible [b, 1, s, T]
    to_self = jnp.einsum("bshd,bshd->bhs", qf, k.astype(jnp.float32))[..., None] * scale
    p = jax.nn.softmax(jnp.concatenate([to_cache, to_self], axis=-1), axis=-1)
    out = jnp.einsum("bhst,bthd->bshd", p[..., :-1], cache.v.astype(jnp.float32))
    out = out + jnp.swapaxes(p[..., -1], 1, 2)[..., None] * v.astype(jnp.float32)
    return out.astype(q.dtype)


class MLP(nn.Module):
    config: GPTNeoXConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        out_init = nn.initializers.normal(c.initializer_range / math.sqrt(2 * c.num_hidden_layers))
        h = nn.Dense(c.intermediate_size, dtype=self.dtype, kernel_init=init, name="dense_h_to_4h")(x)
        h = ACTIVATIONS[c.hidden_act](h)
        return nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=out_init, name="dense_4h_to_h")(h)


MlpReplacement = Callable[[jax.Array, Callable[[jax.Array], jax.Array]], jax.Array]


class Layer(nn.Module):
    config: GPTNeoXConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, replacement: MlpReplacement | None = None, cache: KVCache | None = None):
        c = self.config
        ln1 = LayerNorm(c.layer_norm_eps, self.dtype, name="input_layernorm")
        ln2 = LayerNorm(c.layer_norm_eps, self.dtype, name="post_attention_layernorm")
        mlp = MLP(c, self.dtype, name="mlp")
        attn_out, kv = Attention(c, self.dtype, name="attention")(ln1(x), cos, sin, mask, cache)
        mlp_in = ln2(x) if c.use_parallel_residual else ln2(x + attn_out)
        mlp_out = mlp(mlp_in) if replacement is None else replacement(mlp_in, mlp).astype(self.dtype)
        out = x + attn_out + mlp_out
        return out, {"resid_pre": x, "mlp_in": mlp_in, "mlp_out": mlp_out, "resid_post": out, KV: kv}


class GPTNeoX(nn.Module):
    """GPTNeoXForCausalLM. Call: (input_ids [b, s], attention_mask, position_ids, ...) -> (logits, captured)."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        capture: Iterable[tuple[int, str]] = (),
        mlp_replacements: Mapping[int, MlpReplacement] | None = None,
        resid_replacements: Mapping[int, Callable[[jax.Array], jax.Array]] | None = None,
        last_layer: int | None = None,
        resid: jax.Array | None = None,
        first_layer: int = 0,
        kv_cache: Mapping[int, KVCache] | None = None,
        independent_rows: bool = False,
    ):
        """`last_layer` stops after that layer (no logits: None), for activation capture; `resid`
        [b, s, d] with `first_layer` starts from that residual stream (input of `first_layer`)
        instead of the embeddings, for patched runs that reuse a clean prefix of the model.

        Capture (layer, "kv") returns that layer's KVCache for these s rows (valid = attention_mask,
        or all True). `kv_cache` {layer: KVCache}, one for every layer that runs: the s rows are new
        rows on top of the cache (a decode step). `position_ids` then gives their absolute positions
        (default: T, T+1, ... after a T-long cache); `attention_mask` [b, s] marks the new rows that
        are real. A new row sees the cache's valid keys, itself, and the new rows at earlier
        positions: consecutive positions are ordinary decoding, while rows that share a position are
        alternatives to each other (e.g. one patched row per condition) and never see one another.
        `independent_rows`: every new row sees only the cache's valid keys (KVCache.valid may then
        be per row, [b, s, T]) and itself, whatever its position: many patched rows, each alone."""
        c = self.config
        b, s = input_ids.shape
        if s > c.max_position_embeddings and kv_cache is None:  # decode rows carry their own positions
            raise UserError(f"sequence length {s} is longer than max_position_embeddings {c.max_position_embeddings}")
        capture = set(capture)
        for layer, name in capture:
            if name not in (*CAPTURE_NAMES, KV):
                raise UserError(f"unknown capture point {name!r}; expected one of {(*CAPTURE_NAMES, KV)}")
            _check_layer(layer, c)
        for layer in [*(mlp_replacements or {}), *(resid_replacements or {}), *(kv_cache or {})]:
            _check_layer(layer, c)
        if last_layer is not None:
            _check_layer(last_layer, c)
        n_layers = c.num_hidden_layers if last_layer is None else last_layer + 1
        layers = range(first_layer if resid is not None else 0, n_layers)
        real = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        if kv_cache is not None:
            missing = [i for i in layers if i not in kv_cache]
            if missing:  # a layer without a cache would silently attend to the new rows alone
                raise UserError(f"kv_cache has no keys/values for layer(s) {missing}, which this call runs")
            if position_ids is None:
                position_ids = jnp.broadcast_to(next(iter(kv_cache.values())).k.shape[1] + jnp.arange(s), (b, s))
            pos = position_ids
            sees = (pos[:, None, :] < pos[:, :, None]) & real[:, None, :]
            # [b, 1, s, s]: a row always sees itself; None: itself only (no [s, s] scores at all)
            mask = None if independent_rows else (sees | jnp.eye(s, dtype=bool))[:, None]
        elif independent_rows:
            raise UserError("independent_rows needs a kv_cache: they are new rows on top of a cached prefix")
        else:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
            # Causality is applied inside the attention (is_causal); this mask only hides padding keys.
            mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        cos, sin = rotary_tables(position_ids, c.rotary_ndims, c.rotary_emb_base)

        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(c.initializer_range), name="embed_in")
        x = embed(input_ids) if resid is None else resid.astype(self.dtype)
        captured = {}
        for i in layers:
            replacement = (mlp_replacements or {}).get(i)
            cache = None if kv_cache is None else kv_cache[i]
            x, points = Layer(c, self.dtype, name=f"layers_{i}")(x, cos, sin, mask, replacement, cache)
            if i in (resid_replacements or {}):
                x = resid_replacements[i](x).astype(self.dtype)
            captured.update({(i, n): points[n] for n in CAPTURE_NAMES if (i, n) in capture})
            if (i, KV) in capture:
                captured[(i, KV)] = KVCache(*points[KV], real)
        if last_layer is not None:
            return None, captured
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="final_layer_norm")(x)
        logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                          kernel_init=nn.initializers.normal(c.initializer_range), name="embed_out")(x)
        return logits, captured


def _check_layer(layer: int, c: GPTNeoXConfig):
    if not 0 <= layer < c.num_hidden_layers:
        raise UserError(f"layer {layer} is out of range: the model has layers 0..{c.num_hidden_layers - 1}")


def init_params(config: GPTNeoXConfig, seed: int = 0) -> dict:
    """Random parameters (fp32) in the same tree that `hf.load` produces."""
    model = GPTNeoX(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), ids)["params"]


def token_cross_entropy(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-position next-token cross-entropy [b, s-1] in fp32 (Pythia's shift inside the window)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return ce if mask is None else ce * mask[:, 1:]
