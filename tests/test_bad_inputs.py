"""Bad input across the CLI, in one place: every case exits with status 2 (75 where a service is
unavailable: retrying later may work) and prints exactly one line, `nlrw: error: ...`, naming the
offending file, config key or endpoint, and no traceback.

Cases: paths, configs, model checkpoints, transcoder checkpoints (sparsify and orbax),
activation stores, examples, explanation files, scores / predictions / maps, and the answers of
an LLM server (the `openai` backend against a FAKE loopback server, see FakeLLMServer).

Most cases run the CLI in this process (`nlrw_jax.cli.main` returns the exit status; stderr via
capsys); a few run `.venv/bin/nlrw` as a real process to prove the exit status. One small run
(tiny_run.make_run_with_examples, then explain / score / simulate / calibrate against the fake
server) is built once for the module; each case corrupts a copy of what it needs in tmp_path.

"One line" is what a terminal shows: a progress bar that was drawn and then cleared with
carriage returns (what the stages do when they fail) leaves nothing on the screen, so
stderr is rendered as a terminal would (\\r returns to column 0) before counting its lines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from procs import ONE_DEVICE
from tiny_run import make_run_with_examples

from nlrw_jax.cli import main

REPO = Path(__file__).resolve().parents[1]
NLRW = REPO / ".venv" / "bin" / "nlrw"
TINY = REPO / "assets" / "tiny-pythia" / "final"
CFG = "configs/tiny.yaml"
SIM = ["simulate.mode=one_at_a_time", "simulate.sentences=6", "simulate.calibration=8", "simulate.contexts_per_shard=4",
       "simulate.latents_per_shard=3", "calibrate.sizes=[4]", "evaluate.fractions=[0.25,1.0]",
       "evaluate.batch_size=4", "evaluate.bootstrap=50"]


# ----------------------------------------------------------------------------- the assertions


def screen_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows for `text`: each \\r returns to column 0 and overwrites."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for piece in raw.split("\r"):
            shown = piece + shown[len(piece):]
        if shown.strip():
            lines.append(shown.rstrip())
    return lines


def check_one_line(rc: int, stderr: str, *names: str, status: int = 2) -> str:
    """Exit `status`, one `nlrw: error:` line on stderr naming every one of `names`, no traceback."""
    assert rc == status, f"exit status {rc}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = screen_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("nlrw: error: "), f"not one error line:\n{stderr!r}"
    assert stderr.count("\n") == 1, f"more than one line on stderr:\n{stderr!r}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    print(lines[0])  # shown with -s: the error as the user reads it
    return lines[0]


def fails(capsys, stage: str, *args, names=(), status: int = 2) -> str:
    """`nlrw stage configs/tiny.yaml *args` in this process: must be the one-line error naming `names`."""
    capsys.readouterr()
    rc = main([stage, CFG, *map(str, args)])
    return check_one_line(rc, capsys.readouterr().err, *names, status=status)


def fails_as_a_process(stage: str, *args, names=(), status: int = 2) -> str:
    """The same through a real `nlrw` process: proves the process's exit status."""
    out = subprocess.run([str(NLRW), stage, *map(str, args)], cwd=REPO, env=ONE_DEVICE, capture_output=True,
                         timeout=300)  # bytes: text mode would turn a progress bar's \r into \n
    return check_one_line(out.returncode, out.stderr.decode(errors="replace"), *names, status=status)


# ------------------------------------------------------------------ a FAKE LLM server (loopback)


