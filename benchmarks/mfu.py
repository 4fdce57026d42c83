"""Model FLOP utilisation (MFU) on an accelerator: the Flax Pythia forward and the transcoder
training step, each as a fraction of the device's dense bf16 peak.

    python benchmarks/mfu.py --json benchmarks/results/mfu_h100.json      # on a GPU / TPU host

Model FLOPs are counted analytically (the usual MFU definition), XLA's own count of the compiled
program is printed beside them:
- forward, per token: 2 x (non-embedding matmul params + unembedding) + 4 x layers x seq x d
  (causal attention counted in full, as in the PaLM paper's MFU);
- transcoder step, per token: the dense encoder forward 2dn; its gradient is sparse, as in
  sparsify (the k chosen rows' weight gradient, 2kd; since issue 14 the step no longer
  recomputes the chosen pre-activations for a straight-through path: coder.loss_and_grads);
  the skip connection 2d^2 forward + 2d^2 weight gradient; the sparse decoder 2kd forward +
  4kd backward (the input needs no gradient: it is data). So 2dn + 4d^2 + 8kd.
Only JAX, Flax and optax are needed (no torch), so it runs where only JAX's CUDA/TPU build is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nlrw_jax.config import load_config  # noqa: E402
from nlrw_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig, init_params  # noqa: E402
from nlrw_jax.sparse.train import Trainer  # noqa: E402

PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=2048)
# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (SXM parts for NVIDIA).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "A40": 149.7e12, "L4": 121e12,
             "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def peak_for(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def timed(fn, args, iters: int) -> tuple[float, float | None]:
    """(seconds per call after compile + warm-up, XLA's flop count of the compiled program)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters, (cost or {}).get("flops")


def forward_row(batch: int, seq: int, iters: int) -> dict:
    config = GPTNeoXConfig(**PYTHIA_160M)
    model = GPTNeoX(config, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), init_params(config, seed=0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    secs, xla = timed(lambda p, i: model.apply({"params": p}, i)[0], (params, ids), iters)
    d, L, f, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    per_token = 2 * (L * (4 * d * d + 2 * d * f) + d * V) + 4 * L * seq * d
    return {"what": f"Pythia-160M forward, bf16, batch {batch} x {seq}", "tokens": batch * seq, "seconds": secs,
            "model_flops": per_token * batch * seq, "xla_flops": xla}


def train_row(tokens: int, iters: int) -> dict:
    d, n, k = 768, 32768, 32
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"sparse.num_latents={n}", f"sparse.k={k}", f"sparse.batch_tokens={tokens}", "sparse.steps=1000000",
        "sparse.warmup_steps=0", "sparse.compute_dtype=bfloat16", "mesh.data=-1", "mesh.model=1"])
    trainer = Trainer(cfg, d)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((tokens, d), dtype=np.float32), trainer.batch_sharding)
    y = jax.device_put(rng.standard_normal((tokens, d), dtype=np.float32), trainer.batch_sharding)
    state = trainer.init_state(jax.random.PRNGKey(0), x, y)
    step = trainer._train_step  # jitted again below without donation, so the state can be reused
    secs, xla = timed(step, (state, x, y), iters)
    per_token = 2 * d * n + 4 * d * d + 8 * k * d
    return {"what": f"TopK transcoder step (d {d}, {n} latents, k {k}), bf16 compute, {tokens} tokens",
            "tokens": tokens, "seconds": secs, "model_flops": per_token * tokens, "xla_flops": xla}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="forward: sequences per call")
    p.add_argument("--seq", type=int, default=2048, help="forward: tokens per sequence")
    p.add_argument("--train-tokens", type=int, default=16384, help="transcoder: tokens per step")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device bf16 peak, if not in the table")
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args()
    devices = jax.devices()
    kind = devices[0].device_kind
    peak = a.peak_tflops * 1e12 if a.peak_tflops else peak_for(kind)
    rows = [forward_row(a.batch, a.seq, a.iters), train_row(a.train_tokens, a.iters)]
    print(f"{len(devices)} x {kind} ({jax.default_backend()}), bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s per device")
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["tflops"] = r["model_flops"] / r["seconds"] / 1e12
        # The forward runs on one device; the training step on the whole mesh.
        n_dev = 1 if r["what"].startswith("Pythia") else len(devices)
        r["mfu"] = r["model_flops"] / r["seconds"] / (peak * n_dev) if peak else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown peak)"
        xla = f"{r['xla_flops'] / r['model_flops']:.2f}" if r["xla_flops"] else "n/a"
        print(f"{r['what']}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.2f} TFLOP/s, MFU {mfu} "
              f"(XLA counts {xla}x the model FLOPs)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": kind, "devices": len(devices), "backend": jax.default_backend(),
                                            "peak_bf16_flops": peak, "jax": jax.__version__, "rows": rows,
                                            "command": " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
