"""Peak memory of what `nlrw evaluate` does around the patched forward, before and after streaming.

On synthetic shards (random digit log-probs, 4,096 latents x 2,048 contexts by default, all at once:
64 windows x 32 read positions, 3/4 of them evaluation contexts) and 8 random calibration maps
(9 variants with the raw values), one fresh process per side measures its peak RSS
(resource.getrusage) over: reading the predictions, the raw values, every variant, each batch's
dense [variants, batch, positions, latents] input (the forward itself is left out: it is the
same on both sides), the per-latent specificity / sensitivity and writing values.npz (every
variant: below 2^27 values, as `nlrw evaluate`).

  old: the code before streaming: every shard assembled into [N, L, 10] log-probs, all variants
       [N_eval, L] at once and stacked, true values of all contexts in one [N, k, L] comparison.
  new: the stages' code: the evaluation rows' expected ratings reduced shard by shard, the raw
       values the one [N_eval, L] array, variants per batch or block of rows, rates streamed.

    python benchmarks/evaluate_memory.py [--latents 4096] [--contexts 2048] [--sides old,new]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PER, K, BS = 32, 32, 16  # read positions per window, coder k, windows per batch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(folder: Path, n: int, n_lat: int) -> None:
    from nlrw_jax.io import save_npz
    from nlrw_jax.rewrite import quantile as Q
    from nlrw_jax.rewrite.simulate import shard_grid
    from nlrw_jax.run_folder import RunFolder

    run, rng = RunFolder(folder), np.random.default_rng(0)
    (run.dir("simulate") / "shards").mkdir(parents=True)
    latents = np.arange(n_lat, dtype=np.int32)
    for k, (c0, c1, l0, l1) in enumerate(shard_grid(n, n_lat, 64, 256, PER)):
        lp = np.log(rng.dirichlet([2.0] + [0.1] * 9, (c1 - c0, l1 - l0))).astype(np.float32)
        save_npz(run.shard(k), dict(logprobs=lp, contexts=np.array([c0, c1]), latents=latents[l0:l1]))
    levels = Q.quantile_levels()
    (run.dir("calibrate") / "maps").mkdir(parents=True)
    for i in range(8):
        pk = np.sort(rng.random((n_lat, len(levels))), axis=1) * 3
        Q.save_quantile_map(run.quantile_map("type8", i), levels, pk, np.sort(rng.random(pk.shape), axis=1),
                            latents, {})
    save_npz(folder / "contexts.npz", dict(top_idx=rng.integers(0, n_lat, (n, K)).astype(np.int32),
                                           top_acts=rng.random((n, K)).astype(np.float32),
                                           max_act=(rng.random(n_lat) * 5).astype(np.float32)))


def side(which: str, folder: Path, n: int, n_lat: int) -> dict:
    from nlrw_jax.io import save_npz
    from nlrw_jax.rewrite import calibrate as C
    from nlrw_jax.rewrite import simulate as S
    from nlrw_jax.rewrite.metrics import active_counts, active_rates, rates_from_counts
    from nlrw_jax.rewrite.simulate import shard_grid
    from nlrw_jax.run_folder import RunFolder

    run = RunFolder(folder)
    contexts = dict(np.load(folder / "contexts.npz"))
    latents, explained = np.arange(n_lat, dtype=np.int32), np.ones(n_lat, bool)
    grid, n_eval = shard_grid(n, n_lat, 64, 256, PER), n * 3 // 4
    max_act = contexts["max_act"]
    paths = [run.quantile_map("type8", i) for i in range(8)]
    slots = np.arange(n_eval).reshape(-1, PER)  # [windows, read positions]
    start_mb, t = rss_mb(), time.perf_counter()
    if which == "old":
        lp = run.read_predictions(grid, latents, n)  # [N, L, 10]
        e = S.expected_digit(lp, "renormalised")
        raw = np.where(explained, S.raw_activation(e, max_act), 0.0).astype(np.float32)[:n_eval]
        variants = {"raw": raw, **{str(p): C.normalised_values(p, raw, latents, explained) for p in paths}}
        stacked = np.stack(list(variants.values()))
        for lo in range(0, len(slots), BS):
            v = np.zeros((len(variants), BS, PER, n_lat), np.float32)
            v[:, :len(slots[lo:lo + BS])] = stacked[:, slots[lo:lo + BS]]
        hit = contexts["top_idx"][:, :, None] == latents[None, None, :]
        true = np.where(hit, contexts["top_acts"][:, :, None], 0.0).max(axis=1).astype(np.float32)[:n_eval]
        rates = {v: active_rates(a, true, max_act / 18) for v, a in variants.items()}
        save_npz(folder / "values.npz", dict(true=true, **variants))
    else:
        e = run.read_predictions(grid, latents, n, slice(0, n_eval), lambda x: S.expected_digit(x, "renormalised"))
        raw = C.raw_values(e, explained, max_act)
        maps = [C.load_map(p, latents) for p in paths]

        def values(rows, which=range(len(maps) + 1)):  # as nlrw evaluate's
            r = raw[rows]
            out = np.empty((len(which), *r.shape), np.float32)
            for i, j in enumerate(which):
                out[i] = r if j == 0 else C.apply_map(maps[j - 1], r, explained)
            return out

        counts = 0
        for lo in range(0, len(slots), BS):
            sl = slots[lo:lo + BS]
            vals = values(sl.ravel())
            true = S.true_values(contexts, latents, sl.ravel())
            counts = counts + np.stack([active_counts(a, true, max_act / 18) for a in vals])
            v = np.zeros((len(maps) + 1, BS, PER, n_lat), np.float32)
            v[:, :len(sl)] = vals.reshape(len(maps) + 1, *sl.shape, -1)
            del vals
        rates = [rates_from_counts(c) for c in counts]
        step = max(1, (1 << 24) // n_lat)
        blocks = [slice(lo, min(lo + step, n_eval)) for lo in range(0, n_eval, step)]
        shape = (n_eval, n_lat)
        save_npz(folder / "values.npz", {}, {
            "true": (shape, np.float32, (S.true_values(contexts, latents, r) for r in blocks)),
            **{f"v{i}": (shape, np.float32, (values(r, [i])[0] for r in blocks)) for i in range(len(maps) + 1)}})
    rates = list(rates.values()) if isinstance(rates, dict) else rates
    return {"side": which, "seconds": round(time.perf_counter() - t, 1), "rss_before_mb": round(start_mb),
            "peak_rss_mb": round(rss_mb()), **{f"raw_pooled_{k}": rates[0][f"pooled_{k}"] for k in ("specificity", "sensitivity")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--contexts", type=int, default=2048, help="a multiple of 4 x 32")
    ap.add_argument("--sides", default="old,new", help="which to run (old's peak grows as contexts x latents x 10)")
    ap.add_argument("--side", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args.side, Path(args.folder), args.contexts, args.latents)))
        return
    with tempfile.TemporaryDirectory(prefix="nlrw-bench-evaluate-memory-") as tmp:
        make(Path(tmp), args.contexts, args.latents)
        got = [json.loads(subprocess.run([sys.executable, __file__, "--side", s, "--folder", tmp, "--contexts",
                                          str(args.contexts), "--latents", str(args.latents)], check=True,
                                         capture_output=True, text=True).stdout) for s in args.sides.split(",")]
    n_eval = args.contexts * 3 // 4
    print(json.dumps({"latents": args.latents, "contexts": args.contexts, "evaluation_contexts": n_eval,
                      "logprobs_N_L_10_mb": round(args.contexts * args.latents * 40 / 2**20),
                      "one_N_eval_L_float32_mb": round(n_eval * args.latents * 4 / 2**20), "sides": got}, indent=2))


if __name__ == "__main__":
    main()
