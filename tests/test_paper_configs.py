"""The paper's configs (configs/pythia-160m-l6*.yaml) set every value the paper gives, each with a
comment naming its source, and load offline; Pythia's tokenizer ships and gives Pythia's token ids."""

import math
import re
from pathlib import Path

import pytest
import yaml

from nlrw_jax.config import BUILTIN_DIR, load_config

REPO = Path(__file__).resolve().parents[1]

# key -> the paper's value (METHOD.md). Each must be set in the file itself: a key left to the tiny
# defaults fails even where the default happens to agree (the defaults may change; the paper does not).
PAPER = {
    "model.checkpoint": "EleutherAI/pythia-160m",
    "model.revision": "step143000",
    "model.dtype": "float16",
    "model.layer": 6,
    "data.train": ["hf:monology/pile-uncopyrighted:train"],
    "data.ctx_len": 256,
    "capture.windows": 39063,  # 10M tokens of 256-token contexts
    "sparse.num_latents": 32768,
    "sparse.k": 32,
    "sparse.learning_rate": 2e-4 / math.sqrt(32768 / 2 ** 14),
    "sparse.warmup_steps": 1000,
    "sparse.grad_clip": 1.0,
    "sparse.dead_tokens": 10_000_000,
    "examples.window_tokens": 32,
    "examples.non_activating": 100,
    "explain.latents": 0,  # every latent
    "explain.examples_per_decile": 4,  # ~40 windows for the explainer
    "score.activating_per_decile": 10,  # 100 activating
    "score.non_activating": 100,
    "llm.backend": "vllm",
    "llm.model": "meta-llama/Llama-3.1-8B-Instruct",
    "llm.top_logprobs": 10,
    "explain.llm.model": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",  # the explainer: 70B AWQ int4
    "simulate.mode": "one_at_a_time",
    "simulate.sentences": 1000,
    "simulate.calibration": 10000,
    "simulate.readout": "reference",
    "evaluate.fractions": [0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
}
KIND = {"pythia-160m-l6": ("transcoder", True), "pythia-160m-l6-sae": ("sae", False)}


def _get(node, key: str):
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _same(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) else a == b


@pytest.mark.parametrize("name", sorted(KIND))
def test_paper_values_set_in_the_file(name):
    raw = yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text())
    cfg = load_config(name)  # offline: loading never touches the hub
    missing = [k for k in PAPER if not _has(raw, k)]
    assert not missing, f"{name}: left to the tiny defaults: {missing}"
    wrong = {k: _get(cfg, k) for k, v in PAPER.items() if not _same(_get(cfg, k), v)}
    assert not wrong, f"{name}: not the paper's values: {wrong}"
    assert cfg.calibrate.sizes and 1000 in cfg.calibrate.sizes  # the 1K point of the sweep
    assert (cfg.sparse.kind, cfg.sparse.skip) == KIND[name]
    assert cfg.examples.per_decile >= cfg.explain.examples_per_decile + cfg.score.activating_per_decile
    assert Path(cfg.data.tokenizer).is_file(), cfg.data.tokenizer


def _has(raw: dict, key: str) -> bool:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("name", sorted(KIND))
def test_every_value_has_its_source(name):
    """Every line that sets a value names where the value comes from (paper, sparsify or ours)."""
    bare = []
    for n, line in enumerate((BUILTIN_DIR / f"{name}.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s*[\w.]+:\s*[^\s#]", line) and not re.search(r"#\s*(paper|sparsify|ours)\b", line):
            bare.append(f"{n}: {line.strip()}")
    assert not bare, f"{name}: values without a source comment: {bare}"


# Pythia's (GPT-NeoX-20B's) token ids, as EleutherAI/pythia-160m's tokenizer gives them.
KNOWN_IDS = {"Hello world": [12092, 1533], "The": [510], " the": [253], " and": [285], "hello": [25521],
             "<|endoftext|>": [0]}


def test_pythia_tokenizer_ships():
    from tokenizers import Tokenizer

    assert (REPO / "assets").is_symlink() and (REPO / "assets").resolve() == REPO / "nlrw_jax" / "assets"
    folder = BUILTIN_DIR.parent / "assets" / "pythia"
    assert (folder / "NOTICE").is_file() and (folder / "LICENSE").is_file()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, ids in KNOWN_IDS.items():
        assert tok.encode(text).ids == ids, text
    assert tok.get_vocab_size() == 50277  # ids 0..50276, as Pythia's: no extra tokens
    assert tok.id_to_token(1) == "<|padding|>" and tok.decode(tok.encode("Hello world").ids) == "Hello world"


@pytest.mark.parametrize("name", ["pythia-160m-l6", "pythia-160m-l6-sae"])
def test_explainer_and_simulator_are_two_llms(name):
    """The 70B explainer and the 8B simulator: each stage's own LLM, the rest of the settings shared."""
    from nlrw_jax.config import stage_llm

    cfg = load_config(name)
    explain, simulate = stage_llm(cfg, "explain"), stage_llm(cfg, "simulate")
    assert explain.model.endswith("70B-Instruct-AWQ-INT4") and simulate.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert explain.backend == simulate.backend == "vllm" and explain.top_logprobs == simulate.top_logprobs == 10
