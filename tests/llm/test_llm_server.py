"""The OpenAI-compatible client against real servers on loopback: exprag's own (in a thread and as
`exprag serve`), a port with nothing listening, one that never answers, and one that fails once."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exprag.llm import ServerError, load_chat_model
from exprag.llm.openai_client import OpenAIChatModel, chat_completions_url
from exprag.llm.server import ChatServer

from .helpers import episode_start, observation


@pytest.fixture(scope="module")
def server(tiny):
    with ChatServer(tiny, port=0, max_batch_size=4) as srv:
        yield srv


def test_client_matches_the_model_through_a_real_server(tiny, server):
    client = load_chat_model(tiny.name, backend="openai", base_url=server.url, timeout=60)
    convs = [episode_start(i) for i in range(3)]
    got = client.generate(convs, max_new_tokens=6)
    want = tiny.generate(convs, max_new_tokens=6)
    assert [g.text for g in got] == [g.text for g in want]
    for g, w in zip(got, want):
        assert (g.prompt_tokens, g.completion_tokens, g.finish_reason) == (w.prompt_tokens, 6, "length")
        assert g.seconds > 0


def test_session_ids_reach_the_server(tiny, server):
    client = OpenAIChatModel(tiny.name, server.url, send_session_ids=True)
    conv = episode_start(5)
    first = client.generate([conv], max_new_tokens=4, session_ids=["srv-1"])[0]
    conv = conv + [{"role": "assistant", "content": first.text}, {"role": "user", "content": observation(5, 0)}]
    second = client.generate([conv], max_new_tokens=4, session_ids=["srv-1"])[0]
    assert first.prefill_tokens == first.prompt_tokens
    assert second.prefill_tokens < 40 < second.prompt_tokens  # cached_tokens reported by the server
    tiny.end_session("srv-1")


def test_models_endpoint_and_bad_requests(tiny, server):
    with urllib.request.urlopen(server.url + "/models", timeout=10) as r:
        assert json.load(r)["data"][0]["id"] == tiny.name
    client = OpenAIChatModel(tiny.name, server.url, max_retries=3, backoff=5.0)
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match="HTTP 400.*max_tokens"):
        client.generate([episode_start(0)], max_new_tokens=10**6)
    assert time.perf_counter() - t0 < 5  # a client error is not retried


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_fails_fast_after_retries():
    port = _free_port()  # nothing listens there
    client = OpenAIChatModel("m", f"http://127.0.0.1:{port}/v1", timeout=0.5, max_retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(ServerError, match=rf"127.0.0.1:{port}.*after 3 attempts.*exprag serve"):
        client.generate([episode_start(0)])
    assert time.perf_counter() - t0 < 3


def _silent_server() -> tuple[socket.socket, list]:
    """A loopback socket that accepts connections and never answers; the list collects them."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    conns: list = []

    def accept() -> None:
        try:
            while True:
                conns.append(s.accept()[0])
        except OSError:  # closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    return s, conns


def test_slow_server_times_out():
    s, conns = _silent_server()
    try:  # the default retry budget (3) applies to refusals and 5xx; a timeout is retried once only
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/chat/completions"
        client = OpenAIChatModel("m", url, timeout=0.3, backoff=0.01)
        assert client.max_retries == 3
        t0 = time.perf_counter()
        with pytest.raises(ServerError, match=re.escape(url) + ".*after 2 attempts.*timeout 0.3s.*timed out"):
            client.generate([episode_start(0)])
        assert time.perf_counter() - t0 < 3 and len(conns) == 2
    finally:
        s.close()
        for c in conns:
            c.close()


def test_eval_request_timeout_flag(tmp_path, capsys):
    """`eval --backend openai --request-timeout`: a silent server costs two timeouts, then one line
    naming the URL and exit 2."""
    from exprag.cli import main

    s, conns = _silent_server()
    url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    try:
        t0 = time.perf_counter()
        rc = main(["eval", "--env", "twx", "--split", "test", "--task-types", "coin", "--per-type", "1",
                   "--backend", "openai", "--base-url", url, "--model", "m", "--no-bank",
                   "--request-timeout", "0.3", "--out", str(tmp_path / "run")])
        took = time.perf_counter() - t0
    finally:
        s.close()
        for c in conns:
            c.close()
    errors = re.findall(r"exprag: error: .*", capsys.readouterr().err)  # after the progress bar's \r
    assert rc == 2 and len(conns) == 2 and took < 30
    assert len(errors) == 1 and url in errors[0] and "timeout 0.3s" in errors[0]
    assert main(["eval", "--backend", "openai", "--base-url", url, "--request-timeout", "0",
                 "--out", str(tmp_path / "other")]) == 2
    assert "'request_timeout'" in capsys.readouterr().err


