"""Held-out test games shared by no two experiments: a generated game's identity, the confirmatory configs'
test games against the committed replication's and each other's, and the data stage's check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from exprag.disjoint import check_disjoint, game_set, shared
from exprag.envs import alfworld_gen as gen
from exprag.errors import DataFormatError, EnvError

ROOT = Path(__file__).parent.parent
REPLICATION = "results/replication-cpu"
CONFIRM = [f"configs/replication-cpu-confirm-s{s}.yaml" for s in (2026, 2027)]
HARD = ["pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep"]


def _kept() -> list[str]:
    return json.loads((ROOT / REPLICATION / "data" / "ceiling.json").read_text())["groups"]["test-hard"]["kept"]


def test_game_identity_is_the_played_game():
    tid = _kept()[0]
    spec = gen.spec_of(tid, "test")
    assert gen.game_dirname(spec) == tid.split("/")[0]
    moved = dataclasses.replace(spec, objects=[(f"{o}|9.99", t, r) for o, t, r in spec.objects],
                                task_desc="reworded")
    assert gen.game_identity(moved) == gen.game_identity(spec)  # coordinates and wording do not make a new game
    start = dataclasses.replace(spec, agent_loc=spec.agent_loc + "x")
    assert gen.game_identity(start) != gen.game_identity(spec)
    first, *rest = spec.objects
    placed = dataclasses.replace(spec, objects=[(first[0], first[1], "Elsewhere|1|2|3"), *rest])
    assert gen.game_identity(placed) != gen.game_identity(spec)
    with pytest.raises(EnvError, match="not a generated ALFWorld game id"):
        gen.spec_of("pick_cool_then_place_in_recep-Apple-None-Fridge-1/trial_T2019", "test")
    with pytest.raises(EnvError, match="draws .* for this seed and index on split 'train'"):
        gen.spec_of(tid, "train")  # the same seed and index on another split is another game
    # the committed games were generated with seed 0 and 40 per type: all among that setting's candidates
    assert set(_kept()) <= set(gen.candidate_ids("test", 0, 40, HARD))


def test_confirm_test_games_are_disjoint_from_the_replication_and_each_other(monkeypatch):
    monkeypatch.chdir(ROOT)
    sets = {s: game_set(s) for s in (REPLICATION, *CONFIRM)}
    assert len(sets[REPLICATION].ids) == 50 and sets[REPLICATION].complete
    for c in CONFIRM:  # every candidate a config can generate: 4 x 100 + 8 indices per held-out type
        assert len(sets[c].ids) == 2 * 408 and not sets[c].complete
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert shared(sets[a], sets[b]) == [], (a, b)
    # the previews of what each data stage keeps (scripts/preview_test_games.py) are among its candidates
    for seed, cfg in zip((2026, 2027), CONFIRM):
        preview = ROOT / "results" / "replication-cpu-confirm" / f"test-games-s{seed}.json"
        if preview.is_file():
            kept = json.loads(preview.read_text())["groups"]["test-hard"]["kept"]
            assert len(kept) == 100 and set(kept) <= set(sets[cfg].ids.values())


def test_data_stage_refuses_shared_test_games(tmp_path, monkeypatch):
    from exprag.experiment import _ensure_test_experts, expand, load_experiment_config

    monkeypatch.chdir(ROOT)
    with pytest.raises(DataFormatError, match=f"50 test games are also test games of {REPLICATION}"):
        check_disjoint(_kept(), "test", [REPLICATION], "x")
    with pytest.raises(DataFormatError, match="are the same game"):
        check_disjoint(_kept()[:2] + _kept()[:1], "test", [], "x")
    check_disjoint(_kept(), "test", [CONFIRM[0]], "x")  # the committed 50 are no candidate of seed 2026
    with pytest.raises(DataFormatError, match="not found; disjoint_from names experiment directories"):
        check_disjoint(_kept(), "test", [str(tmp_path / "nowhere")], "x")
    (tmp_path / "bad" / "data").mkdir(parents=True)
    (tmp_path / "bad" / "data" / "ceiling.json").write_text(json.dumps({"groups": {"sel": {}}}))
    with pytest.raises(DataFormatError, match="field 'groups': expected test-\\* groups of one split"):
        check_disjoint(_kept(), "test", [str(tmp_path / "bad")], "x")
    # a data stage whose kept test games (here: the replication's own) are another experiment's
    cfg = load_experiment_config(CONFIRM[0])
    cfg.out = str(tmp_path)
    cfg.data.disjoint_from = [REPLICATION]
    settings = {"split": "test", "task_types": ",".join(HARD), "per_type": 50, "max_steps": 25}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ceiling.json").write_text(json.dumps(
        {"expert_ceiling": 0.667, "groups": {"test-hard": {**settings, "kept": _kept(), "games": []}}}))
    (tmp_path / "data" / "test-hard.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="replication-cpu-confirm-s2026: test games: field 'data.disjoint_from'"):
        _ensure_test_experts(cfg, tmp_path, expand(cfg), [], False, print)
    cfg.data.disjoint_from = [CONFIRM[1]]
    assert _ensure_test_experts(cfg, tmp_path, expand(cfg), [], False, print) == {"test-hard": _kept()}
