"""Every method of the grid through one OpenAI-compatible endpoint: `exprag serve`'s server loads the
base model once, and the adapters the experiment trains reach it at run time by their served names."""

import json

import pytest

from exprag.experiment import experiment_config_from_dict, run_experiment

METHODS = ["no_retrieval", "exprag_frozen", "lora", "lora_retrieval", "exprag_lora"]
KEY = "test-key"


def _grid(model: str, out: str, base_url: str) -> dict:
    return {
        "name": "served", "env": "twx", "models": [model], "encoder": "bm25", "out": out, "seeds": [7],
        "main_k": 1,
        "data": {"train_per_type": 1, "test_per_type": 1},
        "eval": {"max_steps": 2, "max_new_tokens": 4, "batch_size": 4, "token_budget": 300,
                 "backend": "openai", "base_url": base_url, "concurrency": 4},
        "train": {"epochs": 1, "lr": 1e-3, "batch_size": 2, "max_length": 1024, "log_every_steps": 1},
        "grid": [{"methods": METHODS, "splits": ["hard"]}],
    }


@pytest.fixture()
def served(tmp_path_factory, monkeypatch):
    from exprag.llm.hf import HFChatModel
    from exprag.llm.models import tiny_random_model
    from exprag.llm.server import ChatServer

    path = str(tiny_random_model(tmp_path_factory.mktemp("tiny") / "model"))
    model = HFChatModel(path, device="cpu", max_batch_size=4)
    loads = []
    real = model.load_adapter
    model.load_adapter = lambda name, adapter: (loads.append(name), real(name, adapter))[1]
    monkeypatch.setenv("EXPRAG_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(model, port=0, api_key=KEY, runtime_lora=True) as server:
        yield path, server, loads


def test_every_method_runs_through_one_served_endpoint(tmp_path, served):
    path, server, loads = served
    out = tmp_path / "exp"
    logs = []
    cfg = experiment_config_from_dict(_grid(path, str(out), server.url))
    res = run_experiment(cfg, command="pytest", log=logs.append)
    assert res.cells_run == len(METHODS)
    rows = {json.loads(line)["method"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
    assert set(rows) == set(METHODS) and all(r["n"] == 4 for r in rows.values())
    # The two trained adapters were loaded into the one served model, once each, under their served names.
    from exprag.llm.adapters import served_name

    adapters = {m: out / rows[m]["adapter"] for m in ("lora", "exprag_lora")}
    assert sorted(loads) == sorted(served_name(a) for a in adapters.values()) == sorted(server.adapters)
    assert rows["lora_retrieval"]["adapter"] == rows["lora"]["adapter"]
    # The command that would serve them with vLLM is printed for a server started without them.
    hint = next(s for s in logs if "scripts/serve_vllm.sh" in s)
    assert all(f"{served_name(a)}={a.resolve()}" in hint for a in adapters.values())
    cell = json.loads((out / "cells" / "model" / "lora-hard-none-s7" / "config.json").read_text())
    assert cell["backend"] == "openai" and cell["concurrency"] == 4
    trajs = [json.loads(x) for x in (out / "cells/model/lora-hard-none-s7/trajectories.jsonl").read_text().splitlines()]
    assert trajs and all(t["num_steps"] >= 1 and t["source"].endswith("+epoch-001") for t in trajs)

    # Cells written before the concurrency setting existed (no such key) count as finished too.
    for cell_dir in (out / "cells" / "model").iterdir():
        for name, key in (("config.json", None), ("cell.json", "eval_config")):
            doc = json.loads((cell_dir / name).read_text())
            (doc[key] if key else doc).pop("concurrency")  # set here (4); written only when set
            (cell_dir / name).write_text(json.dumps(doc))
    again = run_experiment(cfg, command="pytest")  # resumed: nothing is asked of the server again
    assert again.cells_run == 0 and again.cells_reused == len(METHODS)


def test_eval_concurrency_flag_and_yaml_key(tmp_path):
    from exprag.cli import build_parser
    from exprag.commands.eval import build_config
    from exprag.evaluate import openai_transport

    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("backend: openai\nbase_url: http://127.0.0.1:1/v1\nconcurrency: 2\n")
    parse = build_parser().parse_args
    assert build_config(parse(["eval", "--config", str(yaml_file)])).concurrency == 2
    cfg = build_config(parse(["eval", "--config", str(yaml_file), "--concurrency", "16"]))
    assert openai_transport(cfg) == {"timeout": 60.0, "concurrency": 16}
    assert build_config(parse(["eval"])).concurrency is None  # the client's default (8)
