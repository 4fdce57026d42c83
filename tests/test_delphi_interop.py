"""eai-delphi interop, both ways, checked with delphi's own code (eai-delphi 0.1.3 in .venv-vllm, run
in a subprocess): explanation files written as delphi's pipeline writes them are imported by
`explain.from_delphi` unchanged; `nlrw export-delphi` output is read by delphi's LatentDataset and
explanation_loader and gives our examples, activations and explanations."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_run import REPO, make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.interpret import delphi_format as D
from nlrw_jax.interpret import examples as E
from nlrw_jax.stages.common import load_examples, load_explanations, model_folder

DELPHI_PY = REPO / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not DELPHI_PY.exists(), reason="no .venv-vllm (eai-delphi) here")

# Exactly what delphi.__main__.process_cache's explainer_postprocess does, with delphi's own Latent naming.
DELPHI_WRITE = """
import json, sys
from pathlib import Path
import orjson
from delphi.latents.latents import Latent
folder, hook, texts = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
folder.mkdir(parents=True, exist_ok=True)
for latent, text in texts.items():
    with open(folder / f"{Latent(hook, int(latent))}.txt", "wb") as f:
        f.write(orjson.dumps(text))
"""

# delphi's own readers: LatentDataset over the cache, explanation_loader over the explanation files.
DELPHI_READ = """
import asyncio, json, sys
import torch
from transformers import PreTrainedTokenizerFast
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.explainers.explainer import explanation_loader
from delphi.latents import LatentDataset
out, hook, tokenizer_file = sys.argv[1:4]
width, latents = int(sys.argv[4]), json.loads(sys.argv[5])
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
ds = LatentDataset(raw_dir=f"{out}/latents", modules=[hook], latents={hook: torch.tensor(latents)}, tokenizer=tok,
                   sampler_cfg=SamplerConfig(n_examples_train=10000, n_examples_test=0, train_type="top"),
                   constructor_cfg=ConstructorConfig(example_ctx_len=width, min_examples=1, n_non_activating=3,
                                                     center_examples=True, non_activating_source="random"))
records = list(ds)
out_records = {}
for r in records:
    explanation = asyncio.run(explanation_loader(r, f"{out}/explanations")).explanation
    out_records[r.latent.latent_index] = dict(
        name=str(r.latent), explanation=explanation,
        examples=[[e.tokens.tolist(), e.activations.float().tolist()] for e in r.examples],
        not_active=[e.tokens.tolist() for e in r.not_active])
