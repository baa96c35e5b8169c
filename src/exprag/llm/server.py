"""A small OpenAI-compatible HTTP server around any :class:`~exprag.llm.base.ChatModel`.

Endpoints: ``POST /v1/chat/completions`` (non-streaming, greedy whatever the temperature, ``n=1``),
``GET /v1/models``, ``GET /health``. Requests arriving together are batched: handler threads queue
them and one worker thread calls ``model.generate`` on up to ``max_batch_size`` of them at a time,
so concurrent clients share decoding steps. A non-standard ``session_id`` body field is passed on
to the model as its session id (KV reuse in the transformers backend). Binds loopback by default.

LoRA adapters (as vLLM serves them): a request whose ``model`` names an adapter added with
``adapters={NAME: DIR}`` (``exprag serve --lora-modules NAME=DIR``) runs with that adapter on the one
loaded base model; any other name gets the base model. ``GET /v1/models`` lists the base model and
the adapters; with ``runtime_lora=True`` clients may add adapters with ``POST /v1/load_lora_adapter``
(``{"lora_name": NAME, "lora_path": DIR}``, vLLM's runtime LoRA API), which is how an experiment's
freshly trained adapters reach an already running server (exprag.llm.adapters).

Access: with an ``api_key`` every route but ``/health`` needs ``Authorization: Bearer KEY`` (what
OpenAI clients send) and answers 401 otherwise. Without a key the server refuses to bind a
non-loopback address (anyone on the network could use the model), unless ``insecure=True``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from exprag.llm.base import DEFAULT_MAX_NEW_TOKENS, ChatModel, Conversation, Generation, ServerError

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20
MAX_TOKENS_CAP = 8192


class BadRequest(Exception):
    pass


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one ("0.0.0.0" and "" bind everything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:  # a host name: what it resolves to decides
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


@dataclass
class _Job:
    conversation: Conversation
    max_tokens: int
    stop: tuple[str, ...]
    session_id: str | None
    adapter: str | None = None  # a LoRA adapter's served name; None = the base model
    future: Future = field(default_factory=Future)


class ChatServer:
    """Serve ``model`` at ``http://host:port/v1``. ``port=0`` picks a free port (see ``.port``).
    Use ``start()`` for a background thread or ``serve_forever()`` to block; ``shutdown()`` stops."""

    def __init__(
        self,
        model: ChatModel,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch_size: int = 8,
        batch_wait: float = 0.005,
        default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        api_key: str | None = None,
        insecure: bool = False,
        adapters: dict[str, str] | None = None,
        runtime_lora: bool = False,
    ) -> None:
        if not api_key and not insecure and not is_loopback(host):
            self.refuse_open_bind(host, port)
        self.api_key = api_key or None
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait = batch_wait
        self.default_max_tokens = default_max_tokens
        self.runtime_lora = runtime_lora
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._threads: list[threading.Thread] = []
        self._worker = threading.Thread(target=self._work, name="exprag-batcher", daemon=True)
        self._worker.start()

    @staticmethod
    def refuse_open_bind(host: str, port: int) -> None:
        raise ServerError(
            f"refusing to serve on {host}:{port} without an API key: anyone who can reach it could use the "
            "model. Set EXPRAG_API_KEY (or --api-key), bind 127.0.0.1, or pass --insecure"
        )

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "adapters", {}) or {})

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at ``path`` as model ``name`` (a ModelError when it does not fit)."""
        load = getattr(self.model, "load_adapter", None)
        if load is None:
            raise ServerError(f"{type(self.model).__name__} cannot apply LoRA adapters")
        load(name, path)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "ChatServer":
        t = threading.Thread(target=self._httpd.serve_forever, name="exprag-http", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        if self._threads:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._jobs.put(None)
        self._worker.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- batching worker ---------------------------------------------------------------------------
    def submit(self, job: _Job) -> Generation:
        self._jobs.put(job)
        return job.future.result()

    def _work(self) -> None:
        backlog: list[_Job] = []  # taken from the queue, not yet run
        closing = False
        while not closing:
            if not backlog:
                job = self._jobs.get()
                if job is None:
                    break
                backlog.append(job)
            # Gather what is queued, or arrives within batch_wait, before running a batch.
            deadline = time.monotonic() + self.batch_wait
            while len(backlog) < self.max_batch_size:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                backlog.append(job)
            batch, backlog = self._pick(backlog)
            self._run(batch)
        for job in backlog:
            job.future.set_exception(ServerError("server shutting down"))

    def _pick(self, backlog: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The oldest job plus later ones with the same settings and distinct session ids."""
        key = (backlog[0].max_tokens, backlog[0].stop, backlog[0].adapter)
        batch: list[_Job] = []
        rest: list[_Job] = []
        seen: set[str] = set()
        for job in backlog:
            fits = (job.max_tokens, job.stop, job.adapter) == key and (
                job.session_id is None or job.session_id not in seen)
            if fits and len(batch) < self.max_batch_size:
                batch.append(job)
                if job.session_id is not None:
                    seen.add(job.session_id)
            else:
                rest.append(job)
        return batch, rest

    def _run(self, batch: list[_Job]) -> None:
        # Only a model with adapters takes the adapter argument (any ChatModel can be served).
        lora = {"adapter": batch[0].adapter} if batch[0].adapter is not None else {}
        try:
            outs = self.model.generate(
                [j.conversation for j in batch],
                max_new_tokens=batch[0].max_tokens,
                stop=list(batch[0].stop) or None,
                session_ids=[j.session_id for j in batch],
                **lora,
            )
        except Exception as e:  # reported to every waiting request as a 500
            log.exception("generation failed")
            for j in batch:
                j.future.set_exception(e)
            return
        for j, g in zip(batch, outs):
            j.future.set_result(g)


# ---- HTTP ----------------------------------------------------------------------------------------
def parse_request(body: Any, default_max_tokens: int) -> _Job:
    """Validate an OpenAI chat-completions request body; raises BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("streaming is not supported")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    conv: Conversation = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        conv.append({"role": role, "content": content})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise BadRequest(f"'max_tokens' must be an integer in 1..{MAX_TOKENS_CAP}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    sid = body.get("session_id")
    if sid is not None and not isinstance(sid, str):
        raise BadRequest("'session_id' must be a string")
    return _Job(conv, max_tokens, tuple(s for s in stop if s), sid)


def completion_body(model_name: str, g: Generation) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
        ],
        "usage": {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": g.prompt_tokens - g.prefill_tokens},
        },
    }


def _handler_for(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "exprag"

        def log_message(self, format: str, *args: Any) -> None:  # the library never prints
            log.debug("%s " + format, self.address_string(), *args)

        def _authorized(self) -> bool:
            """No key configured, or the request's bearer token matches it (constant-time compare)."""
            if server.api_key is None:
                return True
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
                return True
            # Read (and drop) a refused POST's body first: a client still sending it would see the
            # connection reset instead of the 401.
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= MAX_BODY:
                self.rfile.read(length)
            self._send(401, {"error": {"message": "missing or wrong API key (send Authorization: Bearer KEY)",
                                       "type": "invalid_request_error", "code": 401}},
                       {"WWW-Authenticate": "Bearer", "Connection": "close"})
            return False

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path != "/health" and not self._authorized():
                return
            if path in ("/v1/models", "/models"):
                base = server.model.name
                self._send(200, {"object": "list", "data": [
                    {"id": base, "object": "model", "created": 0, "owned_by": "exprag"},
                    *({"id": a, "object": "model", "created": 0, "owned_by": "exprag", "parent": base}
                      for a in server.adapters),
                ]})
            elif path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {path}", "not_found")

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if not self._authorized():
                return
            if path in ("/v1/load_lora_adapter", "/load_lora_adapter"):
                self._load_lora()
                return
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route POST {path}", "not_found")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise BadRequest("request body too large")
                body = json.loads(self.rfile.read(length) or b"null")
                job = parse_request(body, server.default_max_tokens)
                if body.get("model") in server.adapters:
                    job.adapter = body["model"]
            except (BadRequest, ValueError) as e:
                self._error(400, str(e) if isinstance(e, BadRequest) else f"invalid JSON: {e}")
                return
            try:
                g = server.submit(job)
            except Exception as e:
                self._error(500, f"{type(e).__name__}: {e}", "server_error")
                return
            self._send(200, completion_body(server.model.name, g))

        def _load_lora(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(min(length, MAX_BODY)) or b"null")
                name, path = body["lora_name"], body["lora_path"]
                if not (isinstance(name, str) and name and isinstance(path, str) and path):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                self._error(400, "expected {\"lora_name\": NAME, \"lora_path\": DIR}")
                return
            if not server.runtime_lora:
                self._error(404, "runtime LoRA loading is off (start the server with --runtime-lora)", "not_found")
                return
            try:
                server.load_adapter(name, path)
            except Exception as e:  # an adapter that is missing or does not fit the model
                self._error(400, f"{type(e).__name__}: {e}")
                return
            log.info("loaded LoRA adapter %s from %s", name, path)
            self._send(200, {"status": "ok", "lora_name": name})

        def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(code, {"error": {"message": message, "type": kind, "code": code}})

        def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
