"""The rehearsal of the paper's setting at its real shapes (scripts/rehearse.py): a random-init
Pythia-160M-shaped model, 32,768 latents, layer 6 with six layers after it, Pythia's tokenizer,
every stage, the simulator on a real vLLM OpenAI server on 127.0.0.1 and the explainer on the
local backend (two LLM settings); each stage's wall time and peak RSS recorded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llm_servers import require_vllm_venv
from procs import ONE_DEVICE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_at_the_papers_shapes(tmp_path):
    require_vllm_venv()
    out = tmp_path / "rehearsal"
    r = subprocess.run([sys.executable, "scripts/rehearse.py", "--out", str(out), "--tiny"], cwd=REPO,
                       capture_output=True, text=True, timeout=2400, env=ONE_DEVICE)  # one CPU device, as a user has
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((out / "rehearsal.json").read_text())
    assert list(rec["stages"]) == ["eval", "capture", "train", "examples", "explain", "score", "simulate",
                                   "calibrate", "evaluate", "report"]
    assert all(s["seconds"] > 0 and s["peak_rss_gb"] > 0 for s in rec["stages"].values())
    # Each stage's own peak: the report holds no model, so it stays far below the 2 GB that a
    # parent which had built the model put under every stage's wait4 max RSS.
    assert rec["stages"]["report"]["peak_rss_gb"] < 1.5, rec["stages"]
    assert rec["simulator"].startswith("vLLM OpenAI server")
    run = out / "run"
    res = json.loads((run / "evaluate" / "results.json").read_text())
    assert res["latents_total"] == 32768 and res["layer"] == 6 and res["kind"] == "transcoder"
    assert list(res["other_modes"]) == ["whole_layer"]
    explain = json.loads((run / "explain" / "identity.json").read_text())
    simulate = json.loads((run / "simulate" / "identity.json").read_text())
    assert explain["llm"]["backend"] == "local" and simulate["llm"]["backend"] == "openai"
    config = json.loads((out / "pythia-160m-random" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["rotary_pct"]) == \
        (768, 12, 50304, 0.25)
    assert (run / "report" / "report.md").read_text().startswith("# Natural-language rewrite of layer 6")
