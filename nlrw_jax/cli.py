"""`nlrw <stage> [CONFIG] [key=value ...]`: every stage of the pipeline, and `run` for all of them.

Bad input (UserError) prints one line, `nlrw: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nlrw_jax.errors import UserError, clear_progress_bars

DEFAULT_CONFIG = "configs/tiny.yaml"


# Stages in which every process of a multi-host run takes part; the others run on process 0.
COLLECTIVE = {"run", "capture", "train", "pretrain"}


def _say(text) -> None:
    """A stage's result line; in a multi-host run only process 0 reports."""
    import jax

    if jax.process_index() == 0:
        print(text)


def cmd_pretrain(args) -> int:
    from nlrw_jax.models.pretrain import pretrain

    summary = pretrain(args.cfg)
    _say(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_eval(args) -> int:
    """Held-out next-token cross-entropy of the subject model, next to the unigram baseline."""
    from nlrw_jax.models.evaluate import evaluate_subject

    result = evaluate_subject(args.cfg)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_capture(args) -> int:
    from nlrw_jax.data.activations import capture_from_config

    _say(capture_from_config(args.cfg))
    return 0


def cmd_train(args) -> int:
    from nlrw_jax.sparse.train import train

    _say(json.dumps(train(args.cfg), indent=2, sort_keys=True))
    return 0


def cmd_examples(args) -> int:
    from nlrw_jax.interpret.examples import examples_from_config

    print(examples_from_config(args.cfg))
    return 0


def cmd_explain(args) -> int:
    from nlrw_jax.interpret.explain import explain_from_config

    print(explain_from_config(args.cfg))
    return 0


def cmd_score(args) -> int:
    from nlrw_jax.interpret.score import score_from_config

    path = score_from_config(args.cfg)
    print((path.parent / "summary.json").read_text().strip())
    return 0


def cmd_simulate(args) -> int:
    from nlrw_jax.rewrite.simulate import simulate_from_config

    print(simulate_from_config(args.cfg, shard=args.shard, num_shards=args.num_shards))
    return 0


def cmd_calibrate(args) -> int:
    from nlrw_jax.rewrite.calibrate import calibrate_from_config

    print(calibrate_from_config(args.cfg))
    return 0


def cmd_evaluate(args) -> int:
    from nlrw_jax.rewrite.evaluate import evaluate_from_config

    print(evaluate_from_config(args.cfg) / "table.csv")
    return 0


def cmd_report(args) -> int:
    from nlrw_jax.rewrite.report import report_from_config

    print(report_from_config(args.cfg))
    return 0


def cmd_run(args) -> int:
    """Every stage that exists, in order, each skipping work already done in the run folder.
    Multi-host: every process captures and trains; process 0 alone does the rest."""
    cfg = args.cfg
    from nlrw_jax import distributed
    from nlrw_jax.data.activations import capture_from_config
    from nlrw_jax.models.evaluate import evaluate_subject
    from nlrw_jax.sparse.train import train

    if distributed.is_primary():
        evaluate_subject(cfg)
    if cfg.sparse.source == "store":
        capture_from_config(cfg)
    summary = train(cfg)
    if not distributed.is_primary():
        return 0
    print(json.dumps(summary, indent=2, sort_keys=True))
    from nlrw_jax.interpret.examples import examples_from_config
    from nlrw_jax.interpret.explain import explain_from_config
    from nlrw_jax.interpret.score import score_from_config

    examples_from_config(cfg)
    backend = _lazy_backend(cfg)  # one LLM for both stages
    explain_from_config(cfg, backend=backend)
    path = score_from_config(cfg, backend=backend)
    print((path.parent / "summary.json").read_text().strip())
    from nlrw_jax.rewrite.calibrate import calibrate_from_config
    from nlrw_jax.rewrite.evaluate import evaluate_from_config
    from nlrw_jax.rewrite.report import report_from_config
    from nlrw_jax.rewrite.simulate import simulate_from_config

    simulate_from_config(cfg, backend=backend)
    calibrate_from_config(cfg)
    evaluate_from_config(cfg)
    print(report_from_config(cfg))
    return 0


class _lazy_backend:
    """Builds the LLM backend on first use: a resumed run with nothing left to do never loads it."""

    def __init__(self, cfg):
        self.cfg, self.backend = cfg, None

    def __getattr__(self, name):
        if self.backend is None:
            from nlrw_jax.llm.backends import make_backend

            self.backend = make_backend(self.cfg.llm)
        return getattr(self.backend, name)


def cmd_corpus(args) -> int:
    from nlrw_jax.data.corpus import main as corpus_main

    return corpus_main(["build", "--out", args.out, "--vocab-size", str(args.vocab_size)])


STAGES = {
    "run": (cmd_run, "run the whole pipeline on a config (the embedded default: configs/tiny.yaml)"),
    "eval": (cmd_eval, "held-out cross-entropy of the subject model vs a unigram baseline"),
    "capture": (cmd_capture, "write model.layer's activations (mlp_in/mlp_out or residual) to the activation store"),
    "train": (cmd_train, "train the TopK transcoder / SAE (sharded), spliced evaluation, sparsify-format export"),
    "examples": (cmd_examples, "per-latent statistics and example windows (10 deciles + non-activating)"),
    "explain": (cmd_explain, "explain chosen latents with the LLM (llm.backend: local, vllm or openai)"),
    "score": (cmd_score, "detection and fuzzing scores of the explanations; the latents' ranking"),
    "simulate": (cmd_simulate, "the LLM predicts each explained latent's activation at evaluation and calibration "
                               "contexts (sharded: --shard i --num-shards n)"),
    "calibrate": (cmd_calibrate, "fit the per-latent quantile maps (raw prediction -> true activation)"),
    "evaluate": (cmd_evaluate, "one compiled patched forward: CE of every condition, metrics, CIs"),
    "report": (cmd_report, "report.md with the tables and PNG plots"),
    "pretrain": (cmd_pretrain, "train a GPT-NeoX language model from scratch (the tiny offline Pythia)"),
}


def _shared_token_caches(cfg, pretraining: bool) -> None:
    """Multi-host: process 0 tokenizes the corpus into the shared cache, then the others open it."""
    import jax

    if jax.process_count() == 1:
        return
    from nlrw_jax import distributed
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.models import hf

    def token_caches():
        tokenizer = Path(cfg.data.tokenizer)  # pretraining: the model does not exist yet
        if not pretraining:
            folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
            tokenizer = token_data.subject_tokenizer_path(folder, cfg.data.tokenizer)
        return token_data.token_caches(cfg.data, load_tokenizer(tokenizer))

    distributed.primary_first(token_caches)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlrw", description="Partially rewrite a transformer in natural language.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (fn, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.ctx_len=128")
        p.set_defaults(fn=fn)
        if name == "simulate":
            p.add_argument("--shard", type=int, default=None, help="do only the shards k with k %% num-shards == shard")
            p.add_argument("--num-shards", type=int, default=1, help="workers sharing the grid (a Slurm array)")
    p = sub.add_parser("corpus", help="rebuild the offline English corpus and its BPE tokenizer (needs apt packages)")
    p.add_argument("--out", default="assets/corpus")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.set_defaults(fn=cmd_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `nlrw run key=value` with the default config
        args.config = DEFAULT_CONFIG
    try:
        if getattr(args, "config", None):
            from nlrw_jax import distributed
            from nlrw_jax.config import load_config

            args.cfg = load_config(args.config, args.overrides)
            distributed.initialize(args.cfg.distributed)
            if args.stage in COLLECTIVE:
                _shared_token_caches(args.cfg, pretraining=args.stage == "pretrain")
            # Single-host work is process 0's; every process leaves together (an error leaves at once).
            code = args.fn(args) if args.stage in COLLECTIVE or distributed.is_primary() else 0
            distributed.barrier(f"end of nlrw {args.stage}")
            return code
        return args.fn(args)
    except UserError as e:
        clear_progress_bars()
        print(f"nlrw: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nlrw: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
