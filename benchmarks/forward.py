"""Forward throughput: the Flax GPT-NeoX vs transformers' GPTNeoXForCausalLM, same weights, same batch.

Both sides load the same HF folder, run the same token ids, and their logits are compared
before anything is timed. Timed repeats are interleaved (one Flax call, then one per HF
attention implementation, in rotating order) so machine noise hits every side alike; the
reported figure is the median tokens/s over the repeats.

    python benchmarks/forward.py --model tiny --batch 8 --seq 256
    python benchmarks/forward.py --model pythia-160m --batch 4 --seq 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from nlrw_jax.models import hf
from common import MODEL_SHAPES, random_model_folder, setup_cpu
from nlrw_jax.models.gpt_neox import GPTNeoX

REPO = Path(__file__).resolve().parents[1]
TINY_FOLDER = REPO / "assets" / "tiny-pythia" / "final"
# Gate on rms(diff) / rms(logits): rounding gives ~1e-6 (fp32) or ~1e-2 (bf16); a wrong
# computation (mapping, rotary, mask) gives a sizeable fraction of 1.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


def model_folder(name: str, tmp: str) -> tuple[Path, str]:
    if name == "tiny" and TINY_FOLDER.is_dir():
        return TINY_FOLDER, "trained (assets/tiny-pythia/final)"
    return random_model_folder(name, tmp), "random init"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed repeats per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation (Flax: after compile)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", metavar="OUT", help="also write the results here")
    args = p.parse_args()
    command = (f"python benchmarks/forward.py --model {args.model} --batch {args.batch} --seq {args.seq} "
               f"--iters {args.iters} --warmup {args.warmup} --dtype {args.dtype}")

    threads, load = setup_cpu()
    tmp = tempfile.TemporaryDirectory(prefix="nlrw-bench-")
    folder, weights = model_folder(args.model, tmp.name)

    # Flax: parameters are a jit argument, not baked-in constants.
    jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[args.dtype]
    config, params = hf.load(folder, dtype=jdtype)
    module = GPTNeoX(config, dtype=jdtype)
    flax_fwd = jax.jit(lambda prm, ids: module.apply({"params": prm}, ids)[0])

    ids_np = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq), dtype=np.int64)
    ids_jax, ids_torch = jnp.asarray(ids_np, jnp.int32), torch.from_numpy(ids_np)

    # transformers: the default attention implementation, plus sdpa when that is not the default.
    hf_models = {}
    default = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=tdtype).eval()
    hf_models[default.config._attn_implementation] = default
    if "sdpa" not in hf_models:
        hf_models["sdpa"] = transformers.GPTNeoXForCausalLM.from_pretrained(
            folder, dtype=tdtype, attn_implementation="sdpa").eval()
    default_impl = next(iter(hf_models))

    def run_flax():
        return jax.block_until_ready(flax_fwd(params, ids_jax))

    def make_hf(model):
        def run():
            with torch.no_grad():
                return model(ids_torch, use_cache=False).logits
        return run

    runners = {"flax": run_flax} | {f"hf-{impl}": make_hf(m) for impl, m in hf_models.items()}

    t0 = time.perf_counter()
    reference = np.asarray(run_flax(), dtype=np.float32)
    compile_s = time.perf_counter() - t0
    scale = float(np.abs(reference).max())
    diffs, rel = {}, {}
    for name, run in runners.items():
        if name != "flax":
            delta = run().float().numpy() - reference
            diffs[name] = float(np.abs(delta).max())
            rel[name] = float(np.sqrt(np.mean(delta ** 2) / np.mean(reference ** 2)))
            if not rel[name] <= TOLERANCE[args.dtype]:
                sys.exit(f"logits disagree: max |flax - {name}| = {diffs[name]:.3g}, relative rms {rel[name]:.3g} "
                         f"(max |logit| {scale:.3g}): the two sides are not computing the same thing")
        for _ in range(args.warmup):
            run()

    times = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.iters):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    tok_s = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"model {args.model} ({weights}), {args.dtype}, batch {args.batch} x seq {args.seq}, "
          f"{args.iters} interleaved repeats after {args.warmup} warm-up; torch threads {threads}, "
          f"jax backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}, "
          f"load average at start {load:.1f}")
    print(f"flax compile + first call: {compile_s:.2f} s; max |logit| {scale:.3g}")
    for name in runners:
        ms = [1e3 * t for t in times[name]]
        extra = "" if name == "flax" else f"   max|flax - {name}| {diffs[name]:.2e} (rel rms {rel[name]:.1e})   flax/{name} {tok_s['flax'] / tok_s[name]:.2f}x"
        print(f"  {name:10s} {tok_s[name]:12,.0f} tok/s   median {statistics.median(ms):8.2f} ms "
              f"(min {min(ms):.2f}, max {max(ms):.2f}){extra}")

    hf_cols = [f"hf-{default_impl}"] + [n for n in runners if n not in ("flax", f"hf-{default_impl}")]
    print("\n| model | dtype | batch x seq | Flax tok/s | " + " | ".join(f"{n} tok/s | Flax/{n}" for n in hf_cols)
          + " | max abs logit diff | machine |")
    print("|" + "---|" * (6 + 2 * len(hf_cols)))
    machine = f"{platform.processor() or platform.machine()}, {threads} threads, jax on {jax.default_backend()}"
    print(f"| {args.model} | {args.dtype} | {args.batch} x {args.seq} | {tok_s['flax']:,.0f} | "
          + " | ".join(f"{tok_s[n]:,.0f} | {tok_s['flax'] / tok_s[n]:.2f}" for n in hf_cols)
          + f" | {max(diffs.values()):.1e} | {machine} |")
    print(f"\ncommand: {command}")

    if args.json:
        result = dict(command=command, model=args.model, weights=weights, dtype=args.dtype, batch=args.batch,
                      seq=args.seq, iters=args.iters, warmup=args.warmup, torch_threads=threads,
                      jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                      versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
                      load_average_at_start=load, hf_default_attn=default_impl, flax_compile_s=compile_s, max_abs_logit=scale,
                      tokens_per_s=tok_s, ratio_flax_over={n: tok_s["flax"] / tok_s[n] for n in hf_cols},
                      max_abs_logit_diff=diffs, rel_rms_logit_diff=rel, times_s=times)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
