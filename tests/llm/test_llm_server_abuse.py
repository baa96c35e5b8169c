"""`exprag serve` against hostile and careless clients, on loopback only, bounded in count and time:
stalled connections, bodies too large (declared or chunked), bodies withheld, malformed bodies,
prompts longer than the model's context, a full queue, adapter names that would shadow served ones,
and clients that hang up. Throughout, the server stays alive and answers /health."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from exprag.llm.server import ChatServer


def _request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             method: str | None = None) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def _chat(url: str, **body) -> tuple[int, dict, Any]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    return _request(url + "/chat/completions", json.dumps(body).encode())


def _health(srv: ChatServer) -> None:
    t0 = time.perf_counter()
    with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health", timeout=5) as r:
        assert r.status == 200
    assert time.perf_counter() - t0 < 2


def _raw(srv: ChatServer, data: bytes, read: bool = True) -> bytes:
    s = socket.create_connection((srv.host, srv.port), timeout=20)
    try:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def _error_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    code = int(head.split()[1])
    if b"transfer-encoding: chunked" in head.lower():  # one chunk is all these small replies hold
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return code, json.loads(body)


@pytest.fixture
def srv(tiny):
    with ChatServer(tiny, port=0, max_batch_size=2, max_body=1 << 16, body_timeout=1.0, runtime_lora=True,
                    max_loras=1) as server:
        yield server


def test_stalled_clients_do_not_pin_the_server(srv):
    """50 connections that send half a request line and stop: the server answers others at once."""
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection((srv.host, srv.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        _health(srv)
        assert _chat(srv.url)[0] == 200
    finally:
        for s in socks:
            s.close()
    _health(srv)


def test_body_limits_hold_however_the_body_arrives(srv):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 17)}]}).encode()
    code, err, _ = _request(srv.url + "/chat/completions", big)
    assert code == 413 and "too large" in err["error"]["message"]
    # chunked, no Content-Length: cut while reading, not after
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[i:i + 8192] for i in range(0, len(big), 8192)))
    raw = _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: application/json\r\n\r\n" + chunks + b"0\r\n\r\n")
    code, err = _error_of(raw)
    assert code == 413 and err["error"]["code"] == 413
    # a body promised and withheld: 408 after the body timeout, not a thread held forever
    t0 = time.perf_counter()
    raw = _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
    assert _error_of(raw)[0] == 408 and time.perf_counter() - t0 < 10
    _health(srv)


def test_the_key_is_checked_before_the_body_is_read(tiny):
    with ChatServer(tiny, port=0, api_key="k", max_body=1 << 16, body_timeout=30.0) as srv:
        t0 = time.perf_counter()  # a body announced but never sent: the 401 comes without waiting for it
        raw = _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        code, err = _error_of(raw)
        assert code == 401 and "API key" in err["error"]["message"] and time.perf_counter() - t0 < 5
        _health(srv)


@pytest.mark.parametrize("body, says", [
    (b"not json", "invalid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
     "content[0].text must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": [7]}]}).encode(), "content[0] must be an object"),
    (json.dumps({"messages": [{"role": "user", "content": {"a": 1}}]}).encode(), "content must be a string"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "role must be"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}).encode(), "max_tokens"),
], ids=["text", "utf8", "deep", "list", "part-text", "part", "content", "role", "max-tokens"])
def test_malformed_bodies_get_a_json_400(srv, body, says):
    code, err, _ = _request(srv.url + "/chat/completions", body)
    assert code == 400 and says in err["error"]["message"], err
    _health(srv)


def test_a_prompt_past_the_context_is_refused_before_the_model(srv, tiny):
    limit = tiny.context_length
    assert limit
    code, err, _ = _chat(srv.url, messages=[{"role": "user", "content": "look " * (limit + 100)}])
    assert code == 400 and f"model's context of {limit} tokens" in err["error"]["message"]
    _health(srv)


def test_a_full_queue_answers_503(tiny):
    with ChatServer(tiny, port=0, max_batch_size=1, max_queue=1) as srv:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: _chat(srv.url, max_tokens=48), range(16)))
        codes = [r[0] for r in results]
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
        busy = next(r for r in results if r[0] == 503)
        assert busy[2].get("Retry-After") == "1" and "busy" in busy[1]["error"]["message"]
        assert _chat(srv.url)[0] == 200  # and serves again once the queue drains


def test_adapter_names_cannot_shadow_served_models(srv, tiny, tmp_path):
    url = srv.url + "/load_lora_adapter"
    for name in (tiny.name,):
        code, err, _ = _request(url, json.dumps({"lora_name": name, "lora_path": str(tmp_path)}).encode())
        assert code == 400 and "base model's name" in err["error"]["message"]
    code, err, _ = _request(url, b'{"lora_name": 3}')
    assert code == 400
    with ChatServer(tiny, port=0, runtime_lora=True, max_loras=0) as full:  # the cap, before any load
        code, err, _ = _request(full.url + "/load_lora_adapter",
                                json.dumps({"lora_name": "mine", "lora_path": str(tmp_path)}).encode())
        assert code == 400 and "the most this server holds (max_loras 0)" in err["error"]["message"]
    code, err, _ = _request(srv.url + "/nowhere", b"{}")
    assert code == 404 and err["error"]["type"] == "not_found"
    code, err, _ = _request(srv.url + "/chat/completions", method="GET")
    assert code == 405 and "no route GET" in err["error"]["message"]


def test_exprag_serve_survives_the_abuse_without_tracebacks(tiny_dir):
    """The real command: clients hang up mid-request and mid-reply, send garbage; its stderr stays
    free of tracebacks and it keeps answering."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "exprag", "serve", "--model", str(tiny_dir), "--port", "0",
                             "--name", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"serving tiny at (http://127\.0\.0\.1:(\d+)/v1)", line)
            if m:
                url, port = m.group(1), int(m.group(2))
                break
        assert url
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}).encode()
        for _ in range(10):  # hang up before the reply, after half a body, and with garbage
            for data in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body),
                         b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n{\"m",
                         b"\x16\x03\x01\x02\x00garbage\r\n\r\n"):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(data)
                s.close()
        assert _chat(url)[0] == 200
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 143) and "Traceback" not in err, err
