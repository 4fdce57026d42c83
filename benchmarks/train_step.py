"""Training-step throughput: our sharded TopK transcoder step vs eai-sparsify's SparseCoder + Adam.

Ours is `nlrw_jax.sparse.train.Trainer.train_step` exactly as `nlrw train` runs it (jitted,
donated state, explicit shardings over a ('data', 'model') mesh; Adam with sparsify's lr
scaling, grad clipping, the dead-latent counters and the AuxK metric). Sparsify's side is
what its trainer does per step for a transcoder with auxk_alpha = 0:

    out = sc(x, y); out.fvu.backward(); opt.step(); opt.zero_grad()
    + the did_fire / num_tokens_since_fired update (tiny next to the rest)

with `SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k, transcode=True, skip_connection=True))`
and `torch.optim.Adam(sc.parameters(), lr)`. sparsify's default optimizer is signum; we use
Adam on both sides because that is the method's optimizer.

Both start from the same parameters (ours, after sparsify's step-0 init from the batch,
copied into the SparseCoder), train on the same fp32 batch (x random normal, y = x @ M +
noise for a fixed random M), at a constant learning rate (sparse.warmup_steps=0,
sparse.steps large). Two more are timed in the same interleaved loop: the limit, one dense
`x @ W_enc.T` of the step's shape ([tokens, d_in] x [d_in, latents], jitted, fp32), and
"ours (autodiff)", the step before issue 14 (jax.value_and_grad of coder.loss_fn, i.e. the
straight-through encoder and gather decoder under autodiff, lax.top_k, the same Adam + clipping). Before timing, the FVU of both sides' first two steps are compared
(step 1 is exactly 1 on both; step 2 depends on one Adam step, which grad clipping does not
change), so a side computing something else stops the script. Timed repeats are
interleaved, alternating which side goes first; the figure is the median tokens/s.

    python benchmarks/train_step.py --shape tiny
    python benchmarks/train_step.py --shape pythia --profile     # + where our step's time goes
    python benchmarks/train_step.py --shape pythia --tokens 4096 --iters 10 --warmup 2 --json runs/bench/train_step_pythia.json
"""

from __future__ import annotations

import argparse
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
import optax
import torch
from jax import lax
from common import setup_cpu

