"""Runs prompts through the `vllm` backend (vLLM's offline engine) and writes what it answers.

    python -m nlrw_jax.llm.engine_check --model smollm2 --prompts IN.json --out OUT.json [--top-logprobs 20]

Meant for the .venv-vllm made by scripts/setup_vllm.sh (vLLM and our JAX stack do not share one
environment), e.g. to check that the three backends agree (tests/test_llm_backends.py).

IN.json: either a list of prompts (each a list of token ids; the candidates are then --candidates)
or an object
    {"prompts": [[ids...], ...], "candidates": ["0", "1", ...], "max_tokens": 8,
     "render": [{"messages": [{"role": ..., "content": ...}], "answer_prefix": "["}, ...],
     "slots": [[slot index, ...], ...]}                  # per prompt: backend.slot_logprobs
where everything but "prompts" is optional. OUT.json (written atomically):
    {"logprobs": [[float or null (= -inf), ...], ...],   # [n prompts, n candidates]
     "slot_logprobs": [[[float or null, ...], ...], ...], # [n prompts][n slots][n candidates], first
     "slot_logprobs_cached": [...],                      # the same again, the prompts now in the prefix cache
     "slot_cache_stats": [{...}, {...}],                 # of the two: prompts recomputed, cached tokens
     "generations": [str, ...],                          # greedy, max_tokens each
     "rendered": [[ids...], ...],                        # backend.render of each "render" item
     "candidates": [...], "startup_s": s, "logprobs_s": s, "generate_s": s}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from nlrw_jax.errors import UserError

DIGITS = [str(d) for d in range(10)]


def read_request(path: Path, candidates: list[str], max_tokens: int) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    req = {"prompts": raw} if isinstance(raw, list) else raw
    if not isinstance(req, dict) or not isinstance(req.get("prompts"), list):
        raise UserError(f"{path}: expected a list of prompts or an object with a 'prompts' list")
    prompts = req["prompts"]
    for i, p in enumerate(prompts):
        if not (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
            raise UserError(f"{path}: prompt {i} is not a non-empty list of token ids")
    return {"prompts": prompts, "candidates": [str(c) for c in req.get("candidates", candidates)],
            "max_tokens": int(req.get("max_tokens", max_tokens)), "render": list(req.get("render", [])),
            "slots": req.get("slots")}


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(args) -> dict:
    from nlrw_jax.config import LLMConfig
    from nlrw_jax.llm.backends import make_backend

    req = read_request(args.prompts, args.candidates.split(","), args.max_tokens)
    cfg = LLMConfig(backend="vllm", model=args.model, dtype=args.dtype, top_logprobs=args.top_logprobs,
                    max_model_len=args.max_model_len, memory_fraction=args.memory_fraction,
                    block_size=args.block_size or None)
    t0 = time.perf_counter()
    backend = make_backend(cfg, progress=False)
    t1 = time.perf_counter()
    try:
        rendered = [backend.render(r["messages"], r.get("answer_prefix", "")) for r in req["render"]]
        # slot log-probs first on the fresh engine, then again once every prompt is in the prefix cache
        slot_lp = backend.slot_logprobs(req["prompts"], req["slots"], req["candidates"]) if req["slots"] else []
        stats = [backend.slot_cache_stats] if req["slots"] else []
        lp = backend.next_token_logprobs(req["prompts"], req["candidates"]) if req["prompts"] else []
        t2 = time.perf_counter()
        gens = backend.generate(req["prompts"], req["max_tokens"]) if req["prompts"] and req["max_tokens"] > 0 else []
        t3 = time.perf_counter()
        slot_again = backend.slot_logprobs(req["prompts"], req["slots"], req["candidates"]) if req["slots"] else []
        stats += [backend.slot_cache_stats] if req["slots"] else []
    finally:
        backend.close()
    def js(rows):
        return [[float(v) if math.isfinite(v) else None for v in row] for row in rows]

    return {"logprobs": js(lp), "slot_logprobs": [js(x) for x in slot_lp],
            "slot_logprobs_cached": [js(x) for x in slot_again], "slot_cache_stats": stats,
            "generations": gens, "rendered": rendered, "candidates": req["candidates"],
            "model": args.model, "startup_s": t1 - t0, "logprobs_s": t2 - t1, "generate_s": t3 - t2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlrw_jax.llm.engine_check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON: prompts (token ids) and candidates")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--candidates", default=",".join(DIGITS), help="comma-separated, if IN.json has none")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--memory-fraction", type=float, default=0.2)
    ap.add_argument("--block-size", type=int, default=32, help="KV-cache block size; 0 = the engine's default")
    args = ap.parse_args(argv)
    try:
        write_json_atomic(args.out, run(args))
    except UserError as e:
        print(f"engine_check: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM's engine spawns workers that re-import __main__: keep LLM(...) behind this
    sys.exit(main())
