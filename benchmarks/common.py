"""What the side-by-side benchmarks share: the model shapes, a random HF folder, CPU setup."""

import os
import sys
from pathlib import Path

import torch

from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoXConfig, init_params

# Pythia-shaped models (rotary_pct 0.25, parallel residual: GPTNeoXConfig's defaults).
MODEL_SHAPES = {
    "tiny": dict(vocab_size=8192, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=256),
    "pythia-160m": dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=2048),
}


def random_model_folder(name: str, tmp: str) -> Path:
    """A random-weight model of a MODEL_SHAPES shape in HF format, so both sides load the same weights."""
    config = GPTNeoXConfig(**MODEL_SHAPES[name])
    return hf.save(config, init_params(config, seed=0), Path(tmp) / name)


def setup_cpu() -> tuple[int, float]:
    """torch gets every core this process may use; warns when another job is loading the CPU."""
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} before starting: another job is using the CPU, so these numbers "
              f"are not trustworthy (torch's {threads} threads suffer most from contention)", file=sys.stderr)
    return threads, load
