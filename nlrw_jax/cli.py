"""`nlrw <stage> [CONFIG] [key=value ...]`: every stage of the pipeline, and `run` for all of them.

CONFIG is a YAML file or the name of a built-in config (`tiny`, `pythia-160m-l6`, ...). Every
config value is checked when it loads, before any work. Failures print one line,
`nlrw: error: ...`, and exit with a status a scheduler can act on: 2 for bad input (fix it
first), 75 for a service or resource that is not there now (LLM servers, storage, a run folder
in use by another process: retry later), 1 for anything else (a bug: NLRW_TRACEBACK=1 shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nlrw_jax.errors import ServiceUnavailable, UserError, clear_progress_bars
from nlrw_jax.stages import BY_NAME, LLM_STAGES, STAGES

DEFAULT_CONFIG = "tiny"


def _show(result) -> str:
    return json.dumps(result, indent=2, sort_keys=True) if isinstance(result, dict) else str(result)


def _run_stage(name: str, cfg, args, backend=None):
    kwargs = {}
    if name in LLM_STAGES and backend is not None:
        kwargs["backend"] = backend
    if name == "simulate":
        kwargs.update(shard=getattr(args, "shard", None), num_shards=getattr(args, "num_shards", 1))
    return BY_NAME[name].entry()(cfg, **kwargs)


def cmd_run(args) -> int:
    """Every stage of the pipeline in order, each skipping work already done in the run folder.
    Multi-host: every process takes part in the every-host stages; process 0 alone does the rest."""
    from nlrw_jax import distributed
    from nlrw_jax.config import stage_llm
    from nlrw_jax.stages.common import LazyBackend

    cfg = args.cfg
    # One backend per distinct LLM setting (explain, score and simulate share one unless a stage sets
    # its own), each loaded only if there is work.
    backends = {}
    for name in LLM_STAGES:
        same = next((b for b in backends.values() if b.llm == stage_llm(cfg, name)), None)
        backends[name] = same or LazyBackend(cfg, stage=name)
    stages = [s for s in STAGES if s.in_run]
    last_collective = max(i for i, s in enumerate(stages) if s.every_host)
    for i, stage in enumerate(stages):
        if stage.name == "capture" and cfg.sparse.source == "on_the_fly":
            continue
        if not distributed.is_primary():
            if stage.every_host:
                _run_stage(stage.name, cfg, args)
            if i >= last_collective:
                return 0
            continue
        result = _run_stage(stage.name, cfg, args, backends.get(stage.name))
        if stage.name in ("train", "score", "report"):
            print(_show(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlrw", description="Partially rewrite a transformer in natural language.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    commands = [("run", "run the whole pipeline on a config (the embedded default: tiny)", True)]
    commands += [(s.name, s.help, s.every_host) for s in STAGES]
    for name, help_text, _ in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                       help=f"YAML config file or built-in name (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.ctx_len=128")
        if name == "simulate":
            p.add_argument("--shard", type=int, default=None, help="do only the shards k with k %% num-shards == shard")
            p.add_argument("--num-shards", type=int, default=1, help="workers sharing the grid (a Slurm array)")
    help_text = "write the examples and explanations in eai-delphi's layout (its latent cache and explanation files)"
    p = sub.add_parser("export-delphi", help=help_text, description=help_text)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="YAML config file or built-in name")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--out", required=True, help="a new folder: OUT/latents/<hookpoint>/, OUT/explanations/")
    help_text = "two finished runs of one coder side by side (e.g. plain vs contrastive explanations)"
    p = sub.add_parser("compare", help=help_text, description=help_text)
    p.add_argument("run_a", help="the first run folder (e.g. runs/tiny-full)")
    p.add_argument("run_b", help="the second run folder, of the same coder (e.g. runs/tiny-full-contrastive)")
    p.add_argument("--labels", default="plain,contrastive", help="the two runs' names in the report")
    p.add_argument("--out", default=None, help="output folder (default RUN_B/compare)")
    p = sub.add_parser("corpus", help="rebuild the offline English corpus and its BPE tokenizer (needs apt packages)")
    p.add_argument("--out", default="assets/corpus")
    p.add_argument("--vocab-size", type=int, default=8192)
    return parser


def _every_host(stage: str) -> bool:
    return stage == "run" or stage in BY_NAME and BY_NAME[stage].every_host


def _shared_token_caches(cfg, pretraining: bool) -> None:
    """Multi-host: process 0 tokenizes the corpus into the shared cache, then the others open it."""
    import jax

    if jax.process_count() == 1:
        return
    from nlrw_jax import distributed
    from nlrw_jax.data import tokens as token_data
    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.stages.common import token_caches

    if pretraining:  # the model does not exist yet: the config's tokenizer
        distributed.primary_first(lambda: token_data.token_caches(cfg.data, load_tokenizer(Path(cfg.data.tokenizer))))
    else:
        distributed.primary_first(lambda: token_caches(cfg))


def _dispatch(args) -> int:
    if args.stage == "corpus":
        from nlrw_jax.data.corpus import main as corpus_main

        return corpus_main(["build", "--out", args.out, "--vocab-size", str(args.vocab_size)])
    if args.stage == "compare":  # reads two run folders, no config
        from nlrw_jax.stages.compare import run as compare_runs

        labels = tuple(args.labels.split(","))
        if len(labels) != 2 or not all(labels):
            raise UserError(f"--labels: expected two names separated by a comma, got {args.labels!r}")
        print(compare_runs(Path(args.run_a), Path(args.run_b), args.out and Path(args.out), labels))
        return 0
    from nlrw_jax import distributed
    from nlrw_jax.config import load_config

    args.cfg = load_config(args.config, args.overrides)
    distributed.initialize(args.cfg.distributed)
    every_host = _every_host(args.stage)
    if every_host:
        _shared_token_caches(args.cfg, pretraining=args.stage == "pretrain")
    # Single-host work is process 0's; every process leaves together (an error leaves at once).
    if args.stage == "run":
        code = cmd_run(args)
    elif args.stage == "export-delphi":  # a side command of the explain stage, process 0's
        if distributed.is_primary():
            from nlrw_jax.stages.explain import export_delphi

            print(_show(export_delphi(args.cfg, Path(args.out))))
        code = 0
    elif every_host or distributed.is_primary():
        result = _run_stage(args.stage, args.cfg, args)
        if distributed.is_primary():
            print(_show(result))
        code = 0
    else:
        code = 0
    distributed.barrier(f"end of nlrw {args.stage}")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `nlrw run key=value` with the default config
        args.config = DEFAULT_CONFIG
    try:
        return _dispatch(args)
    except (UserError, ServiceUnavailable) as e:
        clear_progress_bars()
        print(f"nlrw: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        clear_progress_bars()
        print("nlrw: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, not a wall of traceback, unless asked for
        if os.environ.get("NLRW_TRACEBACK"):
            raise
        clear_progress_bars()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"nlrw: error: internal error {type(e).__name__}: {first} (rerun with NLRW_TRACEBACK=1 for the "
              f"traceback, and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