class FakeLLMServer:
    """A FAKE OpenAI-compatible server (stdlib http.server on 127.0.0.1), NOT vLLM: it serves
    /v1/models and /v1/completions with canned answers, good or bad as `models` / `completions`
    say, so that the `openai` backend's handling of bad answers is tested without a real server
    (the real vLLM server tests live in test_llm_backends.py). "ok" answers are well-formed: a
    fixed explanation text, and fixed log-probs for the digits 0-9."""

    MODEL = "fake-model"
    TOP = {str(d): -0.5 - 0.3 * abs(d - 2) for d in range(10)}  # "0".."9" by token text

    def __init__(self):
        self.models = "ok"  # ok | garbage | http404
        self.completions = "ok"  # ok | garbage | http500 | http400 | no_logprobs
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models" or fake.models == "http404":
                    return self._send(404, b'{"detail": "Not Found"}')
                if fake.models == "garbage":
                    return self._send(200, b"<html>it works!</html>")
                self._send(200, json.dumps({"object": "list", "data": [{"id": fake.MODEL, "object": "model"}]})
                           .encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                mode = fake.completions
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, b'{"detail": "Not Found"}')
                if mode == "http500":
                    return self._send(500, b'{"error": "Internal Server Error"}')
                if mode == "http400":
                    return self._send(400, b'{"error": {"message": "This model\'s maximum context length is 8"}}')
                if mode == "garbage":
                    return self._send(200, b'{"choices": [{"text": "1", "logprobs": {"top_lo')
                choice = {"index": 0, "text": " Words from the Bible.", "logprobs": None, "finish_reason": "length"}
                if body.get("logprobs") and mode != "no_logprobs":
                    choice.update(text="1", logprobs={"tokens": ["1"], "token_logprobs": [fake.TOP["1"]],
                                                      "top_logprobs": [fake.TOP]})
                self._send(200, json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": fake.MODEL,
                                            "choices": [choice]}).encode())

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up mid-answer (the pool cancels the rest of a failed call): expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url() -> str:
    """A loopback port where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def fake_server():
    server = FakeLLMServer()
    yield server
    server.close()


@pytest.fixture
def server(fake_server):
    """The fake server, answering well by default; each test sets the bad answer it wants."""
    fake_server.models = fake_server.completions = "ok"
    yield fake_server
    fake_server.models = fake_server.completions = "ok"


def llm_overrides(url: str) -> list[str]:
    return ["llm.backend=openai", f"llm.endpoints=[{url}]", "llm.retries=1", "llm.backoff_s=0.01",
            "llm.timeout_s=10", "llm.max_concurrency=4"]


# ---------------------------------------------------------------------------- the shared run


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_server):
    """(run folder, overrides): a small real run (capture, train, examples), explained, scored,
    simulated and calibrated through the fake server. Never modified: cases copy what they need."""
    from nlrw_jax.config import load_config
    from nlrw_jax.stages import calibrate, explain, score, simulate

    _, overrides = make_run_with_examples(tmp_path_factory)
    overrides = [*overrides, *SIM]
    cfg = load_config(CFG, [*overrides, *llm_overrides(fake_server.url)])
    explain.run(cfg, progress=False)
    score.run(cfg, progress=False)
    simulate.run(cfg, progress=False)
    calibrate.run(cfg, progress=False)
    return Path(cfg.run_dir), overrides


def copy_run(run, tmp_path, keep: tuple[str, ...]) -> tuple[Path, list[str]]:
    """A copy of the run's folders in `keep` (only those) in tmp_path; the overrides addressing it."""
    src, overrides = run
    dst = tmp_path / "run"
    for name in keep:
        shutil.copytree(src / name, dst / name)
    return dst, [*overrides, f"run_dir={dst}"]


# ----------------------------------------------------------------------------------- paths


def test_missing_config_file_exits_2_from_a_real_process(tmp_path):
    fails_as_a_process("eval", "configs/no-such.yaml", names=["config file configs/no-such.yaml"])


def test_missing_checkpoint_folder(capsys, tmp_path):
    fails(capsys, "eval", f"run_dir={tmp_path}", f"model.checkpoint={tmp_path / 'no-model'}",
          names=[tmp_path / "no-model", "does not exist"])


