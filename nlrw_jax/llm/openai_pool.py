"""The `openai` backend: an async client for a pool of OpenAI-compatible servers (vLLM's).

Each prompt (token ids, rendered client-side) goes to /v1/completions. Requests are spread
round-robin over `llm.endpoints` with at most `llm.max_concurrency` in flight. A connection
error, timeout, 429/5xx or a malformed body marks that endpoint down for a while (doubling
per consecutive failure; requests already in flight when it was marked down count as the same
failure) and the request is retried on the next live endpoint after a backoff;
after `llm.retries` retries the whole call fails with one line naming the prompt and the last
error: ServiceUnavailable (exit 75, rerun later) when every failure was the service not being
there (no connection, timeout, dropped connection, 429/5xx), UserError (exit 2) when a server
answered something wrong (malformed body, no log-probs) or refused the prompt (other 4xx, at
once, not retried). Each result is stored once, at its prompt's index, so nothing is lost or
counted twice however many attempts it took. Top log-probs are asked for keyed by token id (vLLM's
return_tokens_as_token_ids), falling back to token text for servers that ignore it. slot_logprobs
(simulate.mode=all_at_once) asks for vLLM's `prompt_logprobs` extension; a server that does not
return them is named, with the model, and simulate.mode=one_at_a_time suggested.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import TYPE_CHECKING

import httpx
import numpy as np

from nlrw_jax.errors import ServiceUnavailable, UserError
from nlrw_jax.llm.interface import Backend, check_slots
from nlrw_jax.llm.models import tokenizer_for

if TYPE_CHECKING:
    from nlrw_jax.config import LLMConfig

# What a busy, restarting or absent server gives: retried, and past the budget ServiceUnavailable.
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
UNAVAILABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)


class _Unavailable(Exception):
    """An attempt answered with a RETRYABLE_STATUS."""


class Endpoint:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.down_until = 0.0
        self.failures = 0
        self.marked_at = -math.inf  # when it was last marked down

    def fail(self, base_s: float, sent_at: float | None = None):
        """Mark it down; the down time doubles per consecutive failure, but the failures of requests
        already in flight when it was marked down are the same incident and do not escalate it
        (else 32 concurrent requests hitting one blip would take the endpoint out for 30 s)."""
        now = time.monotonic()
        if sent_at is not None and sent_at < self.marked_at:
            return
        self.failures += 1
        self.marked_at = now
        self.down_until = now + min(base_s * 2 ** (self.failures - 1), 30.0)

    def ok(self):
        self.failures, self.down_until = 0, 0.0


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, cfg: LLMConfig, progress: bool = True):
        if not cfg.endpoints:
            raise UserError("llm.backend=openai needs llm.endpoints: a list of base URLs like http://host:8000/v1")
        self.endpoints = [Endpoint(u) for u in cfg.endpoints]
        self.served = self._check_endpoints(cfg)
        super().__init__(cfg, tokenizer_for(cfg.model), progress)
        self._next = 0
        self.retries = 0  # requests sent again after a failure, over this backend's life

    def health(self) -> dict:
        now = time.monotonic()
        return {"retries": self.retries, "endpoints_up": sum(ep.down_until <= now for ep in self.endpoints),
                "endpoints": len(self.endpoints)}

    def _check_endpoints(self, cfg) -> str:
        """GET /models on every endpoint: fail fast naming them if none answers; return the model id.
        None usable is ServiceUnavailable if each was just not there (no connection, timeout, 5xx),
        else UserError: a bad URL or something that is not an OpenAI API needs fixing first."""
        errors, served, user_fault = [], None, False
        for ep in self.endpoints:
            try:
                r = httpx.get(f"{ep.url}/models", timeout=min(cfg.timeout_s, 10.0))
            except Exception as e:  # connection refused, timeout, bad URL
                ep.fail(cfg.backoff_s)
                errors.append(f"{ep.url} ({type(e).__name__})")
                user_fault |= not isinstance(e, UNAVAILABLE)
                continue
            if not 200 <= r.status_code < 300:
                ep.fail(cfg.backoff_s)
                hint = "; is the URL the API's base, like http://host:8000/v1?" if r.status_code == 404 else ""
                errors.append(f"{ep.url} (GET /models: HTTP {r.status_code}{hint})")
                user_fault |= r.status_code not in RETRYABLE_STATUS
                continue
            try:
                ids = [str(m["id"]) for m in r.json()["data"]]
                if not ids:
                    raise ValueError("no models")
            except (ValueError, KeyError, TypeError, IndexError) as e:
                ep.fail(cfg.backoff_s)
                errors.append(f"{ep.url} (GET /models: not an OpenAI model list: {type(e).__name__})")
                user_fault = True
                continue
            if cfg.served_model and cfg.served_model not in ids:
                raise UserError(_one_line(f"llm.served_model {cfg.served_model!r} is not served by {ep.url} "
                                          f"(it serves {ids})"))
            served = served or (cfg.served_model or ids[0])
        if served is None:
            error = UserError if user_fault else ServiceUnavailable
            raise error(_one_line(f"no LLM endpoint reachable: {', '.join(errors)}"))
        return served

    # ------------------------------------------------------------------------------- requests
    def _pick(self) -> Endpoint:
        now = time.monotonic()
        n = len(self.endpoints)
        for i in range(n):
            ep = self.endpoints[(self._next + i) % n]
            if ep.down_until <= now:
                self._next = (self._next + i + 1) % n
                return ep
        return min(self.endpoints, key=lambda e: e.down_until)  # all down: the one back soonest

    async def _request(self, client, body: dict, index: int) -> dict:
        cfg = self.cfg
        last, wrong = "no attempt", None  # wrong: the last malformed answer (a server up but broken)
        for attempt in range(cfg.retries + 1):
            ep = self._pick()
            wait = ep.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            sent_at = time.monotonic()
            try:
                r = await client.post(f"{ep.url}/completions", json={**body, "model": self.served},
                                      timeout=cfg.timeout_s)
                if r.status_code in RETRYABLE_STATUS:
                    raise _Unavailable(f"HTTP {r.status_code} from {ep.url}")
                if r.status_code >= 400:
                    hint = _NO_PROMPT_LOGPROBS.format(url=ep.url, model=self.served) \
                        if "prompt_logprobs" in body and "prompt_logprobs" in r.text else ""
                    raise UserError(_one_line(f"{ep.url} refused prompt {index}: HTTP {r.status_code}: "
                                              f"{r.text[:200]}{hint}"))
                choice = _parse(r.content, need_top="logprobs" in body,
                                prompt_len=len(body["prompt"]) if "prompt_logprobs" in body else None)
                ep.ok()
                return choice
            except (httpx.RequestError, _Unavailable, ValueError) as e:  # RequestError: transport, timeout, decoding
                last = str(e) if isinstance(e, _Unavailable) else (
                    f"{type(e).__name__} from {ep.url}" + (f": {e}" if str(e) else ""))
                if not isinstance(e, (_Unavailable, *UNAVAILABLE)):
                    wrong = last
                ep.fail(cfg.backoff_s, sent_at)
                if attempt < cfg.retries:
                    self.retries += 1
                    await asyncio.sleep(cfg.backoff_s * (2 ** attempt) * (0.5 + random.random()))
        tried = f"prompt {index} failed after {cfg.retries} retries over {', '.join(ep.url for ep in self.endpoints)}"
        if wrong:  # a server that answers wrongly will not mend itself by a rerun
            hint = _NO_PROMPT_LOGPROBS.format(url=ep.url, model=self.served) if _NO_PLP in wrong else ""
            raise UserError(_one_line(f"{tried}; a server answered wrongly: {wrong}{hint}"))
        raise ServiceUnavailable(_one_line(f"LLM service unavailable: {tried}; last error: {last}"))

    async def _all(self, bodies: list[dict], bar) -> list[dict]:
        results: list[dict | None] = [None] * len(bodies)
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        bar, own = self._bar(bar, len(bodies), "requests")
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(limits=limits) as client:
            async def one(i):
                async with sem:
                    res = await self._request(client, bodies[i], i)
                if results[i] is not None:  # an invariant, checked: each index is written once
                    raise RuntimeError(f"prompt {i} answered twice")
                results[i] = res
                bar.update(1)

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(bodies))]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)  # let them finish cancelling
        if own:  # on failure it stays open: the CLI erases it before printing the error
            bar.close()
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"prompts {missing[:5]} got no answer")
        return results

    def _run(self, bodies, bar):
        return asyncio.run(self._all(bodies, bar))

    # -------------------------------------------------------------------------------- the API
    def next_token_logprobs(self, prompts, candidates, bar=None):
        ids = self.candidate_ids(candidates)  # a clear error if a candidate is not one token
        # return_tokens_as_token_ids (a vLLM extension; other servers ignore it) keys the top log-probs
        # by token id ("token_id:53"), so two tokens that decode to the same text cannot be confused.
        bodies = [{"prompt": p, "max_tokens": 1, "temperature": 0.0, "logprobs": self.cfg.top_logprobs,
                   "return_tokens_as_token_ids": True} for p in prompts]
        out = np.full((len(prompts), len(candidates)), -np.inf, np.float32)
        for i, choice in enumerate(self._run(bodies, bar)):
            top = choice["top"]
            by_id = any(k.startswith(_TOKEN_ID) for k in top)
            for j, (c, t) in enumerate(zip(candidates, ids)):
                key = f"{_TOKEN_ID}{t}" if by_id else c
                if key in top:
                    out[i, j] = top[key]
        return out

    def slot_logprobs(self, prompts, slots, candidates, bar=None):
        check_slots(prompts, slots)
        ids = self.candidate_ids(candidates)
        n = self.cfg.top_logprobs
        # prompt_logprobs (vLLM): per prompt position, the top n and the prompt's own token, by token id
        bodies = [{"prompt": p, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": n} for p in prompts]
        result = []
        for choice, s in zip(self._run(bodies, bar), slots):
            out = np.full((len(s), len(candidates)), -np.inf, np.float32)
            for i, slot in enumerate(s):
                top = choice["prompt"][slot + 1] or {}
                for j, t in enumerate(ids):
                    got = top.get(str(t))
                    if got is not None and got[1] <= n:
                        out[i, j] = got[0]
            result.append(out)
        return result

    def generate(self, prompts, max_tokens, bar=None):
        bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0.0} for p in prompts]
        return [c["text"] for c in self._run(bodies, bar)]


_TOKEN_ID = "token_id:"
_NO_PLP = "no prompt_logprobs"
_NO_PROMPT_LOGPROBS = ("; {url} (model {model}) cannot return prompt log-probs (vLLM's prompt_logprobs), which "
                       "simulate.mode=all_at_once needs: serve the model with vLLM, or use simulate.mode=one_at_a_time")


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _parse(content: bytes, need_top: bool, prompt_len: int | None = None) -> dict:
    """{'text', 'top': {token: logprob}, 'prompt': [None | {token id: (logprob, rank)}] (when prompt_len
    is given: vLLM's prompt_logprobs, one entry per prompt token)} from a completions body; ValueError
    if malformed."""
    try:
        body = json.loads(content)
        choice = body["choices"][0]
        text = choice["text"]
        if not isinstance(text, str):
            raise ValueError("text is not a string")
        top = {}
        lp = choice.get("logprobs")
        if lp and lp.get("top_logprobs"):
            top = {str(k): float(v) for k, v in lp["top_logprobs"][0].items()}
            if any(math.isnan(v) for v in top.values()):
                raise ValueError("NaN log-prob")
        elif need_top:
            raise ValueError("no top_logprobs in the answer")
        prompt = None
        if prompt_len is not None:
            raw = choice.get("prompt_logprobs")
            if not isinstance(raw, list):
                raise ValueError(f"{_NO_PLP} in the answer")
            if len(raw) != prompt_len:
                raise ValueError(f"{len(raw)} prompt_logprobs for a {prompt_len}-token prompt")
            prompt = [None if e is None else {str(k): (float(v["logprob"]), int(v["rank"])) for k, v in e.items()}
                      for e in raw]
            if any(math.isnan(v[0]) for e in prompt if e for v in e.values()):
                raise ValueError("NaN log-prob")
    except (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed completions body ({type(e).__name__})") from None
    return {"text": text, "top": top, "prompt": prompt}
