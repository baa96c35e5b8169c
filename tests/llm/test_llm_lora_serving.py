"""LoRA adapters through an OpenAI-compatible server: served by name on one loaded base model, the
same replies as the adapter merged in-process, loaded at run time when the server allows it, and a
clear error with the serving command when it does not."""

from __future__ import annotations

import json
import urllib.request

import pytest

from exprag.llm import ServerError, load_chat_model
from exprag.llm.adapters import lora_modules, served_name, serve_command
from exprag.llm.hf import HFChatModel
from exprag.llm.server import ChatServer

from .helpers import episode_start


def _random_adapter(base_dir, out, seed: int):
    """A LoRA adapter with random (not zero) B matrices, so that it changes the replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(net, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_random_adapter(tiny_dir, root / f"a{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def base(tiny_dir):
    return HFChatModel(str(tiny_dir), device="cpu", max_batch_size=4)


def test_adapters_are_served_by_name_on_one_model(tiny_dir, tiny, adapters, base):
    a0, a1 = adapters
    with ChatServer(base, port=0, adapters={served_name(a0): str(a0)}, runtime_lora=True) as server:
        with urllib.request.urlopen(server.url + "/models", timeout=10) as r:
            listed = json.load(r)["data"]
        assert [m["id"] for m in listed] == [base.name, served_name(a0)]
        assert listed[1]["parent"] == base.name
        convs = [episode_start(i) for i in range(3)]
        plain = load_chat_model(base.name, backend="openai", base_url=server.url, send_session_ids=True)
        for path in (a0, a1):  # a0 served from the start, a1 loaded at run time
            lora = load_chat_model(base.name, adapter=path, backend="openai", base_url=server.url,
                                   send_session_ids=True)
            assert lora.name == served_name(path)
            merged = HFChatModel(str(tiny_dir), adapter=path, device="cpu", max_batch_size=4)
            want = [g.text for g in merged.generate(convs, max_new_tokens=6)]
            # The same session ids for the base model and the adapter: their caches are kept apart.
            sids = [f"s{i}" for i in range(3)]
            assert [g.text for g in plain.generate(convs, max_new_tokens=6, session_ids=sids)] == \
                [g.text for g in tiny.generate(convs, max_new_tokens=6)]
            assert [g.text for g in lora.generate(convs, max_new_tokens=6, session_ids=sids)] == want
        assert want != [g.text for g in tiny.generate(convs, max_new_tokens=6)]  # the adapter matters
        assert sorted(server.adapters) == sorted(served_name(a) for a in adapters)


def test_a_server_that_cannot_load_it_names_the_command(base, adapters, tmp_path):
    a1 = adapters[1]
    fresh = HFChatModel(str(base.path), device="cpu")
    with ChatServer(fresh, port=0) as server:  # no --runtime-lora
        with pytest.raises(ServerError) as e:
            load_chat_model("smollm2-135m", adapter=a1, backend="openai", base_url=server.url)
    msg = str(e.value)
    assert "runtime LoRA loading is off" in msg and serve_command("smollm2-135m", [a1]) in msg
    assert f"--lora-modules {served_name(a1)}={a1.resolve()}" in msg
    with pytest.raises(Exception, match="adapter_config.json"):
        load_chat_model("m", adapter=tmp_path, backend="openai", base_url=server.url)


def test_served_names_are_stable_and_distinct(tmp_path):
    a, b = tmp_path / "lora-s7" / "epoch-001", tmp_path / "exprag_lora-s7" / "epoch-001"
    assert served_name(a) == served_name(str(a) + "/") and served_name(a) != served_name(b)
    assert len(served_name(tmp_path / ("x" * 200))) <= 62  # the label is cut, the hash kept
    assert served_name("/x/adapters/m/lora-s7/checkpoints/epoch-002").startswith("lora-lora-s7-epoch-002-")
    assert lora_modules([a, a, b]) == [f"{served_name(a)}={a}", f"{served_name(b)}={b}"]
