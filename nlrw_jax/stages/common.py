"""What several stages need from a config: the subject model and its tokenizer, the token caches,
the trained coder, the LLM, and the identities (content hashes) a stage's folder is claimed with."""

from __future__ import annotations

from pathlib import Path

from nlrw_jax.config import Config, identity
from nlrw_jax.run_folder import RunFolder


def run_folder(cfg: Config) -> RunFolder:
    return RunFolder(cfg.run_dir)


def model_folder(cfg: Config) -> Path:
    from nlrw_jax.models import hf

    return hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)


def training_curve(cfg: Config) -> list[dict]:
    """The subject model's partially trained checkpoints, earliest first: [{name, fraction, folder}]
    from `model.curve` (hub revisions, fetched through the hub code path) or else checkpoints.json
    next to a local checkpoint folder (the tiny model's). The model itself (fraction 1) is not listed."""
    import json

    from nlrw_jax.models import hf

    if cfg.model.curve:
        last = cfg.model.curve[-1].tokens
        return [{"name": p.revision, "fraction": p.tokens / last, "tokens": p.tokens,
                 "folder": hf.resolve_checkpoint(p.checkpoint or cfg.model.checkpoint, p.revision)}
                for p in cfg.model.curve if p.tokens < last]
    folder = model_folder(cfg)
    index = folder.parent / "checkpoints.json"
    if not index.exists():
        return []
    entries = json.loads(index.read_text())["checkpoints"]
    return [{"name": name, "fraction": float(e["fraction"]), "tokens": e.get("tokens"), "folder": folder.parent / name}
            for name, e in sorted(entries.items(), key=lambda kv: kv[1]["fraction"])
            if name != folder.name and (folder.parent / name).is_dir()]


def model_identity(cfg: Config) -> dict:
    """The subject model by content (a copy or a rename is the same model; weights swapped in place are not)."""
    from nlrw_jax.models import hf

    return {"model": hf.content_hash(model_folder(cfg)), **identity(cfg.model)}


def subject_tokenizer(cfg: Config):
    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.data.tokens import subject_tokenizer_path

    return load_tokenizer(subject_tokenizer_path(model_folder(cfg), cfg.data.tokenizer))


def token_caches(cfg: Config) -> tuple[Path, Path]:
    """The (train, validation) token caches of the subject's tokenizer, built once."""
    from nlrw_jax.data import tokens as token_data

    return token_data.token_caches(cfg.data, subject_tokenizer(cfg))


def data_identity(cfg: Config, caches: tuple[Path, Path]) -> dict:
    """The token windows by content: the caches' content identities plus ctx_len, seed, text_field."""
    from nlrw_jax.data import tokens as token_data

    return {"tokens": [token_data.cache_identity(c) for c in caches], **identity(cfg.data)}


def llm_identity(cfg: Config, stage: str) -> dict:
    """The LLM a stage's results depend on: its own settings, or the shared ones."""
    from nlrw_jax.config import stage_llm

    return {"llm": identity(stage_llm(cfg, stage))}


def load_coder(cfg: Config):
    """(params, meta, content hash) of the run's transcoder / SAE: trained, or imported by the train
    stage from sparse.from (it writes the import to the same place, so every later stage reads it alike)."""
    return run_folder(cfg).read_coder()


