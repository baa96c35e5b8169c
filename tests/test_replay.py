"""Replaying the committed replication (results/replication-cpu): the configs, the games and the errors.
The replay itself, with the real model and adapters, runs in tests/test_quickstart.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exprag.config import to_dict
from exprag.errors import DataFormatError
from exprag.experiment import read_json_record, replay_cell_config
from exprag.replay import (ReplayError, _gen_args, _main_cells, _reference, contrast_game, find_run_dir,
                           format_replay, held_out_games)

RUN = Path(__file__).resolve().parents[1] / "results" / "replication-cpu"
CELLS = ("no_retrieval-hard-none", "lora-hard-none-s2025", "exprag_lora-hard-matched-k2-static-s2025")


@pytest.mark.parametrize("cell", CELLS)
def test_replayed_config_is_the_one_the_cell_ran(cell):
    """From experiment.json alone: the same model, adapter checkpoint, bank, memory and agent settings
    as the committed cell recorded, field for field."""
    ran = json.loads((RUN / "cells" / "smollm2-135m" / cell / "cell.json").read_text())["eval_config"]
    cfg = replay_cell_config(RUN, f"smollm2-135m/{cell}", ran["task_ids"], ran["out"])
    mine = to_dict(cfg)
    for key in ("adapter", "retrieval"):  # the committed paths are relative to the repository root
        mine[key] = ran[key] if _same_paths(mine[key], ran[key]) else mine[key]
    assert mine == ran
    if "lora" in cell:
        assert (Path(cfg.adapter) / "adapter_model.safetensors").is_file()


def _same_paths(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_paths(a[k], b[k]) for k in a)
    if isinstance(a, str) and isinstance(b, str) and "/" in a:
        return Path(a).resolve() == Path(b).resolve() or a.endswith(b)
    return a == b


def test_games_first_in_generation_order_and_the_contrast_game():
    games, types = held_out_games(RUN, 2)
    assert types == ["pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep"]
    assert [g.rsplit("_", 1)[1] for g in games] == ["00001", "00002", "00003", "00004"]
    cells = _main_cells(RUN, read_json_record(RUN / "experiment.json"))
    assert {"no_retrieval", "lora", "exprag_lora"} <= set(cells)
    assert cells["exprag_lora"] == "smollm2-135m/exprag_lora-hard-matched-k2-static-s2025"
    ours, baseline = (_reference(RUN, cells[m]).outcomes for m in ("exprag_lora", "lora"))
    extra = contrast_game(ours, baseline, games)
    # the first game (by trial index) where the committed ExpRAG-LoRA succeeded and LoRA did not
    assert extra == "pick_heat_then_place_in_recep-Tomato-None-CounterTop-3/trial_gen_s0_00011"
    assert contrast_game(ours, baseline, games + [extra]) is None
    # generated games are an index prefix: index 11 needs 12 per type, and no more than the run's 40
    assert _gen_args({"gen_per_type": {"train": 16, "test": 40}}, "test", games + [extra]) == {
        "gen_per_type": {"test": 12}}
    assert _gen_args({"other": 1}, "test", games) == {"other": 1}


def test_missing_or_broken_runs_say_what_is_wrong(tmp_path):
    with pytest.raises(ReplayError, match=str(tmp_path / "nothing")):
        find_run_dir(tmp_path / "nothing")
    assert find_run_dir(RUN) == RUN
    with pytest.raises(DataFormatError, match=r"experiment.json: no cell 'smollm2-135m/rag'"):
        replay_cell_config(RUN, "smollm2-135m/rag", [], tmp_path / "o")
    # a copy without the adapter weights is refused, naming the record and the checkpoint
    copy = tmp_path / "run"
    shutil.copytree(RUN, copy, ignore=shutil.ignore_patterns("adapter_config.json", "cells", "data"))
    with pytest.raises(DataFormatError, match=r"experiment_done.json: field 'checkpoint' names .*epoch-004"):
        replay_cell_config(copy, "smollm2-135m/lora-hard-none-s2025", [], tmp_path / "o")
    with pytest.raises(ReplayError, match=r"ceiling.json: missing"):
        held_out_games(copy, 1)


def test_format_names_the_contrast_and_the_provenance():
    from exprag.replay import Reference, Replay, ReplayRow

    ref = Reference(5, 50, (0.043, 0.214), 0.66, {})
    rows = [ReplayRow("ExpRAG-LoRA", "c", "a/epoch-004", 1, 3, 0.7, 20.0, 3, {"g": (True, 7)}, 12.0, "r", ref)]
    text = format_replay(Replay(RUN, "9508a98", "exprag experiment x.yaml", ["g"], ["heat"], "g", 25, rows,
                                (5, 0, 0.0625)))
    assert "| ExpRAG-LoRA | 1/3 | 70% | 20.0 | 3/3 | 5/50 (10%) [4.3, 21.4] | 66% | 12 s |" in text
    assert "The game g was added" in text and "ExpRAG-LoRA: success in 7 steps" in text
    assert "McNemar p = 0.0625" in text and "at commit 9508a98" in text