from nlrw_jax.config import load_config
from nlrw_jax.sparse import coder
from nlrw_jax.sparse.train import Trainer

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (d_in, num_latents, k)
    "tiny": (128, 4096, 32),
    "pythia": (768, 32768, 32),
}
CHECK_STEPS = 2  # untimed steps on both sides whose FVUs are compared
CHECK_RTOL = 1e-3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training step")
    p.add_argument("--iters", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2,
                   help=f"untimed steps per side after the {CHECK_STEPS} checked ones (ours: after compile)")
    p.add_argument("--mesh-data", type=int, default=-1, help="mesh.data (-1: all devices left over)")
    p.add_argument("--mesh-model", type=int, default=1, help="mesh.model (latent shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="also time the step's parts one by one, and XLA's own per-op times of our step")
    args = p.parse_args()
    command = (f"python benchmarks/train_step.py --shape {args.shape} --tokens {args.tokens} --iters {args.iters} "
               f"--warmup {args.warmup} --mesh-data {args.mesh_data} --mesh-model {args.mesh_model} "
               f"--seed {args.seed}" + (f" --json {args.json}" if args.json else "")
               + (" --profile" if args.profile else ""))
    d, n, k = SHAPES[args.shape]
    T = args.tokens

    threads, load = setup_cpu()

    from sparsify import SparseCoder, SparseCoderConfig  # prints a line about triton on CPU
    import sparsify

    # ------------------------------------------------------------------ data (shared)
    rng = np.random.default_rng(args.seed)
    x_np = rng.standard_normal((T, d), dtype=np.float32)
    M = rng.standard_normal((d, d), dtype=np.float32) / np.float32(np.sqrt(d))
    y_np = (x_np @ M + np.float32(0.1) * rng.standard_normal((T, d), dtype=np.float32)).astype(np.float32)

    # ------------------------------------------------------------------ ours
    total_steps = CHECK_STEPS + args.warmup + args.iters
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"sparse.num_latents={n}", f"sparse.k={k}", f"sparse.batch_tokens={T}",
        # Constant lr = sparsify's 2e-4 / sqrt(n / 2**14): no warm-up, decay over a horizon never reached.
        f"sparse.steps={max(10**9, total_steps + 1)}", "sparse.warmup_steps=0",
        f"mesh.data={args.mesh_data}", f"mesh.model={args.mesh_model}"])
    s = cfg.sparse
    trainer = Trainer(cfg, d)
    mesh = trainer.mesh
    mesh_desc = (f"data={mesh.shape['data']} x model={mesh.shape['model']} over {mesh.devices.size} "
                 f"{jax.default_backend()} device(s) ({jax.devices()[0].device_kind})")
    print(f"mesh: {mesh_desc}")
    x_j = jax.device_put(x_np, trainer.batch_sharding)
    y_j = jax.device_put(y_np, trainer.batch_sharding)
    state = trainer.init_state(jax.random.PRNGKey(args.seed), x_j, y_j)
    init = {name: np.array(v) for name, v in jax.device_get(state["params"]).items()}  # copies: state is donated

    # ------------------------------------------------------------------ sparsify
    lr = coder.lr_for(n)
    assert s.learning_rate is None  # so ours uses lr_for(n) too
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k, transcode=True, skip_connection=True), device="cpu")
    with torch.no_grad():
        sc.encoder.weight.copy_(torch.from_numpy(init["W_enc"]))
        sc.encoder.bias.copy_(torch.from_numpy(init["b_enc"]))
        sc.W_dec.copy_(torch.from_numpy(init["W_dec"]))
        sc.b_dec.copy_(torch.from_numpy(init["b_dec"]))
        sc.W_skip.copy_(torch.from_numpy(init["W_skip"]))
    opt = torch.optim.Adam(sc.parameters(), lr=lr)
    x_t, y_t = torch.from_numpy(x_np), torch.from_numpy(y_np)
    since_fired = torch.zeros(n, dtype=torch.long)
    did_fire = torch.zeros(n, dtype=torch.bool)

    # ------------------------------------------------------------------ the limit, and the step before issue 14
    W_enc_j = jnp.asarray(init["W_enc"])
    matmul = jax.jit(lambda x, W: x @ W.T)
    autodiff_step = make_autodiff_step(trainer)
    auto_state = trainer.init_state(jax.random.PRNGKey(args.seed), x_j, y_j)

    box = {"state": state, "ours_fvu": None, "theirs_fvu": None, "auto_state": auto_state, "auto_fvu": None}

    def run_ours():
        box["state"], m = trainer.train_step(box["state"], x_j, y_j)
        jax.block_until_ready((box["state"], m))
        box["ours_fvu"] = m["fvu"]

    def run_sparsify():
        out = sc(x_t, y_t)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(T)
            since_fired[did_fire] = 0
            did_fire.zero_()
        box["theirs_fvu"] = out.fvu.detach()

    def run_autodiff():
        box["auto_state"], m = autodiff_step(box["auto_state"], x_j, y_j)
        jax.block_until_ready((box["auto_state"], m))
        box["auto_fvu"] = m["fvu"]

    def run_matmul():
        jax.block_until_ready(matmul(x_j, W_enc_j))

    runners = {"ours": run_ours, "sparsify": run_sparsify, "ours (autodiff)": run_autodiff,
               "dense matmul": run_matmul}

    # ------------------------------------------------------------------ check, warm up
    t0 = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - t0
    check = {"ours": [float(box["ours_fvu"])], "sparsify": []}
    run_sparsify()
    check["sparsify"].append(float(box["theirs_fvu"]))
    run_autodiff()
    run_matmul()
    check["ours (autodiff)"] = [float(box["auto_fvu"])]
    for _ in range(CHECK_STEPS - 1):
        run_ours()
        run_sparsify()
        run_autodiff()
        check["ours"].append(float(box["ours_fvu"]))
        check["sparsify"].append(float(box["theirs_fvu"]))
        check["ours (autodiff)"].append(float(box["auto_fvu"]))
    for step, (a, b) in enumerate(zip(check["ours"], check["sparsify"]), 1):
        if not abs(a - b) <= CHECK_RTOL * abs(b):
            sys.exit(f"FVU disagrees at step {step}: ours {a:.6g} vs sparsify {b:.6g} (rtol {CHECK_RTOL}): "
                     f"the two sides are not computing the same thing")
    for step, (a, b) in enumerate(zip(check["ours"], check["ours (autodiff)"]), 1):
        if not abs(a - b) <= 1e-5 * abs(b):
            sys.exit(f"FVU disagrees at step {step}: ours {a:.8g} vs ours (autodiff) {b:.8g}")
    for _ in range(args.warmup):
        for run in runners.values():
            run()

    # ------------------------------------------------------------------ timed, interleaved
    times = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    final = {"ours": float(box["ours_fvu"]), "sparsify": float(box["theirs_fvu"]),
             "ours (autodiff)": float(box["auto_fvu"])}

    tok_s = {name: T / statistics.median(ts) for name, ts in times.items()}
    ratio = tok_s["ours"] / tok_s["sparsify"]
    # Fraction of the limit: (time of one dense x @ W_enc.T) / (time of one step).
    of_limit = {name: tok_s[name] / tok_s["dense matmul"] for name in ("ours", "ours (autodiff)", "sparsify")}
    machine = f"{platform.processor() or platform.machine()}, {threads} CPUs, jax on {jax.default_backend()}"
    print(f"shape {args.shape}: d_in {d}, {n} latents, k {k}, {T} tokens/step, fp32, transcoder + skip; "
          f"lr {lr:.3g} constant; {args.iters} interleaved timed steps after {CHECK_STEPS} checked + "
          f"{args.warmup} warm-up; torch threads {threads}; torch {torch.__version__}, "
          f"sparsify {getattr(sparsify, '__version__', '?')}, jax {jax.__version__}; load average at start {load:.1f}")
    print(f"ours: compile + first step {compile_s:.2f} s")
    print(f"FVU steps 1..{CHECK_STEPS}: ours {check['ours']}, sparsify {check['sparsify']} (agree within {CHECK_RTOL})")
    print(f"FVU after {total_steps} steps on the same batch: ours {final['ours']:.4f}, sparsify {final['sparsify']:.4f}")
    for name in runners:
        ms = [1e3 * t for t in times[name]]
        print(f"  {name:9s} {tok_s[name]:12,.0f} tok/s   median {statistics.median(ms):9.2f} ms/step "
              f"(min {min(ms):.2f}, max {max(ms):.2f})")
    print(f"  ours / sparsify: {ratio:.2f}x; ours / ours (autodiff): {tok_s['ours'] / tok_s['ours (autodiff)']:.2f}x")
    print("  fraction of the dense-matmul limit (matmul time / step time): "
          + ", ".join(f"{name} {v:.0%}" for name, v in of_limit.items()))

    print("\n| shape | d_in | latents | k | tokens/step | ours tok/s | ours (autodiff, before) tok/s | "
          "sparsify+Adam tok/s | ours/sparsify | ours/before | ours: % of matmul limit | before: % of limit | mesh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {d} | {n} | {k} | {T} | {tok_s['ours']:,.0f} | {tok_s['ours (autodiff)']:,.0f} | "
          f"{tok_s['sparsify']:,.0f} | **{ratio:.2f}** | {tok_s['ours'] / tok_s['ours (autodiff)']:.2f} | "
          f"**{of_limit['ours']:.0%}** | {of_limit['ours (autodiff)']:.0%} | "
          f"{mesh.shape['data']}x{mesh.shape['model']} (data x model) |")
    print(f"machine: {machine}; load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"\ncommand: {command}")

    if args.json:
        result = dict(command=command, shape=args.shape, d_in=d, num_latents=n, k=k, tokens_per_step=T,
                      iters=args.iters, warmup=args.warmup, check_steps=CHECK_STEPS, dtype="float32",
                      optimizer="adam (both sides; sparsify's default trainer optimizer is signum)",
                      learning_rate=lr, grad_clip_ours=s.grad_clip,
                      mesh=dict(data=mesh.shape["data"], model=mesh.shape["model"], description=mesh_desc),
                      torch_threads=threads, jax_backend=jax.default_backend(),
                      jax_device=jax.devices()[0].device_kind, machine=machine,
                      versions=dict(jax=jax.__version__, torch=torch.__version__,
                                    sparsify=getattr(sparsify, "__version__", None)),
                      load_average_at_start=load, ours_compile_s=compile_s, fvu_check=check, fvu_final=final,
                      tokens_per_s=tok_s, ratio_ours_over_sparsify=ratio, fraction_of_matmul_limit=of_limit,
                      load_average_at_end=os.getloadavg()[0], times_s=times)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    if args.profile:
        profile(trainer, box, x_j, y_j, k, reps=max(3, args.iters // 2))


def make_autodiff_step(trainer):
    """The training step as it was before issue 14: jax.value_and_grad of coder.loss_fn."""
    s = trainer.s

    def step(state, x, y):
        def loss(params):
            return coder.loss_fn(params, x, y, s.k, kind=s.kind, mesh=trainer.mesh)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        updates, opt_state = trainer.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        fired = jnp.zeros((s.num_latents,), bool).at[metrics["top_indices"].reshape(-1)].set(True)
        since = jnp.where(fired, 0, state["since_fired"] + x.shape[0])
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1, since_fired=since), metrics

    assert not s.auxk_alpha
    return jax.jit(step, donate_argnums=0)


def profile(trainer, box, x, y, k, reps):
    """Where our step's time goes: its parts jitted one by one (timed interleaved, with the dense
    matmul as the unit), then XLA's per-op (thunk) times of the real step from jax.profiler."""
    params = jax.device_get(box["state"]["params"])
    params = {name: jnp.asarray(v) for name, v in params.items()}
    T, d = x.shape
    n = params["W_enc"].shape[0]
    chunk = coder.train_chunk(T)
    vals, idx = jax.jit(lambda p: coder._topk(jax.nn.relu(x @ p["W_enc"].T + p["b_enc"]), k))(params)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((T, d), dtype=np.float32)) * 1e-3
    grads = jax.tree.map(lambda v: v * 1e-3, params)
    opt_state = trainer.optimizer.init(params)

    def enc_chunked(p, x):
        def one(xc):
            return coder._topk(jax.nn.relu(xc @ p["W_enc"].T + p["b_enc"]), k)
        v, i = lax.map(one, x.reshape(-1, chunk, d))
        return v.reshape(T, k), i.reshape(T, k)

    def grad_rows(idx, a, x, g):
        mine = jnp.ones_like(idx, bool)
        return (coder._add_rows(jnp.zeros((n, d)), idx, mine, a, x), coder._add_rows(jnp.zeros((n, d)), idx, mine, a, g),
                coder._add_rows(jnp.zeros((n,)), idx, mine, a, jnp.ones((T, 1))))

    def adam(params, opt_state, grads):
        updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    parts = {  # name: (fn, args, donate)
        "dense matmul x @ W_enc.T (the limit)": (lambda p, x: x @ p["W_enc"].T, (params, x)),
        "encoder + lax.top_k, whole batch (before)": (
            lambda p, x: lax.top_k(jax.nn.relu(x @ p["W_enc"].T + p["b_enc"]), k), (params, x)),
        f"encoder + exact blocked top-k, {chunk}-token chunks (ours)": (enc_chunked, (params, x)),
        "blocked top-k alone, whole batch of pre-activations": (
            lambda z: coder._topk(z, k), (jax.nn.relu(x @ params["W_enc"].T + params["b_enc"]),)),
        "lax.top_k alone, whole batch of pre-activations": (
            lambda z: lax.top_k(z, k), (jax.nn.relu(x @ params["W_enc"].T + params["b_enc"]),)),
        "decode: gather loop (ours)": (lambda W, a, i: coder._gather_sum(W, a, i), (params["W_dec"], vals, idx)),
        "decode: einsum over W_dec[idx] (before)": (lambda W, a, i: jnp.einsum("tk,tkd->td", a, W[i]),
                                                    (params["W_dec"], vals, idx)),
        "d_acts = g . W_dec[idx]": (lambda W, g, i: coder._gather_dot(W, g, i), (params["W_dec"], g, idx)),
        "gradient rows: sort + 3 scatter-adds (W_enc, W_dec, b_enc)": (grad_rows, (idx, vals, x, g)),
        "skip: x @ W_skip.T and g.T @ x": (lambda x, g, W: (x @ W.T, g.T @ x), (x, g, params["W_skip"])),
        "Adam + clipping (optax, donated)": (adam, None),
        "loss_and_grads (ours, no optimizer)": (
            lambda p, x, y: coder.loss_and_grads(p, x, y, k, kind=trainer.s.kind), (params, x, y)),
    }
    fns = {name: jax.jit(fn) for name, (fn, _) in parts.items()}
    fns["Adam + clipping (optax, donated)"] = jax.jit(adam, donate_argnums=(0, 1))
    adam_box = {"p": jax.tree.map(jnp.copy, params), "s": opt_state}

    def call(name):
        if name.startswith("Adam"):
            adam_box["p"], adam_box["s"] = fns[name](adam_box["p"], adam_box["s"], grads)
            jax.block_until_ready(adam_box["p"])
        else:
            jax.block_until_ready(fns[name](*parts[name][1]))

    for name in fns:
        call(name)
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    unit = statistics.median(times[names[0]])
    print(f"\nprofile: the step's parts jitted one by one (median of {reps} interleaved; load average now "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| part | ms | / dense matmul |")
    print("|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {1e3 * med:,.1f} | {med / unit:.3f} |")

    # XLA's own per-op times of the real step (summed over the threads that ran each op).
    import collections
    import glob
    import tempfile

    per_step = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp)
            box["state"], m = trainer.train_step(box["state"], x, y)
            jax.block_until_ready((box["state"], m))
            jax.profiler.stop_trace()
            data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
        ops = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    if "ThunkExecutor" not in ev.name and "Await" not in ev.name:
                        ops[ev.name] += ev.duration_ns / 1e6
        per_step.append(ops)
    best = {name: min(o.get(name, 0.0) for o in per_step) for name in set().union(*per_step)}
    total = sum(best.values())
    print(f"\nprofile: XLA ops of our step (jax.profiler; thread-ms, min over 3 steps; all ops {total:,.0f} "
          f"thread-ms)\n")
    print("| op | thread-ms | share |")
    print("|---|---|---|")
    for name, v in sorted(best.items(), key=lambda kv: -kv[1])[:16]:
        print(f"| {name} | {v:,.1f} | {v / total:.1%} |")


if __name__ == "__main__":
    main()
