"""The transformers backend on real models: KV reuse, batching, stops, sessions, adapters."""

from __future__ import annotations

import json

import pytest

from exprag.llm import ModelError, load_chat_model
from exprag.llm.base import ChatModel

from .helpers import episode_start, play


def test_protocol(tiny):
    assert isinstance(tiny, ChatModel)
    assert tiny.name.endswith("tiny")


def test_kv_reuse_gives_the_same_replies_as_full_prefill(tiny):
    reused, gens = play(tiny, 3, 5, batched=True, sessions=True, tag="reuse")
    fresh, fresh_gens = play(tiny, 3, 5, batched=False, sessions=False)
    assert reused == fresh
    # Replies differ between episodes and steps: the check above can tell caches apart.
    assert len({r for ep in fresh for r in ep}) > 5
    for step, (g_reuse, g_fresh) in enumerate(zip(gens, fresh_gens)):
        for a, b in zip(g_reuse, g_fresh):
            assert a.prompt_tokens == b.prompt_tokens
            assert b.prefill_tokens == b.prompt_tokens
            if step == 0:
                assert a.prefill_tokens == a.prompt_tokens
            else:  # only the reply's tail and the new observation are run
                assert a.prefill_tokens < 40 < a.prompt_tokens


def test_prefill_per_step_drops_with_reuse(tiny):
    _, gens = play(tiny, 2, 4, batched=True, sessions=True, tag="drop")
    later = [g for step in gens[1:] for g in step]
    assert sum(g.prefill_tokens for g in later) * 4 < sum(g.prompt_tokens for g in later)
    assert tiny.num_sessions == 0  # play() ended its sessions


def test_batch_equals_individual(tiny):
    batched, _ = play(tiny, 4, 3, batched=True, sessions=False)
    single, _ = play(tiny, 4, 3, batched=False, sessions=False)
    assert batched == single


def test_changed_prompt_falls_back_to_full_prefill(tiny):
    conv = episode_start(0)
    first = tiny.generate([conv], session_ids=["div"])[0]
    # Dynamic retrieval rewrote the system prompt: the cached prefix no longer matches.
    changed = [{"role": "system", "content": "Different memory block. " * 5}, conv[1],
               {"role": "assistant", "content": first.text}, {"role": "user", "content": "You see a lamp."}]
    got = tiny.generate([changed], session_ids=["div"])[0]
    want = tiny.generate([changed])[0]
    assert got.text == want.text
    assert got.prefill_tokens > got.prompt_tokens - 10  # only the template's opening tokens are shared
    # Asking again with the same prompt serves all but the last token from the cache.
    again = tiny.generate([changed], session_ids=["div"])[0]
    assert again.text == want.text and again.prefill_tokens == 1
    tiny.end_session("div")


def test_length_stop_and_finish_reason(tiny):
    conv = episode_start(1)
    g = tiny.generate([conv], max_new_tokens=5)[0]
    assert g.completion_tokens == 5 and g.finish_reason == "length"  # a random model never ends its turn
    long = tiny.generate([conv], max_new_tokens=12)[0].text
    stop = long[len(long) // 2]
    cut = tiny.generate([conv], max_new_tokens=12, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and long.startswith(cut.text)


def test_real_model_ends_its_turn_and_reuse_matches(smollm2):
    reused, gens = play(smollm2, 2, 3, batched=True, sessions=True, max_new_tokens=24, tag="smol")
    fresh, _ = play(smollm2, 2, 3, batched=False, sessions=False, max_new_tokens=24)
    assert reused == fresh
    assert any(g.finish_reason == "stop" and g.text.strip() for step in gens for g in step)
    assert all(g.prefill_tokens < g.prompt_tokens // 2 for g in gens[-1])


def test_session_bookkeeping(tiny_dir):
    from exprag.llm.hf import HFChatModel

    m = HFChatModel(str(tiny_dir), max_sessions=2)
    for i in range(3):
        m.generate([episode_start(i)], max_new_tokens=2, session_ids=[f"s{i}"])
    assert m.num_sessions == 2  # least recently used dropped
    m.end_session("s2")
    m.end_session("unknown")
    assert m.num_sessions == 1
    with pytest.raises(ValueError, match="twice"):
        m.generate([episode_start(0), episode_start(1)], session_ids=["x", "x"])
    with pytest.raises(TypeError):
        m.generate(episode_start(0))  # one conversation, not a batch
    off = HFChatModel(str(tiny_dir), kv_reuse=False)
    off.generate([episode_start(0)], max_new_tokens=2, session_ids=["a"])
    g = off.generate([episode_start(0)], max_new_tokens=2, session_ids=["a"])[0]
    assert off.num_sessions == 0 and g.prefill_tokens == g.prompt_tokens


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="offline.*--model DIR"):
        load_chat_model("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="no such directory"):
        load_chat_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelError, match="no config.json"):
        load_chat_model(str(tmp_path))
    with pytest.raises(ModelError, match="unknown backend"):
        load_chat_model("x", backend="vllm")


def _make_adapter(base_dir, out, base_name):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(meta))
    return out


def test_lora_adapter_loads_and_checks_its_base(tiny, tiny_dir, tmp_path):
    from exprag.llm.models import tiny_random_model

    adapter = _make_adapter(tiny_dir, tmp_path / "lora", str(tiny_dir))
    tuned = load_chat_model(str(tiny_dir), adapter=adapter)
    assert tuned.name == f"{tiny.name}+lora"
    conv = [episode_start(2)]
    assert tuned.generate(conv)[0].text != tiny.generate(conv)[0].text  # the adapter is applied

    with pytest.raises(ModelError, match="trained on base model 'some-org/another-model'"):
        load_chat_model(str(tiny_dir), adapter=_make_adapter(tiny_dir, tmp_path / "other", "some-org/another-model"))

    wide = tiny_random_model(tmp_path / "wide", hidden_size=96, num_heads=4, num_kv_heads=2)
    misfit = _make_adapter(wide, tmp_path / "misfit", str(tiny_dir))  # claims our base, shapes say otherwise
    with pytest.raises(ModelError, match="does not fit"):
        load_chat_model(str(tiny_dir), adapter=misfit)
    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_chat_model(str(tiny_dir), adapter=tmp_path)