def coder_source(cfg: Config) -> Path:
    """sparse.from as a local folder: the folder itself, or a hub repo[/subfolder] downloaded."""
    from nlrw_jax.errors import UserError

    src = cfg.sparse.from_
    path = Path(src).expanduser()
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") < 1:
        if not path.is_dir():
            raise UserError(f"config key sparse.from: {src} is not a folder (expected a local folder or a hub "
                            f"repo[/subfolder])")
        return path
    parts = src.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # network, auth, no such repo: one line naming it
        raise UserError(f"config key sparse.from: no local folder {src}, and {repo} could not be fetched from the "
                        f"Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    path = Path(root) / sub
    if not path.is_dir():
        raise UserError(f"config key sparse.from: hub repo {repo} has no folder {sub!r}")
    return path


def imported_coder(cfg: Config):
    """(params, meta, folder) of the coder sparse.from names, in sparsify's or SAELens's format, checked
    against the model and the config before any work: each mismatch is one line naming the field."""
    import json
    import re

    from nlrw_jax.errors import UserError
    from nlrw_jax.sparse.coder import points_for
    from nlrw_jax.sparse.saelens_format import WEIGHTS as SAELENS_WEIGHTS, load_saelens
    from nlrw_jax.sparse.sparsify_format import load_sparsify

    import numpy as np

    folder = coder_source(cfg)
    if (folder / "sae.safetensors").exists():
        params, meta = load_sparsify(folder, dtype=np.float32)
        # sparsify names a coder's folder after its hook point: layers.6.mlp (a transcoder of layer 6's
        # MLP) or layers.6 (layer 6's output, the residual stream), optionally under gpt_neox.
        m = re.fullmatch(r"(?:gpt_neox\.)?layers\.(\d+)(\.mlp)?", folder.name)
        meta["layer"] = int(m.group(1)) if m else None
        if m:  # the point the coder reads: MLP input (transcoder) or output (SAE on it), or the residual
            meta["point"] = ("mlp_in" if meta["kind"] == "transcoder" else "mlp_out") if m.group(2) else "resid_post"
        else:
            meta["point"] = None
    elif (folder / SAELENS_WEIGHTS).exists():
        params, meta = load_saelens(folder)
    else:
        raise UserError(f"config key sparse.from: {folder} has neither sae.safetensors (sparsify) nor "
                        f"{SAELENS_WEIGHTS} (SAELens)")
    s, where = cfg.sparse, f"config key sparse.from: the coder in {folder}"
    arch = json.loads((model_folder(cfg) / "config.json").read_text())
    checks = [  # (field, the coder's value, what it must be, the fix)
        ("d_in", meta["d_in"], arch["hidden_size"], "the model's hidden size"),
        ("kind", meta["kind"], s.kind, "sparse.kind"),
        ("num_latents", meta["num_latents"], s.num_latents, "sparse.num_latents"),
        ("k", meta["k"], s.k, "sparse.k"),
    ]
    if s.skip is not None:
        checks.append(("skip", meta["skip"], s.skip, "sparse.skip"))
    if meta["layer"] is not None:
        checks.append(("layer", meta["layer"], cfg.model.layer, "model.layer"))
    if meta["point"] is not None:
        checks.append(("hook point", meta["point"], points_for(s.kind)[0], f"what a {s.kind} reads"))
    for name, have, want, what in checks:
        if have != want:
            raise UserError(f"{where} has {name} {have!r}, but {what} is {want!r}")
    return params, meta, folder


class LazyBackend:
    """Builds the LLM backend on first use: a resumed stage with nothing left to do never loads it."""

    def __init__(self, cfg: Config, progress: bool = True, stage: str = "simulate"):
        from nlrw_jax.config import stage_llm

        self.llm, self.progress, self.backend = stage_llm(cfg, stage), progress, None

    def __getattr__(self, name):
        if self.backend is None:
            from nlrw_jax.llm.backends import make_backend

            self.backend = make_backend(self.llm, self.progress)
        return getattr(self.backend, name)


def open_rows(cfg: Config):
    """The token rows the coder reads: the activation store, or (sparse.source=on_the_fly without a
    store) the capture's window selection run through the model."""
    from nlrw_jax.data.store import open_store
    from nlrw_jax.errors import UserError
    from nlrw_jax.interpret.examples import ForwardRows, StoreRows
    from nlrw_jax.sparse.coder import points_for

    run = run_folder(cfg)
    in_point, _ = points_for(cfg.sparse.kind)
    has_store = (run.activations / "manifest.json").exists()
    if cfg.sparse.source == "on_the_fly" and not has_store:
        import jax.numpy as jnp
        import numpy as np

        from nlrw_jax.data import tokens as token_data
        from nlrw_jax.models import hf
        from nlrw_jax.run_folder import short_hash

        config, params = hf.load(model_folder(cfg), dtype=jnp.dtype(cfg.model.dtype))
        caches = token_caches(cfg)
        windows = np.asarray(token_data.window_dataset(caches[0], cfg.data.ctx_len, seed=cfg.data.seed,
                                                       batch_size=cfg.capture.windows)[0], np.int32)
        ident = short_hash({**model_identity(cfg), **data_identity(cfg, caches), "windows": cfg.capture.windows,
                            "point": in_point})
        return ForwardRows(config, params, windows, cfg.model.layer, in_point, cfg.model.dtype,
                           cfg.capture.chunk_windows, ident)
    if not has_store:
        raise UserError(f"{run.activations}: no activation store; run `nlrw capture` first, or set "
                        f"sparse.source=on_the_fly to compute the activations on the fly")
    store = open_store(run.activations)
    if store.manifest["layer"] != cfg.model.layer or in_point not in store.points:
        raise UserError(f"activation store {run.activations} holds {store.points} of layer {store.manifest['layer']}, "
                        f"but this config needs {in_point} of layer {cfg.model.layer}")
    return StoreRows(store, in_point, run.identity_hash("capture"))


def load_examples(cfg: Config):
    """The run's examples (of the run's coder), with the coder and the token rows to read windows from."""
    from nlrw_jax.interpret.examples import Examples

    params, meta, coder_hash = load_coder(cfg)
    return Examples(run_folder(cfg).read_examples(coder_hash), params, meta, coder_hash, open_rows(cfg))


def load_explanations(cfg: Config) -> dict:
    """{latent: explanation or None} of the run, checked to be of the run's coder."""
    return run_folder(cfg).read_explanations(load_coder(cfg)[2])

