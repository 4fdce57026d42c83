"""Patched evaluation throughput (sentences/s): our one compiled patched forward against the
reference's per-sentence, per-condition loop, same model, same transcoder, same conditions.

One sentence = one validation window with one position p, evaluated under every condition:
clean, transcoder (all true latents), zero ablation, then every (values variant x selection mask)
pair: V = 2 variants of random non-negative simulated values on 32 simulated latents of the
transcoder, M = 18 masks (evaluate.fractions' 9 fractions x top / random selection of those 32
latents), 3 + 2 * 18 = 39 conditions. (`nlrw evaluate` adds a 19th, all-latents mask; it is left
out here.) The score is the cross-entropy of the next token at p.

  ours       nlrw_jax.rewrite.patched.make_patched_ce: one jitted call per batch of --batch
             sentences (padded to one compiled shape, as `nlrw evaluate` does) giving CE
             [39, batch]; the clean model runs once per sentence up to the patched layer, each
             condition only changes row p, which then runs through the remaining layers.
  reference  transformers' GPTNeoXForCausalLM, one forward of the whole 256-token window per
             (sentence, condition), with a forward hook on gpt_neox.layers[L].mlp that replaces
             the MLP output at p only by the transcoder decode of the combined latent vector:
             true latents at p (torch encode: ReLU, top k), the selected latents overwritten by
             the simulated values, top k of that, acts @ W_dec + b_dec + x @ W_skip.T. Clean:
             no hook; zero ablation: output at p set to 0. float32, torch.inference_mode.

Model: assets/tiny-pythia/final (float32 on both sides); transcoder: runs/tiny's trained one
(runs/tiny/sparse/sparsify, k = 32, 4096 latents); sentences: the first N validation windows
(.cache/tokens/validation), positions uniform in [31, 254] (seed 0). The reference runs the first
--reference-sentences of ours' sentences; their CE must agree condition by condition.

Timing: ours is compiled and run once before timing (compile + first call reported apart);
then --repeats rounds, each one full pass of ours (all --sentences, host transfers and the copy
of the result back included) followed by one of the reference; the median pass is reported.
Both at --layer (configs/tiny.yaml's model.layer, 5: the last layer, nothing runs after the
patch) and at --general-layer (2: layers 3-5 run after the patch for every condition). At layer 2
the transcoder (trained on layer 5's MLP) is applied to layer 2's MLP input: meaningless as a
model, but the same arithmetic on both sides, which is all the timing and the agreement need.

    .venv/bin/python benchmarks/patched_eval.py --sentences 64 --reference-sentences 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from common import setup_cpu
from nlrw_jax.data.tokens import validation_windows
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoX
from nlrw_jax.rewrite.patched import FIXED_CONDITIONS, make_patched_ce
from nlrw_jax.sparse.sparsify_format import load_sparsify

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "tiny-pythia" / "final"
CODER = REPO / "runs" / "tiny" / "sparse" / "sparsify"
TOKENS = REPO / ".cache" / "tokens" / "validation" / "tokens.npy"
CTX = 256
FIRST_POS = 31  # examples.window_tokens - 1, as nlrw simulate picks positions
FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)  # EvaluateConfig.fractions' default
SIMULATED = 32
VARIANTS = 2
# Float32 on both sides: rounding differences are ~1e-5..1e-4 nats; a wrong rule (wrong row,
# wrong top k, missing skip term) moves CE by far more.
TOLERANCE = 1e-3


def conditions(meta: list[dict]) -> list[str]:
    return list(FIXED_CONDITIONS) + [f"v{v}:{m['selection']}:{m['fraction']}" for v in range(VARIANTS) for m in meta]


def make_inputs(coder: dict, n_sent: int, n_latents: int, scale: float, seed: int = 0):
    """Windows [N, 256], positions [N], values [V, N, n] (random non-negative on 32 simulated
    latents, zero elsewhere, like nlrw evaluate's), masks [18, n] (top / random x fractions)."""
    rng = np.random.default_rng(seed)
    windows = validation_windows(TOKENS, CTX, n_sent)
    positions = rng.integers(FIRST_POS, CTX - 1, size=n_sent).astype(np.int32)
    latents = rng.choice(n_latents, SIMULATED, replace=False)
    # About half the predictions are 0 (as a simulator's mostly are), the rest uniform in
    # [0, 2 * typical true activation], so simulated latents compete with true ones in the top k.
    vals = rng.uniform(0, 2 * scale, (VARIANTS, n_sent, SIMULATED)) * (rng.random((VARIANTS, n_sent, SIMULATED)) < 0.5)
    values = np.zeros((VARIANTS, n_sent, n_latents), np.float32)
    values[:, :, latents] = vals
    top, rand = latents, rng.permutation(latents)  # "top": a fixed ranking (the order drawn)
    masks, meta = [], []
    for sel, order in (("top", top), ("random", rand)):
        for f in FRACTIONS:
            n = min(SIMULATED, int(np.ceil(f * SIMULATED)))
            m = np.zeros(n_latents, bool)
            m[order[:n]] = True
            masks.append(m)
            meta.append({"selection": sel, "fraction": f, "n_selected": n})
    return windows, positions, values, np.stack(masks), meta


def true_act_scale(module, lm_params, coder, k, layer, windows, positions) -> float:
    """Median of the non-zero true top-k activations at the positions (to scale the values)."""
    _, got = module.apply({"params": lm_params}, jnp.asarray(windows), last_layer=layer, capture=[(layer, "mlp_in")])
    x = np.asarray(got[(layer, "mlp_in")])[np.arange(len(positions)), positions]
    pre = np.maximum(x @ np.asarray(coder["W_enc"]).T + np.asarray(coder["b_enc"]), 0)
    top = -np.sort(-pre, axis=1)[:, :k]
    return float(np.median(top[top > 0]))


# ---------------------------------------------------------------------------------------- ours


def run_ours(fn, lm_params, coder, windows, positions, values, masks, bs: int) -> np.ndarray:
    """nlrw evaluate's loop: batches of bs, padded to one compiled shape -> CE [C, N]."""
    ces = []
    for lo in range(0, len(windows), bs):
        w, p, v = windows[lo:lo + bs], positions[lo:lo + bs], values[:, lo:lo + bs]
        pad = bs - len(w)
        w, p = np.pad(w, ((0, pad), (0, 0))), np.pad(p, (0, pad), constant_values=positions[0])
        v = np.pad(v, ((0, 0), (0, pad), (0, 0)))
        got = fn(lm_params, coder, jnp.asarray(w), jnp.asarray(p), jnp.asarray(v), masks)
        ces.append(np.asarray(got)[:, :bs - pad])
    return np.concatenate(ces, axis=1)


# ----------------------------------------------------------------------------------- reference


class Reference:
    """The per-sentence loop: a full HF forward per (sentence, condition), MLP output at p hooked."""

    def __init__(self, model, coder: dict, k: int):
        self.model, self.k = model, k
        self.c = {name: torch.from_numpy(np.array(v, np.float32)) for name, v in coder.items()}

    def decode(self, acts_dense, x):
        c = self.c
        acts, idx = torch.topk(acts_dense, self.k)
        return acts @ c["W_dec"][idx] + c["b_dec"] + x @ c["W_skip"].T

    def ce(self, ids, p: int, layer: int, replace=None) -> float:
        handle = None
        if replace is not None:
            def hook(module, inputs, output):
                out = output.clone()
                out[0, p] = replace(inputs[0][0, p])
                return out
            handle = self.model.gpt_neox.layers[layer].mlp.register_forward_hook(hook)
        try:
            logits = self.model(ids, use_cache=False).logits[0, p]
        finally:
            if handle is not None:
                handle.remove()
        return float(-torch.log_softmax(logits.float(), -1)[ids[0, p + 1]])

    def sentence(self, window, p: int, layer: int, values, masks) -> list[float]:
        """CE for every condition, in make_patched_ce's order. values [V, n], masks [M, n]."""
        c, ids = self.c, torch.from_numpy(window.astype(np.int64))[None]

        def true_dense(x):  # the transcoder's own latents at p: ReLU, top k, scattered to [n]
            acts, idx = torch.topk(torch.relu(x @ c["W_enc"].T + c["b_enc"]), self.k)
            return torch.zeros(c["W_enc"].shape[0]).scatter(0, idx, acts)

        out = [self.ce(ids, p, layer),
               self.ce(ids, p, layer, lambda x: self.decode(true_dense(x), x)),
               self.ce(ids, p, layer, lambda x: torch.zeros_like(x))]
        for v in values:
            for m in masks:
                out.append(self.ce(ids, p, layer, lambda x, v=v, m=m: self.decode(torch.where(m, v, true_dense(x)), x)))
        return out

    def run(self, windows, positions, layer: int, values, masks) -> np.ndarray:
        """-> CE [C, R] for the R sentences given (values [V, R, n])."""
        vals, ms = torch.from_numpy(values), torch.from_numpy(masks)
        with torch.inference_mode():
            return np.array([self.sentence(windows[i], int(positions[i]), layer, vals[:, i], ms)
                             for i in range(len(windows))]).T


# ---------------------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=64, help="sentences for ours")
    p.add_argument("--reference-sentences", type=int, default=8, help="the first R of them for the reference loop")
    p.add_argument("--batch", type=int, default=16, help="ours' batch (evaluate.batch_size)")
    p.add_argument("--layer", type=int, default=5, help="configs/tiny.yaml's model.layer")
    p.add_argument("--general-layer", type=int, default=2, help="a layer with layers after it (-1: skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (ours pass + reference pass)")
    p.add_argument("--json", metavar="OUT", default=str(REPO / "benchmarks" / "results" / "patched_eval.json"))
    args = p.parse_args()
    if not 0 < args.reference_sentences <= args.sentences:
        sys.exit("--reference-sentences must be between 1 and --sentences")
    command = (f"python benchmarks/patched_eval.py --sentences {args.sentences} --reference-sentences "
               f"{args.reference_sentences} --batch {args.batch} --layer {args.layer} --general-layer "
               f"{args.general_layer} --repeats {args.repeats}")

    threads, load = setup_cpu()
    config, lm_params = hf.load(MODEL, dtype=jnp.float32)
    module = GPTNeoX(config, dtype=jnp.float32)
    coder, cmeta = load_sparsify(CODER)
    k, kind, n_latents = cmeta["k"], cmeta["kind"], cmeta["num_latents"]
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ref = Reference(hf_model, coder, k)

    probe = validation_windows(TOKENS, CTX, args.sentences)
    probe_pos = np.random.default_rng(0).integers(FIRST_POS, CTX - 1, size=args.sentences).astype(np.int32)
    scale = true_act_scale(module, lm_params, coder, k, args.layer, probe, probe_pos)
    windows, positions, values, masks, mask_meta = make_inputs(coder, args.sentences, n_latents, scale)
    names = conditions(mask_meta)
    R = args.reference_sentences
    masks_j = jnp.asarray(masks)

    layers = [args.layer] + ([args.general_layer] if args.general_layer >= 0 else [])
    results = {}
    for layer in layers:
        fn = make_patched_ce(module, layer, kind, k)
        t0 = time.perf_counter()
        ours_ce = run_ours(fn, lm_params, coder, windows[:args.batch], positions[:args.batch],
                           values[:, :args.batch], masks_j, args.batch)
        compile_s = time.perf_counter() - t0
        ours_ce = run_ours(fn, lm_params, coder, windows, positions, values, masks_j, args.batch)
        assert ours_ce.shape == (len(names), args.sentences), ours_ce.shape
        t0 = time.perf_counter()
        ref_ce = ref.run(windows[:R], positions[:R], layer, values[:, :R], masks)
        first_ref_s = time.perf_counter() - t0
        diff = np.abs(ours_ce[:, :R] - ref_ce)
        results[layer] = dict(fn=fn, compile_s=compile_s, ours_ce=ours_ce, ref_ce=ref_ce, diff=diff,
                              first_ref_s=first_ref_s, ours_s=[], ref_s=[])
        worst = np.unravel_index(diff.argmax(), diff.shape)
        print(f"layer {layer}: compile + first call {compile_s:.2f} s; max |ours - reference| CE {diff.max():.2e} "
              f"(condition {names[worst[0]]}, sentence {worst[1]}); clean CE {ref_ce[0].mean():.4f}, "
              f"transcoder {ref_ce[1].mean():.4f}, zero {ref_ce[2].mean():.4f}", flush=True)
        if not diff.max() <= TOLERANCE:
            print(f"WARNING: layer {layer}: CE disagrees beyond {TOLERANCE}: per condition max "
                  + ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diff.max(1)) if d > TOLERANCE), file=sys.stderr)

    for _ in range(args.repeats):
        for layer in layers:
            r = results[layer]
            t0 = time.perf_counter()
            run_ours(r["fn"], lm_params, coder, windows, positions, values, masks_j, args.batch)
            r["ours_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref.run(windows[:R], positions[:R], layer, values[:, :R], masks)
            r["ref_s"].append(time.perf_counter() - t0)

    machine = f"{platform.processor() or platform.machine()}, {threads} threads, jax on {jax.default_backend()}"
    vers = dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version())
    print(f"\nmodel tiny-pythia (trained), float32; transcoder runs/tiny ({n_latents} latents, k={k}); "
          f"{len(names)} conditions; ours {args.sentences} sentences in batches of {args.batch}, reference "
          f"{R} sentences x {len(names)} forwards; median of {args.repeats} passes; torch threads {threads}, "
          f"{', '.join(f'{a} {b}' for a, b in vers.items())}, load average at start {load:.1f}")
    print("\n| layer | ours sentences/s | reference sentences/s | ours / reference | ours compile + first call | "
          "max abs CE diff (R sentences x 39 conditions) |")
    print("|---|---|---|---|---|---|")
    out = {}
    for layer in layers:
        r = results[layer]
        ours_sps = args.sentences / statistics.median(r["ours_s"])
        ref_sps = R / statistics.median(r["ref_s"])
        d = r["diff"]
        groups = {"clean": d[0], "transcoder": d[1], "zero_ablation": d[2], "simulated": d[3:]}
        print(f"| {layer} | {ours_sps:,.1f} | {ref_sps:,.2f} | **{ours_sps / ref_sps:,.0f}x** | {r['compile_s']:.2f} s | "
              f"{d.max():.1e} |")
        out[str(layer)] = dict(
            ours_sentences_per_s=ours_sps, reference_sentences_per_s=ref_sps, ratio=ours_sps / ref_sps,
            ours_forwards_per_s=ours_sps * len(names), reference_forwards_per_s=ref_sps * len(names),
            ours_compile_and_first_call_s=r["compile_s"], reference_first_pass_s=r["first_ref_s"],
            ours_pass_s=r["ours_s"], reference_pass_s=r["ref_s"],
            ours_sentences_per_s_best=args.sentences / min(r["ours_s"]), reference_sentences_per_s_best=R / min(r["ref_s"]),
            max_abs_ce_diff=float(d.max()), max_abs_ce_diff_by_group={g: float(v.max()) for g, v in groups.items()},
            max_abs_ce_diff_by_condition=dict(zip(names, map(float, d.max(1)))),
            mean_ce_reference=dict(zip(names, map(float, r["ref_ce"].mean(1)))),
            mean_ce_ours_all_sentences=dict(zip(names, map(float, r["ours_ce"].mean(1)))))
        print(f"    layer {layer} max |diff| by group: " + ", ".join(f"{g} {v.max():.1e}" for g, v in groups.items()))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; command: {command}")

    result = dict(command=command, date=datetime.date.today().isoformat(), machine=machine, torch_threads=threads,
                  jax_device=jax.devices()[0].device_kind, versions=vers, load_average_at_start=load,
                  model=str(MODEL.relative_to(REPO)), coder=str(CODER.relative_to(REPO)), k=k, num_latents=n_latents,
                  dtype="float32", ctx_len=CTX, sentences=args.sentences, reference_sentences=R, batch=args.batch,
                  repeats=args.repeats, conditions=names, n_conditions=len(names), value_scale=scale,
                  load_average_at_end=os.getloadavg()[0], tolerance=TOLERANCE, layers=out)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
