"""The memory proxy driven by the official `openai` client: exprag's server in front of an upstream
OpenAI-compatible server (exprag's own, on loopback) and in front of a local model. The upstream
sees the system prompt `exprag eval` would build; write-back appends; bad requests get 4xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from exprag.bank import Retriever, build_bank, load_bank
from exprag.envs import make_env
from exprag.llm.server import ChatServer
from exprag.memory_block import MemorySpec, memory_block
from exprag.memory_proxy import EPISODES_ROUTE, MemoryProxy
from exprag.prompt import system_prompt


class Recording:
    """A real chat model that keeps every conversation it was asked to continue."""

    def __init__(self, model):
        self.model, self.name, self.seen = model, model.name, []

    def generate(self, conversations, **kw):
        self.seen.extend(conversations)
        return self.model.generate(conversations, **kw)

    def end_session(self, session_id):
        self.model.end_session(session_id)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from exprag.llm.hf import HFChatModel
    from exprag.llm.models import tiny_random_model

    return HFChatModel(str(tiny_random_model(tmp_path_factory.mktemp("tiny") / "model")), max_batch_size=2)


@pytest.fixture
def bank(tmp_path, twx_trajs):
    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    return tmp_path / "bank"


def _eval_system(bank, task, templates, spec=MemorySpec(k=2)):
    """What exprag eval's agent puts in its system prompt for ``task`` (exprag.agent: _memory, _system)."""
    (hits,) = spec.retrieve(Retriever(load_bank(bank)), [(task, None)])
    return system_prompt(templates, memory_block(hits, spec.format))


def test_the_upstream_sees_the_memory_exprag_eval_builds(tiny, bank, twx_trajs):
    task = twx_trajs[1][0].task
    with make_env("twx") as env:
        templates = env.action_templates()
    upstream_model = Recording(tiny)
    proxy = MemoryProxy(bank, MemorySpec(k=2))
    with ChatServer(upstream_model, port=0) as upstream, \
            ChatServer(None, port=0, upstream=upstream.url, rewrite=proxy.rewrite, routes=proxy.routes()) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=tiny.name, max_tokens=3, messages=[
            {"role": "system", "content": system_prompt(templates)}, {"role": "user", "content": task}])
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens == 3
        (seen,) = upstream_model.seen
        assert seen[0] == {"role": "system", "content": _eval_system(bank, task, templates)}
        assert seen[1:] == [{"role": "user", "content": task}]

        # per request: no memory, another K, or the task given outright
        client.chat.completions.create(model=tiny.name, max_tokens=2, messages=[{"role": "user", "content": task}],
                                       extra_body={"exprag": {"bank": False}})
        assert upstream_model.seen[-1] == [{"role": "user", "content": task}]
        client.chat.completions.create(model=tiny.name, max_tokens=2, messages=[{"role": "user", "content": "go"}],
                                       extra_body={"exprag": {"k": 1, "task": task}})
        assert upstream_model.seen[-1][0] == {"role": "system", "content": memory_block(
            MemorySpec(k=1).retrieve(Retriever(load_bank(bank)), [(task, None)])[0], "json")}

        # write-back: a finished episode posted by the client is in the bank for the next request
        episode = {"messages": [{"role": "user", "content": "Your task is to find the zebra."},
                                {"role": "assistant", "content": "look around"}], "success": True,
                   "task_type": "zebra"}
        req = urllib.request.Request(srv.url.removesuffix("/v1") + EPISODES_ROUTE, json.dumps(episode).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            added = json.load(r)
        assert added["count"] == len(twx_trajs[0]) + 1
        assert load_bank(bank).trajectories[-1].task == "Your task is to find the zebra."
        client.chat.completions.create(model=tiny.name, max_tokens=2, extra_body={"exprag": {"k": 1}},
                                       messages=[{"role": "user", "content": "Your task is to find the zebra."}])
        assert "find the zebra" in upstream_model.seen[-1][0]["content"]

        # bad requests: 4xx with a message, never a traceback or a dropped connection
        with pytest.raises(openai.BadRequestError, match="exprag.k"):
            client.chat.completions.create(model=tiny.name, messages=[{"role": "user", "content": task}],
                                           extra_body={"exprag": {"k": -1}})
        with pytest.raises(openai.BadRequestError, match="'exprag.depth' is not a setting"):
            client.chat.completions.create(model=tiny.name, messages=[{"role": "user", "content": task}],
                                           extra_body={"exprag": {"depth": 3}})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(srv.url.removesuffix("/v1") + EPISODES_ROUTE,
                                                          b'{"messages": [], "success": "yes"}'), timeout=30)
        assert e.value.code == 400 and "messages" in json.load(e.value)["error"]["message"]


def test_a_local_model_behind_the_proxy_gets_the_dynamic_memory(tiny, bank, twx_trajs):
    task = twx_trajs[1][0].task
    model = Recording(tiny)
    proxy = MemoryProxy(bank, MemorySpec(k=2, mode="dynamic"))
    history = [{"role": "user", "content": task}, {"role": "assistant", "content": "look around"},
               {"role": "user", "content": "You see a box."}]
    with ChatServer(model, port=0, rewrite=proxy.rewrite, routes=proxy.routes(), api_key="k") as srv:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).chat.completions.create(
                model=tiny.name, messages=history)
        openai.OpenAI(base_url=srv.url, api_key="k", max_retries=0).chat.completions.create(
            model=tiny.name, messages=history, max_tokens=2)
    (hits,) = MemorySpec(k=2, mode="dynamic").retrieve(Retriever(load_bank(bank)), [(task, history)])
    assert model.seen[-1] == [{"role": "system", "content": memory_block(hits, "json")}, *history]


def test_exprag_serve_bank_upstream_command(tiny, bank, twx_trajs):
    """The command a user runs: `exprag serve --bank BANK --upstream URL` in front of a running server."""
    import os
    import re
    import subprocess
    import sys

    from tests.test_io import exprag

    res = exprag("serve", "--upstream", "http://127.0.0.1:9/v1")
    assert res.returncode == 2 and "give --bank BANK" in res.stderr
    res = exprag("serve", "--bank", str(bank))
    assert res.returncode == 2 and "give --model" in res.stderr
    task = twx_trajs[1][0].task
    upstream_model = Recording(tiny)
    with ChatServer(upstream_model, port=0) as upstream:
        proc = subprocess.Popen([sys.executable, "-m", "exprag", "serve", "--bank", str(bank), "--upstream",
                                 upstream.url, "--port", "0", "-k", "1"], stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            for line in proc.stderr:
                m = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
                if m:
                    break
            assert m and "memory from" in line, line
            openai.OpenAI(base_url=m.group(1), api_key="x", max_retries=0).chat.completions.create(
                model=tiny.name, max_tokens=2, messages=[{"role": "user", "content": task}])
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    (hits,) = MemorySpec(k=1).retrieve(Retriever(load_bank(bank)), [(task, None)])
    assert upstream_model.seen[-1][0] == {"role": "system", "content": memory_block(hits, "json")}
