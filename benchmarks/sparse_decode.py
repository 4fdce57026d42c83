"""Sparse decode, forward + backward: autodiff of a gather vs a custom_vjp (segment_sum backward).

Both compute y = sum_j acts[t, j] * W_dec[idx[t, j]]; the timed function is
grad of sum(y * G) with respect to (W_dec, acts), jitted, on the default JAX backend.
Gradients of the two are compared before anything is timed. Repeats alternate between the
two implementations so machine noise hits both alike; the figure is the median.

    python benchmarks/sparse_decode.py            # both shapes, prints a markdown table
    python benchmarks/sparse_decode.py --reps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nlrw_jax.sparse import coder

SHAPES = [  # (name, d, n, k, T)
    ("tiny", 128, 4096, 32, 4096),
    ("pythia-160m", 768, 32768, 32, 4096),
]
IMPLS = ("gather", "vjp")


def make_step(impl):
    def loss(W, acts, idx, G):
        return jnp.sum(coder._sparse_decode(W, acts, idx, impl=impl) * G)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    rows = []
    for name, d, n, k, T in SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        W = jax.random.normal(keys[0], (n, d), jnp.float32)
        acts = jax.random.uniform(keys[1], (T, k), jnp.float32)
        # Distinct latents per token, like TopK output: one random latent in each of k buckets.
        idx = (jnp.arange(k) * (n // k) + jax.random.randint(keys[2], (T, k), 0, n // k)).astype(jnp.int32)
        G = jax.random.normal(keys[3], (T, d), jnp.float32)

        steps = {impl: make_step(impl) for impl in IMPLS}
        outs = {impl: jax.block_until_ready(steps[impl](W, acts, idx, G)) for impl in IMPLS}  # compile
        for a, b in zip(outs["gather"], outs["vjp"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)

        times = {impl: [] for impl in IMPLS}
        for r in range(args.reps):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                t0 = time.perf_counter()
                jax.block_until_ready(steps[impl](W, acts, idx, G))
                times[impl].append(time.perf_counter() - t0)
        med = {impl: statistics.median(times[impl]) for impl in IMPLS}
        rows.append((name, d, n, k, T, med["gather"], med["vjp"]))

    dev = jax.devices()[0]
    print(f"Sparse decode fwd+bwd, {dev.platform} ({platform.processor() or platform.machine()}), "
          f"jax {jax.__version__}, median of {args.reps}, default impl = {coder.DECODE_IMPL!r}\n")
    print("| shape | d | n | k | T | gather (ms) | custom_vjp (ms) | vjp / gather |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d, n, k, T, g, v in rows:
        print(f"| {name} | {d} | {n} | {k} | {T} | {g * 1e3:.1f} | {v * 1e3:.1f} | {v / g:.2f} |")


if __name__ == "__main__":
    main()
