"""Capture throughput: our jitted Flax forward (stopping after the layer) vs transformers with hooks.

Both sides load the same random Pythia-shaped HF folder and run the same windows, collecting the
layer's mlp_in / mlp_out to numpy (what a capture has to hand to the writer). transformers is run
the usual way, with forward hooks on `gpt_neox.layers[L].mlp`, twice: the whole forward
("hf-hooks"), and stopped by an exception raised in the hook ("hf-hooks-stop", the common trick
that skips the later layers and the logits, like our `last_layer`). The captured values are
compared before anything is timed; timed passes are interleaved in rotating order and the
median tokens/s over passes is reported. "flax+store" is the full `capture` into a fresh local
fp32 store (model + TensorStore writes + markers), for the store's overhead.

    python benchmarks/capture.py --model tiny --layer 3 --windows 32 --batch 8 --seq 256
    python benchmarks/capture.py --model pythia-160m --layer 6 --windows 64 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from nlrw_jax.data import capture as activations
from nlrw_jax.models import hf
from common import MODEL_SHAPES, random_model_folder, setup_cpu

POINTS = ("mlp_in", "mlp_out")


class _Stop(Exception):
    pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--windows", type=int, default=32, help="windows per timed pass")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed passes per implementation")
    args = p.parse_args()
    command = (f"python benchmarks/capture.py --model {args.model} --layer {args.layer} --windows {args.windows} "
               f"--batch {args.batch} --seq {args.seq} --iters {args.iters}")
    threads, load = setup_cpu()

    tmp = tempfile.mkdtemp(prefix="nlrw-capture-bench-")
    folder = random_model_folder(args.model, tmp)
    config, params = hf.load(folder)
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (args.windows, args.seq)).astype(np.int32)
    batches = [windows[i:i + args.batch] for i in range(0, args.windows, args.batch)]

    fwd = activations.forward_fn(config, args.layer, POINTS, "float32")

    def run_flax():
        # Dispatch all batches, then fetch: the same pattern `capture` uses per chunk.
        return jax.device_get([fwd(params, b) for b in batches])

    model = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got, stop = {}, {"on": False}

    def hook(module, inputs, output):
        got.setdefault("mlp_in", []).append(inputs[0].reshape(-1, config.hidden_size).numpy())
        got.setdefault("mlp_out", []).append(output.reshape(-1, config.hidden_size).numpy())
        if stop["on"]:
            raise _Stop

    model.gpt_neox.layers[args.layer].mlp.register_forward_hook(hook)

    def make_hf(early_stop):
        def run():
            got.clear()
            stop["on"] = early_stop
            with torch.no_grad():
                for b in batches:
                    try:
                        model(torch.from_numpy(b.astype(np.int64)), use_cache=False)
                    except _Stop:
                        pass
            return [{k: got[k][i] for k in POINTS} for i in range(len(batches))]
        return run

    def run_store():
        store = Path(tmp) / "store"
        shutil.rmtree(store, ignore_errors=True)
        activations.capture((config, params), windows, store, layer=args.layer, points=POINTS,
                            batch_size=args.batch, chunk_windows=args.batch, progress=False)

    runners = {"flax": run_flax, "hf-hooks": make_hf(False), "hf-hooks-stop": make_hf(True), "flax+store": run_store}

    t0 = time.perf_counter()
    ref = run_flax()
    compile_s = time.perf_counter() - t0
    diffs = {}
    for name in ("hf-hooks", "hf-hooks-stop"):
        out = runners[name]()
        diffs[name] = max(float(np.abs(o[k] - r[k]).max()) for o, r in zip(out, ref) for k in POINTS)
        scale = max(1.0, max(float(np.abs(r[k]).max()) for r in ref for k in POINTS))
        if diffs[name] > 1e-3 * scale:
            sys.exit(f"captures disagree: max |flax - {name}| = {diffs[name]:.3g}; not the same computation")
    run_store()  # warm-up (compiles its own forward)

    times = {n: [] for n in runners}
    names = list(runners)
    for i in range(args.iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)

    tokens = args.windows * args.seq
    tok_s = {n: tokens / statistics.median(t) for n, t in times.items()}
    print(f"model {args.model} (random init), layer {args.layer} of {config.num_hidden_layers}, fp32, "
          f"{args.windows} windows x {args.seq} tokens in batches of {args.batch}; {args.iters} interleaved passes; "
          f"torch {threads} threads, jax on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}; "
          f"load average at start {load:.1f}; flax compile + first pass {compile_s:.2f} s")
    for name in runners:
        extra = f"   flax/{name} {tok_s['flax'] / tok_s[name]:.2f}x" if name != "flax" else ""
        extra += f"   max|flax - {name}| {diffs[name]:.1e}" if name in diffs else ""
        print(f"  {name:14s} {tok_s[name]:12,.0f} tok/s{extra}")
    print(f"\ncommand: {command}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
