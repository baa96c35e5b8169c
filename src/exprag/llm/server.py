"""A small OpenAI-compatible HTTP server around any :class:`~exprag.llm.base.ChatModel`.

Endpoints: ``POST /v1/chat/completions`` (non-streaming, greedy whatever the temperature, ``n=1``),
``GET /v1/models``, ``GET /health``. Requests arriving together are batched: they queue, and one
worker thread calls ``model.generate`` on up to ``max_batch_size`` of them at a time, so concurrent
clients share decoding steps. A non-standard ``session_id`` body field is passed on to the model as
its session id (KV reuse in the transformers backend). Binds loopback by default.

The HTTP layer is Starlette on uvicorn (the ASGI stack vLLM's server uses): one event loop holds
every connection, so a stalled client costs a socket, not a thread. Limits a hostile or careless
client meets: the key is checked before any body is read; a body is read in chunks and cut at
``MAX_BODY`` however it arrives (Content-Length or chunked), and within ``BODY_TIMEOUT`` seconds;
at most ``max_queue`` requests wait for the model (503 beyond, with Retry-After); a prompt longer
than the model's context is refused (400 naming the limit) before it reaches the model; every error
is a JSON body ``{"error": {"message", "type", "code"}}``.

LoRA adapters (as vLLM serves them): a request whose ``model`` names an adapter added with
``adapters={NAME: DIR}`` (``exprag serve --lora-modules NAME=DIR``) runs with that adapter on the one
loaded base model; any other name gets the base model. ``GET /v1/models`` lists the base model and
the adapters; with ``runtime_lora=True`` clients may add adapters with ``POST /v1/load_lora_adapter``
(``{"lora_name": NAME, "lora_path": DIR}``, vLLM's runtime LoRA API), which is how an experiment's
freshly trained adapters reach an already running server (exprag.llm.adapters). A name already
served (the base model's, or another adapter's) is refused, so no client can make other clients'
requests run its adapter; at most ``max_loras`` adapters are loaded.

Access: with an ``api_key`` every route but ``/health`` needs ``Authorization: Bearer KEY`` (what
OpenAI clients send) and answers 401 otherwise. Without a key the server refuses to bind a
non-loopback address (anyone on the network could use the model), unless ``insecure=True``.
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Callable, Sequence

from exprag.llm.base import DEFAULT_MAX_NEW_TOKENS, ChatModel, Conversation, Generation, ServerError

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20
MAX_TOKENS_CAP = 8192
BODY_TIMEOUT = 30.0  # seconds to receive a whole body once its headers are in
DEFAULT_MAX_QUEUE = 256  # requests waiting for the model, beyond which clients are told to come back
DEFAULT_MAX_LORAS = 16


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
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_body: int = MAX_BODY,
        body_timeout: float = BODY_TIMEOUT,
        upstream: str | None = None,
        upstream_api_key: str | None = None,
        rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        routes: Sequence[Any] = (),
    ) -> None:
        """``upstream``: forward chat requests to that OpenAI-compatible server (``http://HOST:PORT/v1``,
        e.g. vLLM) instead of a local ``model`` (then None); streaming passes through. ``rewrite``: a
        function of the request body run before it is answered or forwarded (the memory proxy puts
        the memory block into the system prompt; it may raise BadRequest). ``routes``: more Starlette
        routes, behind the same key check."""
        if not api_key and not insecure and not is_loopback(host):
            self.refuse_open_bind(host, port)
        if (model is None) == (upstream is None):
            raise ServerError("serve a local model or forward to an upstream server: exactly one of the two")
        self.api_key = api_key or None
        self.model = model if model is not None else _UpstreamModel(upstream, upstream_api_key)
        self.upstream = self.model if upstream is not None else None
        self.rewrite = rewrite
        self.extra_routes = list(routes)
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait = batch_wait
        self.default_max_tokens = default_max_tokens
        self.runtime_lora = runtime_lora
        self.max_queue = max(1, max_queue)
        self.max_loras = max(0, max_loras)
        self.max_body, self.body_timeout = max_body, body_timeout
        self._adapter_lock = threading.Lock()
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting = 0  # requests queued or running; bounded by max_queue
        self._count_lock = threading.Lock()
        # The socket is bound here, so that a port in use fails the constructor and port=0 is known.
        try:
            family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host.strip("[]"), port))
            self._sock.listen(128)
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self._http = self._uvicorn()
        self._threads: list[threading.Thread] = []
        self._worker = threading.Thread(target=self._work, name="exprag-batcher", daemon=True)
        self._worker.start()

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(
            _app(self), log_level="warning", access_log=False, lifespan="off", http="h11",
            timeout_keep_alive=5,  # an idle kept-alive connection is closed after this
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=64 * 1024,  # header block cap: a client cannot grow it forever
        )
        return uvicorn.Server(config)

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
        """Serve the LoRA adapter at ``path`` as model ``name`` (a ModelError when it does not fit). A
        name the server already answers to is refused: loading an adapter under the base model's
        name would make every client's base-model requests run it."""
        load = getattr(self.model, "load_adapter", None)
        if load is None:
            raise ServerError(f"{type(self.model).__name__} cannot apply LoRA adapters")
        with self._adapter_lock:
            if name == self.model.name:
                raise ServerError(f"adapter name {name!r} is the served base model's name; choose another")
            if name in self.adapters:
                raise ServerError(f"an adapter named {name!r} is already served; choose another name")
            if len(self.adapters) >= self.max_loras:
                raise ServerError(f"{len(self.adapters)} adapters are loaded, the most this server holds "
                                  f"(max_loras {self.max_loras})")
            load(name, path)

    def check_context(self, job: _Job) -> None:
        """A prompt that cannot fit the model's context is refused here, not after its prefill has
        held up every other request: 400 with the numbers. Models that cannot count tokens pass."""
        limit = getattr(self.model, "context_length", None)
        encode = getattr(self.model, "encode", None)
        if not limit or encode is None:
            return
        n = len(encode(job.conversation))
        if n + job.max_tokens > limit:
            raise HTTPError(400, f"the prompt is {n} tokens; with max_tokens {job.max_tokens} it exceeds the "
                                 f"model's context of {limit} tokens")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "ChatServer":
        t = threading.Thread(target=self._http.run, kwargs={"sockets": [self._sock]}, name="exprag-http",
                             daemon=True)
        t.start()
        self._threads.append(t)
        deadline = time.monotonic() + 30
        while not self._http.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._http.started:
            raise ServerError(f"the HTTP server on {self.host}:{self.port} did not start")
        return self

    def serve_forever(self) -> None:
        """Block until SIGINT / SIGTERM (uvicorn's own handlers end it gracefully) or ``shutdown()``."""
        self._http.run(sockets=[self._sock])

    def shutdown(self) -> None:
        self._http.should_exit = True
        for t in self._threads:
            t.join(timeout=10)
        self._sock.close()
        self._jobs.put(None)
        self._worker.join(timeout=5)

    def __enter__(self) -> "ChatServer":
        return self.start() if not self._threads else self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def enqueue(self, job: _Job) -> Future:
        """Queue ``job`` for the batching worker; 503 when ``max_queue`` requests already wait."""
        with self._count_lock:
            if self._waiting >= self.max_queue:
                raise HTTPError(503, f"the server is busy ({self._waiting} requests queued); retry later",
                                "server_error", {"Retry-After": "1"})
            self._waiting += 1

        def done(_: Future) -> None:
            with self._count_lock:
                self._waiting -= 1

        job.future.add_done_callback(done)
        self._jobs.put(job)
        return job.future

    def submit(self, job: _Job) -> Generation:
        """Run ``job`` and wait for its reply (in-process callers)."""
        return self.enqueue(job).result()

    # ---- batching worker ---------------------------------------------------------------------------
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
def message_text(content: Any, where: str) -> str:
    """A message's text: its string content, or the text parts of a content-part list (others, e.g.
    images, are left out); BadRequest naming ``where`` for anything else."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"{where}.content[{j}] must be an object with a 'type'")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.content[{j}].text must be a string")
                texts.append(part["text"])
        return "".join(texts)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string")
    return content


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
        conv.append({"role": role, "content": message_text(m.get("content"), f"messages[{i}]")})
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


class HTTPError(Exception):
    """An answer other than 200: its code, message and OpenAI error type."""

    def __init__(self, code: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.kind, self.headers = code, message, kind, headers or {}


def _error_response(e: HTTPError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.code}}, e.code,
                        headers=e.headers)


async def read_json_body(request: Any, limit: int = MAX_BODY, timeout: float = BODY_TIMEOUT) -> Any:
    """The request's JSON body, read in chunks: cut at ``limit`` bytes whether it came with a
    Content-Length or chunked, and within ``timeout`` seconds (a client that stalls mid-body)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HTTPError(413, f"request body too large (limit {limit} bytes)")

    async def read() -> bytes:
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body too large (limit {limit} bytes)")
            parts.append(chunk)
        return b"".join(parts)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout:g} s") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid JSON: the body is not UTF-8 text") from None
    try:
        return json.loads(text or "null")
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise HTTPError(400, "invalid JSON: nested too deeply") from None