def test_missing_data_file(capsys, tmp_path):
    fails(capsys, "eval", f"run_dir={tmp_path}", f"data.train={tmp_path / 'no-train.jsonl'}",
          f"data.cache_dir={tmp_path / 'cache'}", names=[tmp_path / "no-train.jsonl", "not found"])


def test_run_dir_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    fails(capsys, "train", f"run_dir={path}", names=[f"run_dir {path}", "not a folder"])


# ----------------------------------------------------------------------------------- configs


def test_unknown_config_key(capsys, tmp_path):
    fails(capsys, "train", f"run_dir={tmp_path}", "sparse.num_latent=64", names=["unknown config key sparse.num_latent"])


def test_config_value_of_the_wrong_type(capsys, tmp_path):
    fails(capsys, "train", f"run_dir={tmp_path}", "sparse.k=eight", names=["config key sparse.k expects int", "eight"])


def test_config_file_that_is_not_a_mapping(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- run_dir: runs/x\n- model: {}\n")
    capsys.readouterr()
    check_one_line(main(["eval", str(bad)]), capsys.readouterr().err, bad, "mapping")


def test_bad_enum_value_sparse_kind(capsys, tmp_path):
    fails(capsys, "train", f"run_dir={tmp_path}", "sparse.kind=mlp", names=["config key sparse.kind", "'mlp'"])


def test_bad_enum_value_calibrate_estimator(capsys, tmp_path):
    fails(capsys, "calibrate", f"run_dir={tmp_path}", "calibrate.estimator=median",
          names=["config key calibrate.estimator", "'median'"])


def test_bad_enum_value_llm_backend(capsys, run, tmp_path):
    _, args = copy_run(run, tmp_path, keep=("activations", "sparse", "examples"))
    fails(capsys, "explain", *args, "llm.backend=gpt", names=["config key llm.backend", "'gpt'"])


def test_bad_mesh(capsys, tmp_path):
    fails(capsys, "train", f"run_dir={tmp_path}", "mesh.data=3", names=["mesh: data=3", "8 devices"])


# ------------------------------------------------------------------------- model checkpoints


def _model_copy(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def test_truncated_model_safetensors(capsys, tmp_path):
    folder = _model_copy(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(capsys, "eval", f"run_dir={tmp_path}", f"model.checkpoint={folder}", names=[weights])


def test_model_config_json_missing(capsys, tmp_path):
    folder = _model_copy(tmp_path)
    (folder / "config.json").unlink()
    fails(capsys, "eval", f"run_dir={tmp_path}", f"model.checkpoint={folder}", names=[folder / "config.json", "missing"])


def test_model_config_json_of_another_architecture(capsys, tmp_path):
    folder = _model_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    fails(capsys, "eval", f"run_dir={tmp_path}", f"model.checkpoint={folder}", names=[folder / "config.json"])


# ------------------------------------------------------------------- transcoder checkpoints


def test_corrupt_orbax_checkpoint(capsys, run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    steps = sorted(int(p.name) for p in (dst / "sparse" / "checkpoints").iterdir() if p.name.isdigit())
    latest = dst / "sparse" / "checkpoints" / str(steps[-1])
    (dst / "sparse" / "summary.json").unlink()  # as if killed after the checkpoint: train resumes from it
    for f in (latest / "default").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage" * 3)
    fails(capsys, "train", *args, names=[latest, "could not be restored"])


def test_truncated_transcoder_safetensors(capsys, run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    weights = dst / "sparse" / "sparsify" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    fails(capsys, "examples", *args, names=[weights])


def test_transcoder_cfg_json_without_d_in(capsys, run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    path = dst / "sparse" / "sparsify" / "cfg.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "d_in"}))
    fails(capsys, "examples", *args, names=[path, "d_in"])


# ------------------------------------------------------------------------- activation store


def test_store_without_manifest(capsys, run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    (dst / "activations" / "manifest.json").unlink()
    fails(capsys, "examples", *args, names=[dst / "activations", "no activation store"])


def test_incomplete_store_exits_2_from_a_real_process(run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    done = sorted((dst / "activations" / "host000" / "done").iterdir())
    done[-1].unlink()  # the last chunk never finished
    fails_as_a_process("examples", CFG, *args, names=[dst / "activations", "incomplete"])


def test_store_of_another_layer(capsys, run, tmp_path):
    _, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    fails(capsys, "examples", *args, "model.layer=4", names=["layer 5", "layer 4", "activations"])


def test_store_manifest_not_json(capsys, run, tmp_path):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse"))
    (dst / "activations" / "manifest.json").write_text('{"version": 1, "layer": ')
    fails(capsys, "examples", *args, names=[dst / "activations" / "manifest.json", "not valid JSON"])


# --------------------------------------------------------------------------------- examples


def test_truncated_examples_file(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse", "examples"))
    path = dst / "examples" / "examples.npz"
    path.write_bytes(path.read_bytes()[:2000])
    fails(capsys, "explain", *args, *llm_overrides(server.url), names=[path])


def test_examples_without_identity(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=("activations", "sparse", "examples"))
    (dst / "examples" / "identity.json").unlink()
    fails(capsys, "explain", *args, *llm_overrides(server.url), names=[dst / "examples" / "identity.json"])


# ------------------------------------------------------------------------ explanation files

EXPLAINED = ("activations", "sparse", "examples", "explain")


def _explanations(dst: Path) -> tuple[Path, list[str]]:
    path = dst / "explain" / "explanations.jsonl"
    return path, path.read_text().splitlines()


def test_explanations_garbled_line(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    path, lines = _explanations(dst)
    lines[1] = lines[1][:10] + "\x00\x00garbage" + lines[1][10:]
    path.write_text("\n".join(lines) + "\n")
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[f"{path}:2"])


def test_explanations_torn_last_line(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    path, lines = _explanations(dst)
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:17])  # a killed write
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[f"{path}:{len(lines)}"])


def test_explanation_record_without_latent(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    path, lines = _explanations(dst)
    rec = json.loads(lines[2])
    del rec["latent"]
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[f"{path}:3", "latent"])


def test_explanation_that_is_not_text(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    path, lines = _explanations(dst)
    lines[0] = json.dumps({**json.loads(lines[0]), "explanation": {"text": "nested"}})
    path.write_text("\n".join(lines) + "\n")
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[f"{path}:1", "explanation"])


def test_explanations_of_another_run(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    manifest = dst / "explain" / "identity.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "coder": "0123456789abcdef"}))
    fails(capsys, "score", *args, *llm_overrides(server.url),
          names=[dst / "explain" / "explanations.jsonl", "another transcoder"])


def test_explanations_without_identity(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    (dst / "explain" / "identity.json").unlink()
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[dst / "explain" / "identity.json"])


def test_explain_identity_not_json(capsys, run, tmp_path, server):
    """The explain folder's own identity, garbled: resuming `nlrw explain` names it."""
    dst, args = copy_run(run, tmp_path, keep=EXPLAINED)
    manifest = dst / "explain" / "identity.json"
    manifest.write_text(manifest.read_text()[:25])
    fails(capsys, "explain", *args, *llm_overrides(server.url), names=[manifest])


# ------------------------------------------------------------------ scores and predictions

SIMULATED = (*EXPLAINED, "scores", "simulate")
CALIBRATED = (*SIMULATED, "calibrate")


@pytest.mark.parametrize("stage,name", [("calibrate", "00005.npz"), ("evaluate", "00001.npz")])
def test_prediction_shard_truncated(capsys, run, tmp_path, server, stage, name):
    """A stage reads the shards of its contexts: calibrate the calibration ones (6-13; shard 5 is
    contexts 8-11), evaluate the evaluation ones (0-5; shard 1 is contexts 0-3)."""
    dst, args = copy_run(run, tmp_path, keep=SIMULATED if stage == "calibrate" else CALIBRATED)
    shard = dst / "simulate" / "shards" / name
    shard.write_bytes(shard.read_bytes()[:300])
    fails(capsys, stage, *args, *llm_overrides(server.url), names=[shard])


def test_prediction_shard_missing(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=SIMULATED)
    (dst / "simulate" / "shards" / "00002.npz").unlink()
    fails(capsys, "calibrate", *args, *llm_overrides(server.url), names=[dst / "simulate" / "shards", "first: 2"])


def test_simulation_contexts_corrupt(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=SIMULATED)
    path = dst / "simulate" / "contexts.npz"
    path.write_bytes(b"PK\x03\x04" + os.urandom(64))
    fails(capsys, "calibrate", *args, *llm_overrides(server.url), names=[path])


def test_simulation_identity_not_json(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=SIMULATED)
    path = dst / "simulate" / "identity.json"
    path.write_text("{\"coder\": ")
    fails(capsys, "calibrate", *args, *llm_overrides(server.url), names=[path])


def test_ranking_not_json(capsys, run, tmp_path, server):
    dst, args = copy_run(run, tmp_path, keep=CALIBRATED)
    path = dst / "scores" / "ranking.json"
    path.write_text("[3, 1, ")
    fails(capsys, "evaluate", *args, *llm_overrides(server.url), names=[path])


@pytest.mark.parametrize("name", ["type8_8.npz", "isotonic_8.npz", "abstain_4.npz"])
def test_quantile_map_truncated(capsys, run, tmp_path, server, name):
    dst, args = copy_run(run, tmp_path, keep=CALIBRATED)
    path = next((dst / "calibrate" / "maps").glob(name))
    path.write_bytes(path.read_bytes()[:500])
    fails(capsys, "evaluate", *args, *llm_overrides(server.url), names=[path])


def test_results_json_without_conditions(capsys, tmp_path):
    path = tmp_path / "evaluate" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"sentences": 6, "latents": []}))
    fails(capsys, "report", f"run_dir={tmp_path}", names=[path, "conditions"])


# ----------------------------------------------------------------------- LLM server answers

SCORABLE = ("activations", "sparse", "examples", "explain")


def test_server_answers_garbage_json(capsys, run, tmp_path, server):
    server.completions = "garbage"
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[server.url, "malformed"])


def test_server_answers_http_500_exits_75_from_a_real_process(run, tmp_path, server):
    """A server that keeps failing past the retry budget is a service unavailable: 75, retry later."""
    server.completions = "http500"
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails_as_a_process("score", CFG, *args, *llm_overrides(server.url), names=[server.url, "HTTP 500"], status=75)


def test_server_refuses_a_prompt_http_400(capsys, run, tmp_path, server):
    server.completions = "http400"
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[server.url, "HTTP 400", "maximum context"])


def test_server_answers_without_logprobs(capsys, run, tmp_path, server):
    server.completions = "no_logprobs"
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[server.url, "top_logprobs"])


def test_server_serves_another_model(capsys, run, tmp_path, server):
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), "llm.served_model=Llama-3.1-8B-Instruct",
          names=[server.url, "llm.served_model 'Llama-3.1-8B-Instruct'", FakeLLMServer.MODEL])


def test_server_models_list_is_garbage(capsys, run, tmp_path, server):
    server.models = "garbage"
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[server.url, "/models"])


def test_server_url_without_the_api(capsys, run, tmp_path, server):
    server.models = "http404"  # e.g. http://host:8000 where http://host:8000/v1 was meant
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(server.url), names=[server.url, "HTTP 404"])


def test_nothing_listens_on_the_endpoint(capsys, run, tmp_path):
    url = dead_url()
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, *llm_overrides(url), names=[url, "no LLM endpoint reachable"], status=75)


def test_openai_backend_without_endpoints(capsys, run, tmp_path):
    _, args = copy_run(run, tmp_path, keep=SCORABLE)
    fails(capsys, "score", *args, "llm.backend=openai", names=["llm.endpoints"])