print(json.dumps(out_records))
"""


def delphi(script: str, *args) -> str:
    r = subprocess.run([str(DELPHI_PY), "-c", script, *map(str, args)], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_with_examples(tmp_path_factory)


@pytest.fixture(scope="module")
def imported(run, tmp_path_factory):
    """Four live latents' explanations written by delphi's writer (one its parse-failure text),
    imported into the run by `nlrw explain` with explain.from_delphi."""
    cfg, overrides = run
    ex = load_examples(cfg)
    live = [int(i) for i in np.flatnonzero(ex.data["window_count"] > 0)[:4]]
    texts = {live[0]: "Words about the sea, \u00e9t\u00e9 and \"quoted\" ships.", live[1]: "Line breaks\nand tabs\t.",
             live[2]: "Explanation could not be parsed.", live[3]: "Numbers."}
    hook = D.hookpoint_for(ex.meta["kind"], cfg.model.layer)
    folder = tmp_path_factory.mktemp("delphi") / "explanations"
    delphi(DELPHI_WRITE, folder, hook, json.dumps(texts))
    args = [*overrides, f"explain.from_delphi={folder.parent}"]  # a delphi run folder holding explanations/
    r = nlrw("explain", "configs/tiny.yaml", *args)
    return cfg, args, texts, hook, r


def test_delphi_written_explanations_are_imported_unchanged(imported):
    cfg, args, texts, hook, _ = imported
    got = load_explanations(load_config("configs/tiny.yaml", args))
    want = {i: (None if t == "Explanation could not be parsed." else t) for i, t in texts.items()}
    assert got == want
    records = [json.loads(x) for x in Path(cfg.run_dir, "explain", "explanations.jsonl").read_text().splitlines()]
    assert {r["source"] for r in records} == {f"{hook}_latent{i}.txt" for i in texts}
    assert all(r["model"] == "delphi" for r in records)
    ident = json.loads(Path(cfg.run_dir, "explain", "identity.json").read_text())
    assert len(ident["delphi"]) == 16 and "llm" not in ident and "examples" not in ident
    again = nlrw("explain", "configs/tiny.yaml", *args)  # done: nothing rewritten
    assert again.returncode == 0 and records == [json.loads(x) for x in Path(
        cfg.run_dir, "explain", "explanations.jsonl").read_text().splitlines()]


def test_export_is_read_back_by_delphi(imported, tmp_path):
    cfg, args, texts, hook, _ = imported
    out = tmp_path / "delphi-out"
    r = nlrw("export-delphi", "configs/tiny.yaml", *args, "--out", str(out))
    summary = json.loads(r.stdout)
    assert summary["latents"] == 4 and summary["explanations"] == 3 and summary["hookpoint"] == hook

    ex = load_examples(cfg)
    latents = sorted(texts)
    tokenizer = Path(model_folder(cfg)) / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.exists() else Path(cfg.data.tokenizer)
    got = {int(k): v for k, v in json.loads(delphi(DELPHI_READ, out, hook, tokenizer, ex.width,
                                                   json.dumps(latents))).items()}
    assert sorted(got) == latents  # every exported latent fires on some row

    # Our side: every example window of the four latents, with each latent's activations on it.
    per_decile, n_neg = ex.data["act_window"].shape[2], ex.data["neg_window"].shape[1]
    own = {i: ex.activating(i, per_decile) for i in latents}
    windows = sorted({w for i in latents for w in own[i] + ex.non_activating(i, n_neg)})
    toks = ex.rows.window_tokens(np.asarray(windows), ex.width)
    acts = E.latent_acts(ex.params, ex.meta, ex.rows.window_inputs(np.asarray(windows), ex.width),
                         np.asarray(latents)).reshape(len(windows), ex.width, len(latents))
    for j, i in enumerate(latents):
        rec = got[i]
        assert rec["name"] == f"{hook}_latent{i}"
        assert rec["explanation"] == (texts[i] if texts[i] != "Explanation could not be parsed." else
                                      "No explanation found")  # delphi's own text for a missing file
        ours = {tuple(t): a[:, j] for t, a in zip(toks.tolist(), acts)}
        theirs = {tuple(t): np.asarray(a) for t, a in rec["examples"]}
        # delphi's examples: exactly the rows where the latent fires, with its activations (float16)
        assert set(theirs) == {t for t, a in ours.items() if a.max() > 0}
        for t, a in theirs.items():
            np.testing.assert_allclose(a, ours[t], rtol=2e-3, atol=1e-4)
        assert {tuple(t) for t in toks[[windows.index(w) for w in own[i]]].tolist()} <= set(theirs)
        assert rec["not_active"] and all(ours[tuple(t)].max() == 0 for t in rec["not_active"])


def test_export_refuses_a_folder_in_use(imported, tmp_path):
    cfg, args, _, _, _ = imported
    (tmp_path / "x").write_text("mine")
    r = nlrw("export-delphi", "configs/tiny.yaml", *args, "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "not an empty folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_delphi_folder_with_latents_the_coder_lacks_is_refused(run, tmp_path):
    cfg, overrides = run
    ex = load_examples(cfg)
    hook = D.hookpoint_for(ex.meta["kind"], cfg.model.layer)
    n = ex.num_latents
    D.write_explanations(tmp_path, hook, {0: "A word.", n: "Beyond the coder.", n + 7: "Further."})
    r = nlrw("explain", "configs/tiny.yaml", *overrides, f"explain.from_delphi={tmp_path}", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"explains 2 latents the coder does not have ({n}, {n + 7}; it has 0..{n - 1})" in r.stderr
    # explanation files of other hookpoints only, and none of them ours: also one line
    D.write_explanations(tmp_path, "layers.0.attn", {0: "x"})
    for f in tmp_path.glob(f"{hook}_latent*.txt"):
        f.unlink()
    D.write_explanations(tmp_path, "layers.1.attn", {0: "y"})
    r = nlrw("explain", "configs/tiny.yaml", *overrides, f"explain.from_delphi={tmp_path}", check=False)
    assert r.returncode == 2 and "none of them this coder's" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, message", [
    (["explain.style=fancy"], "explain.style: 'fancy' is not one of ['plain', 'contrastive']"),
    (["explain.from_delphi=/no/such/folder"], "explain.from_delphi: '/no/such/folder' is not a folder"),
    (["explain.from_delphi=.", "explain.style=contrastive"], "explain.style: contrastive explanations are written"),
    (["explain.neighbours=0"], "explain.neighbours: neighbours (0) and neighbour_windows (1) must be > 0"),
])
def test_explain_keys_checked_at_load(overrides, message):
    from nlrw_jax.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_config("configs/tiny.yaml", overrides)


def test_explanation_files_round_trip_without_delphi(tmp_path):
    texts = {3: "Plain.", 10: "\u00e9t\u00e9 \"q\"\n", 12: None}
    assert D.write_explanations(tmp_path, "layers.5.mlp", texts) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.5.mlp_latent10.txt", "layers.5.mlp_latent3.txt"]
    got, digest, hook = D.read_explanations(tmp_path, "layers.5.mlp")
    assert got == {3: "Plain.", 10: texts[10]} and hook == "layers.5.mlp" and len(digest) == 16
    (tmp_path / "layers.5.mlp_latent4.txt").write_text("not json")
    from nlrw_jax.errors import UserError
    with pytest.raises(UserError, match="latent4.txt: not a JSON string"):
        D.read_explanations(tmp_path, "layers.5.mlp")
