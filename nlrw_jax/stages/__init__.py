"""The pipeline's stages, in order: one module each (config -> library calls -> run folder), each
with one entry, `run(cfg, ...)`. This list drives `nlrw <stage>`, `nlrw run` and the multi-host
split (which stages every process takes part in; the others are process 0's)."""

from __future__ import annotations

import dataclasses

from nlrw_jax.config import LLM_STAGES


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    every_host: bool  # every process of a multi-host run takes part (collectives); else process 0 alone
    help: str
    in_run: bool = True  # part of `nlrw run`

    def entry(self):
        import importlib

        return importlib.import_module(f"nlrw_jax.stages.{self.name}").run


STAGES = [
    Stage("eval", False, "held-out cross-entropy of the subject model vs a unigram baseline"),
    Stage("capture", True, "write model.layer's activations (mlp_in/mlp_out or residual) to the activation store"),
    Stage("train", True, "train the TopK transcoder / SAE (sharded), spliced evaluation, sparsify-format export"),
    Stage("examples", False, "per-latent statistics and example windows (10 deciles + non-activating)"),
    Stage("explain", False, "explain chosen latents with the LLM (llm.backend: local, vllm or openai)"),
    Stage("score", False, "detection and fuzzing scores of the explanations; the latents' ranking"),
    Stage("simulate", False, "the LLM predicts each explained latent's activation at evaluation and calibration "
                             "contexts (sharded: --shard i --num-shards n)"),
    Stage("calibrate", False, "fit the per-latent quantile maps (raw prediction -> true activation)"),
    Stage("evaluate", False, "one compiled patched forward: CE of every condition, metrics, CIs"),
    Stage("report", False, "report.md with the tables and PNG plots"),
    Stage("pretrain", True, "train a GPT-NeoX language model from scratch (the tiny offline Pythia)", in_run=False),
]
BY_NAME = {s.name: s for s in STAGES}

__all__ = ["BY_NAME", "LLM_STAGES", "STAGES", "Stage"]  # LLM_STAGES: the stages that run an LLM
