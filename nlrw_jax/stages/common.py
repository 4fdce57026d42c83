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


def llm_identity(cfg: Config) -> dict:
    return {"llm": identity(cfg.llm)}


def load_coder(cfg: Config):
    """(params, meta, content hash) of the run's trained transcoder / SAE."""
    return run_folder(cfg).read_coder()


class LazyBackend:
    """Builds the LLM backend on first use: a resumed stage with nothing left to do never loads it."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress, self.backend = cfg, progress, None

    def __getattr__(self, name):
        if self.backend is None:
            from nlrw_jax.llm.backends import make_backend

            self.backend = make_backend(self.cfg.llm, self.progress)
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
