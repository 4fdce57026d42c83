"""`nlrw examples`: per latent, firing counts, max activation, windows from each of the 10 deciles
of its non-zero activations and random non-activating windows (examples/examples.npz)."""

from __future__ import annotations

from pathlib import Path

from nlrw_jax.config import Config, identity
from nlrw_jax.io import save_npz
from nlrw_jax.stages.common import load_coder, model_identity, open_rows, run_folder


def run(cfg: Config, progress: bool = True) -> Path:
    from nlrw_jax.interpret.examples import sweep

    e = cfg.examples
    params, meta, coder_hash = load_coder(cfg)
    rows = open_rows(cfg)
    run = run_folder(cfg)
    ident = {**model_identity(cfg), "coder": coder_hash, "rows": rows.identity, "examples": identity(e)}
    with run.claim("examples", ident):
        if not run.examples.exists():
            result = sweep(params, meta, rows, width=e.window_tokens, per_decile=e.per_decile,
                           non_activating=e.non_activating, seed=e.seed, coder_hash=coder_hash,
                           partial=run.examples_partial, progress=progress)
            save_npz(run.examples, result)
            run.examples_partial.unlink(missing_ok=True)
    return run.examples
