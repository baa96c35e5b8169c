"""Run directories written before the retrieval section held a ``MemorySpec`` resume unchanged.

tests/data/configs-9508a98.json holds what exprag 9508a98 wrote: an eval run's config.json, a training
run's train_config.yaml, an experiment's cell eval configs, adapter train configs and selection eval
configs. The same settings, given now through configs, CLI flags or the experiment runner, must compare
equal to them (and write the very same bytes), so that evaluate, train and experiment resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from exprag.cli import build_parser
from exprag.config import EvalConfig, RetrievalConfig, from_dict, to_dict
from exprag.memory_block import MemorySpec

OLD = json.loads((Path(__file__).parent / "data" / "configs-9508a98.json").read_text(encoding="utf-8"))


def test_eval_run_resumes_from_an_old_config_json(tmp_path):
    from exprag.commands.eval import build_config
    from exprag.evaluate import _check_config

    old = json.loads(OLD["eval_config_json"])
    args = build_parser().parse_args(
        ["eval", "--env", "twx", "--split", "test", "--task-types", "coin", "--per-type", "2", "--bank", "runs/bank",
         "-k", "3", "--mode", "dynamic", "--memory-format", "text", "--token-budget", "800", "--out", "runs/eval-old"])
    from_cli = build_config(args)
    assert from_cli.retrieval == RetrievalConfig("runs/bank", MemorySpec(k=3, mode="dynamic", format="text",
                                                                         token_budget=800))
    from_file = from_dict(EvalConfig, old, "config.json")
    for cfg in (from_cli, from_file):
        assert to_dict(cfg) == old
        out = tmp_path / "run"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(OLD["eval_config_json"], encoding="utf-8")
        _check_config(out, cfg, overwrite=False)  # no RunConfigError: the run resumes
        assert (out / "config.json").read_text(encoding="utf-8") == OLD["eval_config_json"]


def test_training_run_resumes_from_an_old_train_config(tmp_path):
    from exprag.train.config import load_train_config, to_dict as train_dict
    from exprag.train.rundir import CONFIG_FILE, prepare_run_dir

    old = yaml.safe_load(OLD["train_config_yaml"])
    flags = {"trajectories": ["data/train.jsonl"], "model": "smollm2-135m", "out": "runs/train-old", "epochs": 2,
             "retrieval.bank": "runs/bank", "retrieval.k": 1, "retrieval.memory_format": "text",
             "retrieval.token_budget": 900}
    cfg = load_train_config(None, flags)
    assert cfg.retrieval.memory == MemorySpec(k=1, format="text", token_budget=900)
    assert yaml.safe_dump(train_dict(cfg), sort_keys=False) == OLD["train_config_yaml"]
    (tmp_path / "old.yaml").write_text(OLD["train_config_yaml"], encoding="utf-8")
    assert train_dict(load_train_config(tmp_path / "old.yaml")) == old

    run = tmp_path / "run"
    (run / "epoch-1").mkdir(parents=True)
    (run / "epoch-1" / "optimizer.pt").write_bytes(b"")
    (run / "state.json").write_text(json.dumps({"last": "epoch-1"}), encoding="utf-8")
    (run / CONFIG_FILE).write_text(OLD["train_config_yaml"], encoding="utf-8")
    cfg.out = str(run)
    assert prepare_run_dir(cfg, resume=True, overwrite=False) == run / "epoch-1"


def test_experiment_cells_adapters_and_selection_keep_their_configs(tmp_path, monkeypatch):
    import exprag.evaluate
    from exprag.experiment import (_cell_eval_config, _finished_cell, _selection_eval, _train_config, expand,
                                   experiment_config_from_dict)
    from exprag.train.config import to_dict as train_dict

    cfg = experiment_config_from_dict(OLD["experiment"])
    out = Path("runs/experiments/old")
    banks = {name: out / "banks" / name for name in ("easy", "hard", "all")}
    data = {"train-easy": out / "data/train-easy.jsonl", "dev-easy": out / "data/dev-easy.jsonl"}
    cells = expand(cfg)
    assert [c.id for c in cells] == list(OLD["cells"])
    for cell in cells:
        adapter = out / "adapters/x/exprag_lora-s2025/epoch-1" if cell.seed is not None else None
        ecfg = _cell_eval_config(cfg, out, cell, {None: banks}, adapter)
        assert to_dict(ecfg) == OLD["cells"][cell.id]
        (tmp_path / "cell.json").write_text(json.dumps({"eval_config": OLD["cells"][cell.id]}), encoding="utf-8")
        assert _finished_cell(tmp_path, ecfg) is not None  # a finished cell is reused, not rerun

    seen: list[EvalConfig] = []

    class Result:
        success_rate = 0.5

    monkeypatch.setattr(exprag.evaluate, "evaluate", lambda c: seen.append(c) or Result())
    for kind in ("lora", "exprag_lora"):
        tcfg = _train_config(cfg, out, "smollm2-135m", kind, 2025, data, banks)
        assert train_dict(tcfg) == OLD["train_configs"][kind]  # experiment_done.json: the adapter is reused
        assert _selection_eval(cfg, tcfg, kind, banks, ["coin/seed1"])(Path(tcfg.out) / "epoch-1") == 0.5
        assert to_dict(seen.pop()) == OLD["selection_configs"][kind]


def test_train_selection_rollouts_keep_their_config(monkeypatch):
    import exprag.evaluate
    from exprag.train.config import SelectionConfig, TrainConfig
    from exprag.train.select import make_rollout_eval

    seen: list[EvalConfig] = []

    class Result:
        success_rate = 0.25

    monkeypatch.setattr(exprag.evaluate, "evaluate", lambda c: seen.append(c) or Result())
    cfg = TrainConfig(trajectories=["data/train.jsonl"], model="smollm2-135m", out="runs/train-old", seed=7,
                      retrieval=RetrievalConfig("runs/bank", MemorySpec(k=1, format="text", token_budget=900)),
                      selection=SelectionConfig(every=1, env="twx", max_steps=11, bank="runs/selbank"))
    assert make_rollout_eval(cfg, "runs/train-old")(Path("runs/train-old/epoch-1")) == pytest.approx(0.25)
    assert to_dict(seen.pop()) == OLD["train_selection"]