def _post(url: str, key: str | None = None) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", body, headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_api_key_required_when_set(tiny, monkeypatch):
    with ChatServer(tiny, port=0, api_key="s3cret") as srv:
        assert _post(srv.url) == 401
        assert _post(srv.url, "wrong") == 401
        assert _post(srv.url, "s3cret") == 200
        with pytest.raises(urllib.error.HTTPError) as e:  # the model list is not public either
            urllib.request.urlopen(srv.url + "/models", timeout=10)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
        with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health", timeout=10) as r:
            assert r.status == 200  # liveness probes need no key
        # The client sends the key: given, or from EXPRAG_API_KEY (the variable `exprag serve` reads).
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.setenv("EXPRAG_API_KEY", "s3cret")
        assert OpenAIChatModel(tiny.name, srv.url).generate([episode_start(0)], max_new_tokens=2)[0].completion_tokens == 2
        big = [episode_start(0)[:1] + [{"role": "user", "content": "look " * 200_000}]]  # a ~1 MB body
        for conv in ([episode_start(0)], big):
            with pytest.raises(ServerError, match="HTTP 401.*API key"):
                OpenAIChatModel(tiny.name, srv.url, api_key="wrong").generate(conv, max_new_tokens=2)


def test_non_loopback_bind_needs_a_key(tiny):
    with pytest.raises(ServerError, match="refusing to serve on 0.0.0.0.*EXPRAG_API_KEY.*--insecure"):
        ChatServer(tiny, host="0.0.0.0", port=0)
    for kw in ({"api_key": "k"}, {"insecure": True}):
        ChatServer(tiny, host="0.0.0.0", port=0, **kw).shutdown()
    ChatServer(tiny, host="localhost", port=0).shutdown()  # loopback: no key needed


def test_exprag_serve_refuses_an_open_bind_before_loading(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EXPRAG_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "exprag", "serve", "--model", str(tmp_path / "missing"),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("exprag: error: refusing to serve on 0.0.0.0")


def test_retries_through_a_transient_failure():
    calls = []

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            if len(calls) == 1:
                body, code = b'{"error": {"message": "warming up"}}', 503
            else:
                body, code = json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": "go north"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
                }).encode(), 200
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = OpenAIChatModel("m", f"http://127.0.0.1:{httpd.server_address[1]}/v1", backoff=0.01)
        g = client.generate([episode_start(0)])[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (g.text, g.prompt_tokens, g.prefill_tokens, g.completion_tokens) == ("go north", 7, 7, 3)
    assert calls == ["/v1/chat/completions"] * 2


def test_url_forms():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ServerError, match="base URL"):
        load_chat_model("m", backend="openai")
    with pytest.raises(ServerError, match="invalid server URL"):
        OpenAIChatModel("m", "localhost:8000")


def test_exprag_serve_command(tiny_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exprag", "serve", "--model", str(tiny_dir), "--port", "0", "--name", "tiny"],
        stderr=subprocess.PIPE, text=True, env=dict(env, EXPRAG_API_KEY="k3y"),
    )
    url = None
    try:
        seen = ""
        for line in proc.stderr:  # "exprag: serving tiny at http://127.0.0.1:PORT/v1 ..."
            seen += line
            url = re.search(r"serving tiny at (http://127\.0\.0\.1:\d+/v1)", line)
            if url:
                break
        assert url, seen
        assert "API key required" in line
        assert _post(url.group(1)) == 401
        client = OpenAIChatModel("tiny", url.group(1), timeout=60, api_key="k3y")
        g = client.generate([episode_start(0), episode_start(1)], max_new_tokens=3)
        assert len(g) == 2 and all(x.completion_tokens == 3 for x in g)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
