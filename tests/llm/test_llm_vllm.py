"""A real vLLM server (the CPU build, `make test-engines`) serving the bundled SmolLM2 and an adapter
exprag trained: a short eval through it for the base model, the adapter given at start-up
(--lora-modules) and the adapter loaded at run time. Opt-in: skipped without vLLM installed."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from exprag.llm.vllm import vllm_python

pytestmark = [pytest.mark.engines, pytest.mark.slow,
              pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed "
                                 "(scripts/serve_vllm.sh --install-only, or VLLM_PYTHON=/path/to/python)")]


def _eval(tmp_path, name, base_url, adapter=None):
    from exprag.config import EvalConfig
    from exprag.evaluate import evaluate

    cfg = EvalConfig(env="twx", split="test", task_types="hard", per_type=1, model="smollm2-135m",
                     adapter=str(adapter) if adapter else None, backend="openai", base_url=base_url,
                     request_timeout=300, concurrency=4, max_steps=3, max_new_tokens=12, batch_size=4,
                     out=str(tmp_path / f"eval-{name}"))
    t0 = time.perf_counter()
    res = evaluate(cfg)
    return res, time.perf_counter() - t0


def test_vllm_serves_smollm2_and_an_exprag_adapter(tmp_path, twx_trajs, monkeypatch):
    from exprag.llm.adapters import lora_modules, served_name
    from exprag.llm.vllm import served_models, vllm_server
    from exprag.train.config import TrainConfig
    from exprag.train.lora import train

    times = {}
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in twx_trajs[0][:4]))
    t0 = time.perf_counter()
    res = train(TrainConfig(trajectories=[str(train_file)], model="smollm2-135m", out=str(tmp_path / "lora"),
                            epochs=1, lr=1e-3, batch_size=2, max_length=512, log_every_steps=1).validate())
    times["train_s"] = time.perf_counter() - t0
    adapter = res.last_checkpoint.resolve()
    copy = shutil.copytree(adapter, tmp_path / "runtime" / adapter.name)  # another path: another served name

    t0 = time.perf_counter()
    with vllm_server("smollm2-135m", lora_modules=lora_modules([adapter]), runtime_lora=True,
                     log_path=tmp_path / "vllm.log") as (url, key):
        times["vllm_start_s"] = time.perf_counter() - t0
        monkeypatch.setenv("EXPRAG_API_KEY", key)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        listed = {m["id"] for m in served_models(url, key)}
        assert {"smollm2-135m", served_name(adapter)} <= listed
        runs = {}
        for name, a in (("base", None), ("lora", adapter), ("runtime", copy)):
            r, times[f"eval_{name}_s"] = _eval(tmp_path, name, url, a)
            runs[name] = r
            assert r.metrics["n"] == 4  # the 4 hard TWX types, one task each
        assert served_name(copy) in {m["id"] for m in served_models(url, key)}  # loaded at run time
    # The same adapter under two names plays the same greedy episodes.
    acts = {n: [json.loads(x)["messages"] for x in (tmp_path / f"eval-{n}" / "trajectories.jsonl").read_text().splitlines()]
            for n in ("lora", "runtime")}
    assert sorted(map(json.dumps, acts["lora"])) == sorted(map(json.dumps, acts["runtime"]))
    print("engines:", json.dumps({k: round(v, 1) for k, v in times.items()}),
          {n: r.metrics["success_rate"] for n, r in runs.items()})
    if os.environ.get("EXPRAG_ENGINES_REPORT"):  # make test-engines records the times
        with open(os.environ["EXPRAG_ENGINES_REPORT"], "a") as f:
            f.write(json.dumps({"test": "vllm", **{k: round(v, 1) for k, v in times.items()},
                                "success": {n: r.metrics["success_rate"] for n, r in runs.items()}}) + "\n")


def test_memory_proxy_streams_from_vllm(tmp_path, twx_trajs, monkeypatch):
    """`exprag serve --bank B --upstream VLLM`: the official client's streamed request comes back
    through the proxy chunk by chunk, with the memory in the prompt vLLM read (more prompt tokens)."""
    import openai

    from exprag.bank import build_bank
    from exprag.llm.server import ChatServer
    from exprag.llm.vllm import vllm_server
    from exprag.memory_block import MemorySpec
    from exprag.memory_proxy import MemoryProxy

    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    task = twx_trajs[1][0].task
    proxy = MemoryProxy(tmp_path / "bank", MemorySpec(k=2))
    with vllm_server("smollm2-135m", log_path=tmp_path / "vllm.log") as (url, key), \
            ChatServer(None, port=0, upstream=url, upstream_api_key=key, rewrite=proxy.rewrite,
                       routes=proxy.routes()) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": task}]
        chunks = list(client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=8,
                                                     stream=True, stream_options={"include_usage": True}))
        assert len(chunks) > 2 and any(c.choices and c.choices[0].delta.content for c in chunks)
        with_memory = next(c.usage for c in chunks if c.usage).prompt_tokens
        without = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=2,
                                                 extra_body={"exprag": {"bank": False}}).usage.prompt_tokens
        assert with_memory > without + 100  # two trajectories in the system prompt
