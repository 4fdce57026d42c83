#!/usr/bin/env python3
"""A rehearsal of the paper's setting at its real shapes, offline on CPU.

Builds a random-init GPT-NeoX with Pythia-160M's exact architecture (d 768, 12 layers, 12 heads,
vocab 50,304, rotary 0.25, parallel residual) as an HF folder, then runs every stage of
configs/pythia-160m-l6.yaml on it, one `nlrw <stage>` process each, with reduced counts but the
real widths: 32,768 latents, Pythia's tokenizer, layer 6 with six layers after it. The local
corpus stands in for the Pile; SmolLM2-135M-Instruct stands in for both LLMs, as two separate LLM
settings: the explainer and scorer on the local backend, the simulator on a real vLLM
OpenAI-compatible server on 127.0.0.1 (from .venv-vllm; --no-server: local for both).

Writes <out>/rehearsal.json: each stage's wall time and peak RSS (the stage process's own
max RSS, from wait4), the counts used, and the machine; the run folder is <out>/run. `--scale K`
multiplies every count (windows, steps, latents, sentences) by K: two rehearsals at two scales
give each stage's fixed and per-unit cost, from which scripts/cost_table.py computes the full
run's cost (launch/README.md).

    .venv/bin/python scripts/rehearse.py --out runs/rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pythia-160m-l6.yaml"
STAGES = ["eval", "capture", "train", "examples", "explain", "score", "simulate", "calibrate", "evaluate", "report"]
PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                   use_parallel_residual=True, layer_norm_eps=1e-5)


def reduced(run_dir: Path, model: Path, tiny: bool, scale: int = 1) -> list[str]:
    """The paper config's counts cut to a CPU rehearsal, times `scale`; every width stays the paper's."""
    corpus = REPO / "nlrw_jax" / "assets" / "corpus"
    k = scale
    return [f"run_dir={run_dir}", f"model.checkpoint={model}", "model.revision=", "model.curve=[]",
            "model.dtype=float32",  # fp16 matmuls are emulated (slow) on CPU; the shapes are what is rehearsed
            f"data.train=[{corpus / 'train.jsonl.xz'}]", f"data.validation=[{corpus / 'val.jsonl.xz'}]",
            f"eval.windows={8 * k}", "eval.batch_size=4",
            f"capture.windows={(16 if tiny else 64) * k}", "capture.batch_size=4", "capture.chunk_windows=8",
            f"sparse.steps={3 * k}", "sparse.batch_tokens=2048", "sparse.warmup_steps=1", f"sparse.eval_every={3 * k}",
            f"sparse.checkpoint_every={3 * k}", "sparse.eval_windows=4",
            "examples.per_decile=3", "examples.non_activating=4",
            f"explain.latents={2 * k}", "explain.examples_per_decile=1", "explain.max_tokens=24",
            "score.activating_per_decile=1", "score.non_activating=2",
            f"simulate.sentences={4 * k}", f"simulate.calibration={8 * k}", "simulate.contexts_per_shard=4",
            "simulate.latents_per_shard=2", f"calibrate.sizes=[{4 * k}]", "calibrate.true_tokens=4096",
            "evaluate.batch_size=2", "evaluate.baseline_tokens=4096", "evaluate.bootstrap=100",
            "evaluate.modes=[each,whole_layer]",
            "llm.backend=local", "llm.model=smollm2", "llm.dtype=float32", "llm.batch_size=8",
            "explain.llm.model=smollm2", "score.llm.model=smollm2"]  # the 70B explainer's stand-in


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned interpreter. This process must stay small: a child's wait4 max RSS
    starts from its parent's RSS at the fork, so a parent that had built the 160M model (2 GB)
    floored every stage's peak RSS at 2 GB."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def smollm2_folder() -> Path:
    sys.path.insert(0, str(REPO))
    from nlrw_jax.llm.models import converted_smollm2

    return converted_smollm2()


def build_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from nlrw_jax.models import hf
    from nlrw_jax.models.gpt_neox import GPTNeoXConfig, init_params

    if (folder / "config.json").exists():
        return folder
    config = GPTNeoXConfig(**PYTHIA_160M)
    return hf.save(config, init_params(config, seed=0), folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    """SmolLM2 behind vLLM's OpenAI-compatible server (.venv-vllm), as the simulator's pool."""
    py = REPO / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        sys.exit("rehearse: .venv-vllm is missing: run `bash scripts/setup_vllm.sh`, or pass --no-server")
    port = free_port()
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(in_fresh_process(smollm2_folder)),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization", "0.2",
           "--max-logprobs", "20", "--enable-prefix-caching", "--max-model-len", "4096", "--enforce-eager",
           "--seed", "0", "--block-size", "32"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"rehearse: the vLLM server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    sys.exit(f"rehearse: the vLLM server did not answer within 600 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_stage(stage: str, overrides: list[str], log: Path) -> dict:
    """One `nlrw <stage>` process: wall seconds and its own peak RSS (wait4's ru_maxrss)."""
    cmd = [sys.executable, "-m", "nlrw_jax.cli", stage, CONFIG, *overrides]
    t0 = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ nlrw {stage}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"rehearse: `nlrw {stage}` failed with exit {code}; see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rehearsal", help="folder for the model, the run and rehearsal.json")
    p.add_argument("--no-server", action="store_true", help="the simulator on the local backend too (no vLLM)")
    p.add_argument("--tiny", action="store_true", help="fewer captured windows (CI)")
    p.add_argument("--scale", type=int, default=1, help="every count times this (a second rehearsal for unit costs)")
    args = p.parse_args()
    if args.scale < 1:
        sys.exit(f"rehearse: --scale must be a positive integer, got {args.scale}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = in_fresh_process(build_model, out / "pythia-160m-random")
    overrides = reduced(out / "run", model, args.tiny, args.scale)
    log, stages, served = out / "rehearsal.log", {}, False
    if not args.no_server:
        # The simulator is a separate LLM setting: another backend (here the same weights). The
        # server runs only around the simulate stage, so it does not share the RAM with training.
        overrides += ["simulate.llm.backend=openai", "simulate.llm.endpoints=[http://127.0.0.1:0/v1]",
                      "simulate.llm.model=smollm2"]
    for stage in STAGES:
        server = None
        if stage == "simulate" and not args.no_server:
            server, url = start_server(out / "vllm-server.log")
            overrides = [f"simulate.llm.endpoints=[{url}]" if o.startswith("simulate.llm.endpoints=") else o
                         for o in overrides]
            served = True
        try:
            stages[stage] = run_stage(stage, overrides, log)
        finally:
            if server is not None:
                stop(server)
        print(f"{stage}: {stages[stage]['seconds']} s, peak RSS {stages[stage]['peak_rss_gb']} GB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "config": CONFIG, "scale": args.scale, "overrides": overrides, "model": PYTHIA_160M, "num_latents": 32768,
              "simulator": "vLLM OpenAI server on 127.0.0.1" if served else "local",
              "stages": stages}
    (out / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'rehearsal.json'}")


if __name__ == "__main__":
    main()
