"""The shipped training recipes load, validate, and keep the paper's LoRA recipe (docs/method.md#hyperparameters)."""

from pathlib import Path

import pytest

from exprag.train.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,epochs", [("train-alfworld-paper.yaml", 9), ("train-scienceworld-paper.yaml", 29),
                                         ("train-smollm2-cpu.yaml", 3)])
def test_recipes_load(name, epochs):
    cfg = load_train_config(CONFIGS / name)
    assert cfg.epochs == epochs
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.weight_decay, cfg.seed) == (8, 16, 0.1, 0.0, 2025)
    assert cfg.retrieval.bank and cfg.retrieval.memory.mode == "static" and cfg.empty_memory_fraction == 0.0
    if "paper" in name:
        assert cfg.lr == 5e-5 and cfg.retrieval.memory.k == 2 and cfg.retrieval.memory.format == "json"
        assert cfg.selection.every and cfg.selection.split == "dev" and cfg.selection.task_types == "hard"
        assert cfg.selection.bank and "hard" in cfg.selection.bank  # hard-type memory at selection time


def test_flags_override_the_file():
    cfg = load_train_config(CONFIGS / "train-smollm2-cpu.yaml", {"epochs": 5, "retrieval.k": 2, "lr": None})
    assert cfg.epochs == 5 and cfg.retrieval.memory.k == 2 and cfg.lr == 2e-3


def test_leakage_scope_is_a_checked_option():
    assert load_train_config(CONFIGS / "train-alfworld-paper.yaml").leakage == "task"
    cfg = load_train_config(CONFIGS / "train-alfworld-paper.yaml", {"leakage": "scene"})
    assert cfg.leakage == "scene"
    from exprag.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="field 'leakage': 'room' is not one of task, scene"):
        load_train_config(CONFIGS / "train-alfworld-paper.yaml", {"leakage": "room"})