def _app(server: ChatServer):
    """The Starlette application of ``server``: routes, key check before the body, JSON errors."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def authorize(request: Any) -> None:
        if server.api_key is None:
            return
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), server.api_key.encode())):
            raise HTTPError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                            headers={"WWW-Authenticate": "Bearer", "Connection": "close"})

    def guarded(handler, public: bool = False):
        async def endpoint(request: Any):
            try:
                if not public:
                    authorize(request)  # before a byte of the body is read
                return await handler(request)
            except HTTPError as e:
                return _error_response(e)
            except ClientDisconnect:  # the client hung up: nobody to answer, nothing to report
                log.debug("client disconnected: %s %s", request.method, request.url.path)
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - a bug answers 500 in JSON, never a dropped connection
                log.exception("request failed")
                return _error_response(HTTPError(500, f"{type(e).__name__}: {e}", "server_error"))
        return endpoint

    async def health(request: Any):
        return JSONResponse({"status": "ok"})

    async def models(request: Any):
        if server.upstream is not None:
            return await server.upstream.models()
        base = server.model.name
        return JSONResponse({"object": "list", "data": [
            {"id": base, "object": "model", "created": 0, "owned_by": "exprag"},
            *({"id": a, "object": "model", "created": 0, "owned_by": "exprag", "parent": base}
              for a in server.adapters),
        ]})

    async def chat(request: Any):
        body = await read_json_body(request, server.max_body, server.body_timeout)
        try:
            if server.rewrite is not None:
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                body = await asyncio.to_thread(server.rewrite, body)
            if server.upstream is not None:
                return await server.upstream.forward(body)
            job = parse_request(body, server.default_max_tokens)
        except BadRequest as e:
            raise HTTPError(400, str(e)) from None
        if body.get("model") in server.adapters:
            job.adapter = body["model"]
        await asyncio.to_thread(server.check_context, job)
        g = await asyncio.wrap_future(server.enqueue(job))
        return JSONResponse(completion_body(server.model.name, g))

    async def load_lora(request: Any):
        body = await read_json_body(request, min(server.max_body, 1 << 16), server.body_timeout)
        name = body.get("lora_name") if isinstance(body, dict) else None
        path = body.get("lora_path") if isinstance(body, dict) else None
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise HTTPError(400, 'expected {"lora_name": NAME, "lora_path": DIR}')
        if not server.runtime_lora:
            raise HTTPError(404, "runtime LoRA loading is off (start the server with --runtime-lora)", "not_found")
        try:
            await asyncio.to_thread(server.load_adapter, name, path)
        except ServerError as e:
            raise HTTPError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - an adapter that is missing or does not fit the model
            raise HTTPError(400, f"{type(e).__name__}: {e}") from None
        log.info("loaded LoRA adapter %s from %s", name, path)
        return JSONResponse({"status": "ok", "lora_name": name})

    routes = [Route("/health", guarded(health, public=True), methods=["GET"])]
    routes += [Route(r.path, guarded(r.endpoint), methods=r.methods) for r in server.extra_routes]
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/models", guarded(models), methods=["GET"]),
                   Route(f"{prefix}/chat/completions", guarded(chat), methods=["POST"]),
                   Route(f"{prefix}/load_lora_adapter", guarded(load_lora), methods=["POST"])]

    async def http_error(request: Any, exc: HTTPException):  # unknown route or method, in JSON too
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        what = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return _error_response(HTTPError(exc.status_code, what, kind))

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


class _UpstreamModel:
    """The model behind an upstream OpenAI-compatible server: requests are forwarded as they are
    (after the server's ``rewrite``), answers and streams come back unchanged."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        from exprag.llm.openai_client import chat_completions_url

        if not url.startswith(("http://", "https://")):
            raise ServerError(f"--upstream must be http://HOST:PORT/v1, got {url!r}")
        self.chat_url = chat_completions_url(url)
        self.base_url = self.chat_url.rsplit("/chat/completions", 1)[0]
        self.name = f"upstream {self.base_url}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self._client = None

    def client(self):
        import httpx

        if self._client is None:  # one pool of connections, made in the server's event loop
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        return self._client

    async def _send(self, method: str, url: str, body: Any = None, stream: bool = False):
        import httpx

        try:
            req = self.client().build_request(method, url, json=body)
            return await self.client().send(req, stream=stream)
        except httpx.HTTPError as e:
            raise HTTPError(502, f"upstream {url}: {type(e).__name__}: {e or 'no answer'}", "server_error") from None

    async def forward(self, body: dict[str, Any]):
        from starlette.background import BackgroundTask
        from starlette.responses import Response, StreamingResponse

        stream = bool(body.get("stream"))
        resp = await self._send("POST", self.chat_url, body, stream=stream)
        media = resp.headers.get("content-type", "application/json")
        if stream:
            return StreamingResponse(resp.aiter_raw(), resp.status_code, media_type=media,
                                     background=BackgroundTask(resp.aclose))
        return Response(resp.content, resp.status_code, media_type=media)

    async def models(self):
        from starlette.responses import Response

        resp = await self._send("GET", self.base_url + "/models")
        return Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"))
