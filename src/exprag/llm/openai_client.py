"""A :class:`~exprag.llm.base.ChatModel` over any OpenAI-compatible ``/v1/chat/completions`` server
(vLLM, llama.cpp server, ``exprag serve``), standard library only.

Conversations of a batch are sent concurrently (at most ``concurrency`` requests in flight, 8 by
default; ``eval --concurrency``), so a server that batches (vLLM, ``exprag serve``) sees them
together. A LoRA adapter is a model of its own on the server (see :mod:`exprag.llm.adapters`). Connection failures, 429 and 5xx
answers are retried with exponential backoff (``Retry-After`` honoured); a request that timed out is
retried once only (a server that accepts and never answers would otherwise cost every retry a full
timeout); other 4xx answers fail at once. Either way the error is a
:class:`~exprag.llm.base.ServerError` naming the URL. The API key (``api_key``, else
``$OPENAI_API_KEY``, else ``$EXPRAG_API_KEY``, the variable ``exprag serve`` reads) goes out as a
bearer token.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from exprag.llm.base import (
    DEFAULT_MAX_NEW_TOKENS,
    Conversation,
    Generation,
    ServerError,
    check_batch,
)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# Seconds per request: a 32-token action reply takes well under that even on a busy GPU server;
# CPU-served large models may need more (--request-timeout).
DEFAULT_TIMEOUT = 60.0
DEFAULT_CONCURRENCY = 8
_TIMEOUT_RETRIES = 1


class _Fatal(Exception):
    """An answer that retrying cannot fix (a 4xx other than 408/409/429, or malformed JSON)."""


def chat_completions_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or the full endpoint -> the chat-completions endpoint."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIChatModel:
    """Client for an OpenAI-compatible server. ``model`` is the server's model name; greedy
    (``temperature=0``). ``timeout`` bounds each request (seconds); a request is tried
    ``1 + max_retries`` times (twice at most when it timed out), waiting ``backoff * 2**i`` (capped at ``max_backoff``, with jitter)
    between tries. ``send_session_ids`` adds a non-standard ``session_id`` field that
    ``exprag serve`` uses for KV reuse (off by default: strict servers reject unknown fields)."""

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        send_session_ids: bool = False,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url:
            raise ServerError("the openai backend needs a base URL (e.g. --base-url http://127.0.0.1:8000/v1)")
        self.name = model
        self.url = chat_completions_url(base_url)
        self.base_url = self.url[: -len("/chat/completions")]  # .../v1
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ServerError(f"invalid server URL {base_url!r} (expected http://HOST:PORT/v1)")
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY") or os.environ.get("EXPRAG_API_KEY")
        self.api_key = api_key
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ServerError(f"request timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = max(1, concurrency)
        self.send_session_ids = send_session_ids
        self.extra_body = dict(extra_body or {})
        # A proxy from the environment must never see loopback traffic.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop: Sequence[str] | None = None,
        session_ids: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        sids = check_batch(conversations, session_ids)
        start = time.perf_counter()
        bodies = [self._body(c, max_new_tokens, stop, sid) for c, sid in zip(conversations, sids)]
        if len(bodies) <= 1:
            answers = [self._post(b) for b in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
                answers = list(pool.map(self._post, bodies))
        seconds = time.perf_counter() - start
        return [self._generation(a, seconds) for a in answers]

    def end_session(self, session_id: str) -> None:
        """Stateless client: the server evicts old sessions itself."""

    # ---- model list and runtime LoRA loading (exprag.llm.adapters) --------------------------------
    def list_models(self) -> list[str]:
        """The model names the server lists at ``GET /v1/models`` (adapters included)."""
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers(), method="GET")
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
            return [str(m["id"]) for m in data["data"]]
        except urllib.error.HTTPError as e:
            raise ServerError(f"{self.base_url}/models: HTTP {e.code}: {_error_text(e)}") from None
        except (OSError, http.client.HTTPException) as e:
            raise ServerError(f"{self.base_url}/models: {e}. Is the server running?") from None
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.base_url}/models: malformed answer (not an OpenAI model list)") from None

    def load_lora_adapter(self, name: str, path: str) -> str | None:
        """Ask the server to load an adapter (vLLM's runtime LoRA API); None when it accepted, else why not."""
        data = json.dumps({"lora_name": name, "lora_path": path}).encode()
        headers = {**self._headers(), "Content-Type": "application/json"}
        request = urllib.request.Request(self.base_url + "/load_lora_adapter", data=data, headers=headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=max(self.timeout, 300.0)) as resp:
                resp.read()
            return None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}: {_error_text(e)}"
        except (OSError, http.client.HTTPException) as e:
            return f"{type(e).__name__}: {e}"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    # ---- internals ---------------------------------------------------------------------------------
    def _body(
        self, conv: Conversation, max_new_tokens: int, stop: Sequence[str] | None, sid: str | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conv],
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "n": 1,
            "stream": False,
        }
        if stop:
            body["stop"] = list(stop)
        if sid is not None and self.send_session_ids:
            body["session_id"] = sid
        body.update(self.extra_body)
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {**self._headers(), "Content-Type": "application/json"}
        last = "no attempt"
        attempts = timeouts = 0
        while True:
            attempts += 1
            wait = None
            try:
                return self._once(data, headers)
            except _Fatal as e:
                raise ServerError(f"{self.url}: {e}") from None
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {_error_text(e)}"
                wait = _retry_after(e)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                timeouts += isinstance(reason, (socket.timeout, TimeoutError))
            if attempts > self.max_retries or timeouts > _TIMEOUT_RETRIES:
                break
            delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            time.sleep(min(self.max_backoff, wait) if wait is not None else delay)
        raise ServerError(
            f"OpenAI-compatible server at {self.url} failed after {attempts} attempts "
            f"(timeout {self.timeout:g}s each; last error: {last}). Is it running? Start one with "
            f"`exprag serve --model M --port P`, or check the base URL"
        )

    def _once(self, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code in _RETRY_STATUS:
                raise
            raise _Fatal(f"HTTP {e.code}: {_error_text(e)}") from None
        try:
            answer = json.loads(raw)
            answer["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Fatal(f"malformed answer (not an OpenAI chat completion): {raw[:200]!r}") from None
        return answer

    @staticmethod
    def _generation(answer: dict[str, Any], seconds: float) -> Generation:
        choice = answer["choices"][0]
        usage = answer.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        finish = choice.get("finish_reason") or "stop"
        return Generation(
            text=choice["message"].get("content") or "",
            prompt_tokens=prompt,
            prefill_tokens=max(0, prompt - cached),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            finish_reason="length" if finish == "length" else "stop",
        )


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()[:500]
    except OSError:
        return e.reason or ""
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err or raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace").strip() or str(e.reason)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
