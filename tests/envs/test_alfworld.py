"""ALFWorld on the real engine: games generated from the wheel's ALFRED scenes, the hand-coded expert
winning every task type, action normalisation, the step cap, and bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exprag.envs import alfworld_gen as gen
from exprag.envs import env_spec
from exprag.envs.alfworld import MAX_STEPS, ALFWorldEnv, action_templates, normalize_action
from exprag.envs.base import TaskSpec
from exprag.errors import EnvError, UnknownTaskTypeError
from exprag.expert import collect, run_expert

pytest.importorskip("alfworld")
pytest.importorskip("textworld")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    """One generated game per task type (train split, seed 0), shared by the module."""
    out = tmp_path_factory.mktemp("alfworld") / "gen"
    report = gen.generate(out, split="train", per_type=1, seed=0)
    assert {tt: r.generated for tt, r in report.types.items()} == {tt: 1 for tt in gen.TASK_TYPES}
    return out


@pytest.fixture(scope="module")
def env(gen_dir):
    with ALFWorldEnv(data_dir=gen_dir) as e:
        yield e


def _copy_game(gen_dir: Path, dest: Path, task_type: str) -> Path:
    """A data root holding a copy of one generated game; returns the copied game file."""
    src = next((gen.data_root(gen_dir) / "train").glob(f"{task_type}-*/trial_*/game.tw-pddl")).parent
    tgt = gen.data_root(dest) / "train" / src.parent.name / src.name
    shutil.copytree(src, tgt)
    return tgt / "game.tw-pddl"


# ---- generation --------------------------------------------------------------------------------
def test_expert_wins_every_task_type(env):
    tasks = env.tasks("train", "all")
    assert sorted(t.task_type for t in tasks) == sorted(gen.TASK_TYPES)
    trajs = list(collect(env, tasks))
    for t in trajs:
        assert t.success and 0 < t.num_steps <= MAX_STEPS, (t.task_id, t.actions())
        assert t.meta["generated"] is True and t.meta["action_syntax"] == "move"
        first = t.messages[0]["content"]
        assert first.startswith("-= Welcome to TextWorld, ALFRED! =-")
        assert first.endswith(f"Your task is to: {t.task}") and t.task.endswith(".")
        assert t.env_version.startswith("alfworld==")
    # the expert has its own random stream: replays are identical
    assert run_expert(env, tasks[0]).actions() == trajs[0].actions()


def test_generation_is_cached_and_deterministic(gen_dir, tmp_path):
    files = sorted(gen.data_root(gen_dir).rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    again = gen.generate(gen_dir, split="train", per_type=1, seed=0)
    assert again.cached and sum(r.built for r in again.types.values()) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # the same seed elsewhere builds the same game, byte for byte
    one = gen.generate(tmp_path, split="train", per_type=1, seed=0, task_types=["pick_and_place_simple"])
    [game] = one.games
    twin = gen.data_root(gen_dir) / game.relative_to(gen.data_root(tmp_path))
    assert game.read_bytes() == twin.read_bytes()
    assert (game.parent / "initial_state.pddl").read_text() == (twin.parent / "initial_state.pddl").read_text()


def test_split_by_scene_and_goals_not_already_true():
    train, test = set(gen.scene_numbers("train")), set(gen.scene_numbers("test"))
    assert train and test and not train & test
    for split, scenes in (("train", train), ("test", test)):
        for i in range(40):
            tt = gen.TASK_TYPES[i % 6]
            spec = gen.sample_game(tt, split, random.Random(f"t{i}"))
            assert spec is not None and spec.scene in scenes
            rtype = {r.id: r.type for r in spec.receptacles}
            targets = [(o, r) for o, t, r in spec.objects if t == spec.object_target]
            assert len(targets) >= (2 if tt == "pick_two_obj_and_place" else 1)
            if spec.parent_target:  # no target starts in a receptacle of the goal's type
                assert all(rtype[r] != spec.parent_target for _, r in targets)
            else:
                assert any(t == spec.toggle_target for _, t, _ in spec.objects)
            assert spec.task_desc.split()[0] in ("put", "clean", "heat", "cool", "find", "look", "examine")


def test_cli_generate_reuses_games(gen_dir, capsys):
    from exprag.cli import main

    rc = main(["alfworld", "generate", "--out", str(gen_dir), "--split", "train", "--per-type", "1",
               "--seed", "0", "--task-types", "easy"])
    out = capsys.readouterr().out
    assert rc == 0 and "already built" in out and "pick_clean_then_place_in_recep" in out
    rc = main(["alfworld", "generate", "--out", str(gen_dir), "--task-types", "nope"])
    assert rc == 2 and "unknown task type" in capsys.readouterr().err


def test_default_set_in_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPRAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with ALFWorldEnv(generate=False) as e:  # nothing built yet: the message names the command
        assert e.generated and str(tmp_path / "cache") in str(e.root)
        with pytest.raises(EnvError, match="exprag alfworld generate --out .* --split test"):
            e.tasks("test", ["pick_and_place_simple"])
    # an empty ~/.cache/alfworld is what `import alfworld` leaves behind, not user data
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache" / "alfworld").mkdir(parents=True)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / ".cache" / "alfworld"))
    with ALFWorldEnv(gen_per_type=1) as e:
        [task] = e.tasks("test", ["pick_and_place_simple"])
        assert task.split == "test" and task.meta["trajectory_meta"]["generated"]
        assert run_expert(e, task).success


def test_gen_seed_per_split(tmp_path, monkeypatch):
    """A {split: seed} gen_seed changes only the splits it names (the others keep seed 0, the games of
    existing configs); each (split, seed) is generated into its own directory; an int keeps its meaning."""
    from exprag.envs.alfworld import _gen_seed, default_generated_dir

    monkeypatch.setenv("EXPRAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    assert _gen_seed(None) == {"train": 0, "dev": 0, "test": 0}
    assert _gen_seed(3) == _gen_seed("3") == {"train": 3, "dev": 3, "test": 3}
    assert _gen_seed({"test": 2026}) == {"train": 0, "dev": 0, "test": 2026}
    for bad, msg in ((-1, "option gen_seed must be an integer >= 0, got -1"), (True, "option gen_seed must"),
                     ("abc", "option gen_seed must"), ({"test": 1.5}, "option gen_seed.test must"),
                     ({"valid": 1}, r"option gen_seed names unknown splits \['valid'\]")):
        with pytest.raises(EnvError, match=msg):
            ALFWorldEnv(gen_seed=bad, generate=False)
    with ALFWorldEnv(gen_seed={"test": 7}, gen_per_type=1) as e:
        assert e.split_root("train") == gen.data_root(default_generated_dir(0))
        assert e.split_root("dev") == gen.data_root(default_generated_dir(0))
        assert e.split_root("test") == gen.data_root(default_generated_dir(7))
        [test] = e.tasks("test", ["pick_heat_then_place_in_recep"])
        [train] = e.tasks("train", ["pick_heat_then_place_in_recep"])
        assert test.task_id.endswith("/trial_gen_s7_00000") and train.task_id.endswith("/trial_gen_s0_00000")
        assert Path(test.meta["game_file"]).is_relative_to(default_generated_dir(7) / gen.DATA_DIR / "valid_unseen")
        assert Path(train.meta["game_file"]).is_relative_to(default_generated_dir(0) / gen.DATA_DIR / "train")
        assert run_expert(e, test).success
    assert not (default_generated_dir(7) / gen.DATA_DIR / "train").exists()  # nothing of train under seed 7
    with ALFWorldEnv(gen_seed=7, generate=False) as e:  # an int: every split, as before
        assert e.split_root("train") == e.split_root("test") == gen.data_root(default_generated_dir(7))
        with pytest.raises(EnvError, match="--split train --per-type 50 --seed 7"):
            e.tasks("train", ["pick_and_place_simple"])


# ---- stepping ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, want", [
    ("move apple 1 to countertop 1", "move apple 1 to countertop 1"),
    ("put apple 1 in/on countertop 1", "move apple 1 to countertop 1"),
    ("Put the apple 1 in the countertop 1.", "move apple 1 to countertop 1"),
    ("  put   apple 1  on countertop 1 ", "move apple 1 to countertop 1"),
    ("place a tomato 2 into fridge 1", "move tomato 2 to fridge 1"),
    ("> Go to Cabinet1.", "go to cabinet 1"),
    ("Action: take the mug 1 from the shelf 2", "take mug 1 from shelf 2"),
    ("`open drawer 3`\nthen look", "open drawer 3"),
    ("goto sinkbasin 1", "go to sinkbasin 1"),
    ("turn on desklamp 1", "use desklamp 1"),
    ("heat potato 1 with microwave 1", "heat potato 1 with microwave 1"),
    ("look around", "look"),
    ("", ""),
])
def test_normalize_action(raw, want):
    assert normalize_action(raw) == want


def test_normalize_action_old_syntax():
    assert normalize_action("move apple 1 to countertop 1", "put") == "put apple 1 in/on countertop 1"
    assert "put OBJ in/on RECEP" in action_templates("put") and "move OBJ to RECEP" in action_templates()


def test_step_normalises_and_survives_bad_actions(env):
    task = next(t for t in env.tasks("train", ["pick_and_place_simple"]))
    reset = env.reset(task)
    assert "go to RECEP" in env.action_templates() and reset.info["admissible_commands"]
    state = random.getstate()
    argv = list(sys.argv)
    bad = env.step("dance wildly")
    assert bad.observation == "Nothing happens." and not bad.info["recognized"] and not bad.done
    assert bad.observation.startswith(env_spec("alfworld").rejections)  # dynamic retrieval skips it
    assert env.step("").observation == "Nothing happens."
    while True:  # follow the expert, but say its final move the old way
        action = env.expert_action()
        assert action is not None
        if action.startswith("move "):
            obj, recep = action[len("move "):].split(" to ")
            step = env.step(f"Put the {obj} in/on the {recep}.")
            assert step.info["command"] == action and step.info["recognized"]
            break
        env.step(action)
    assert step.won and step.done and step.reward == 1.0
    assert env.expert_action() is None
    with pytest.raises(EnvError, match="episode is over"):
        env.step("look")
    assert random.getstate() == state and sys.argv == argv  # the engine's side effects are contained


def test_step_cap(env):
    task = env.tasks("train", ["pick_heat_then_place_in_recep"])[0]
    env.reset(task)
    steps = [env.step("inventory") for _ in range(MAX_STEPS)]
    assert not any(s.done for s in steps[:-1])
    assert steps[-1].done and not steps[-1].won and steps[-1].info["truncated"]


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs(env, gen_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EnvError, match=f"no ALFWorld games under {empty}"):
        ALFWorldEnv(data_dir=empty)
    monkeypatch.setenv("ALFWORLD_DATA", str(empty))
    with pytest.raises(EnvError, match="no ALFWorld games under"):
        ALFWorldEnv()
    with pytest.raises(UnknownTaskTypeError, match="pick_and_eat"):
        env.tasks("train", ["pick_and_eat"])
    with pytest.raises(EnvError, match="unknown split"):
        env.tasks("valid", ["easy"])

    corrupt_root = tmp_path / "corrupt"
    game = _copy_game(gen_dir, corrupt_root, "pick_and_place_simple")
    with ALFWorldEnv(data_dir=corrupt_root) as e:
        with pytest.raises(EnvError, match="no game loaded"):
            e.step("look")
        [task] = e.tasks("train", "all")
        game.write_text(game.read_text()[:5000])  # truncated JSON
        with pytest.raises(EnvError, match=f"{task.task_id}|{game}") as err:
            e.reset(task)
        assert str(game) in str(err.value) and "corrupt" in str(err.value)
        data = json.loads((gen.data_root(gen_dir) / "train" / task.task_id / "game.tw-pddl").read_text())
        data["pddl_problem"] = data["pddl_problem"].replace("(:init", "(:init (", 1)  # broken PDDL
        game.write_text(json.dumps(data))
        with pytest.raises(EnvError, match=f"alfworld: {task.task_id}: cannot load"):
            e.reset(task)
        data = json.loads((gen.data_root(gen_dir) / "train" / task.task_id / "game.tw-pddl").read_text())
        game.write_text(json.dumps({**data, "solvable": False}))
        with pytest.raises(EnvError, match="marked unsolvable"):
            e.reset(task)
        with pytest.raises(EnvError, match="no playable ALFWorld games"):  # unsolvable ones are not listed
            e.tasks("train", "all")
        (game.parent / "traj_data.json").write_text("{not json")
        game.write_text(json.dumps(data))
        with pytest.raises(EnvError, match="corrupt traj_data.json"):
            e.reset(task)
        missing = TaskSpec("alfworld", "train", "pick_and_place_simple", "pick_and_place_simple-X-None-Y-1/trial_x")
        with pytest.raises(EnvError, match="not found"):
            e.reset(missing)


# ---- speed layer ---------------------------------------------------------------------------------
_STOCK = """
import json, sys
from exprag.envs.alfworld_engine import Engine
game, actions = sys.argv[1], json.loads(sys.argv[2])
e = Engine("handcoded", fast=False)
s = e.load(game, "seed")
out = [[s["feedback"], s["admissible_commands"], s["extra.expert_plan"]]]
for a in actions:
    s, _ = e.step(a)
    out.append([s["feedback"], s["admissible_commands"], s["extra.expert_plan"]])
print(json.dumps(out))
"""


def test_fast_engine_is_byte_identical(gen_dir):
    """The memoised engine shows exactly what stock textworld shows (run in a fresh process, since
    the speedups are process-wide once installed)."""
    from exprag.envs.alfworld_engine import Engine

    games = [(json.loads(g.read_text())["walkthrough"], g) for g in gen.data_root(gen_dir).rglob("game.tw-pddl")]
    actions, game = min((w, g) for w, g in games if w)
    actions = actions[:8] + ["dance", "inventory"]
    stock = subprocess.run([sys.executable, "-c", _STOCK, str(game), json.dumps(actions)],
                           capture_output=True, text=True, timeout=300)
    assert stock.returncode == 0, stock.stderr[-2000:]
    e = Engine("handcoded", fast=True)
    s = e.load(game, "seed")
    fast = [[s["feedback"], s["admissible_commands"], s["extra.expert_plan"]]]
    for a in actions:
        s, _ = e.step(a)
        fast.append([s["feedback"], s["admissible_commands"], s["extra.expert_plan"]])
    assert json.loads(stock.stdout) == fast


@pytest.mark.slow
def test_more_games_and_planner_expert(tmp_path):
    report = gen.generate(tmp_path, split="test", per_type=2, seed=1)
    assert all(r.generated == 2 for r in report.types.values())
    scenes = {json.loads((g.parent / "traj_data.json").read_text())["scene"]["scene_num"] for g in report.games}
    assert scenes <= set(gen.scene_numbers("test"))
    with ALFWorldEnv(data_dir=tmp_path) as e:
        tasks = e.tasks("test", "all")
        assert len(tasks) == 12
        assert all(t.success for t in collect(e, tasks))
    with ALFWorldEnv(data_dir=tmp_path, expert="planner") as e:
        for task in e.tasks("test", ["pick_two_obj_and_place", "look_at_obj_in_light"]):
            assert run_expert(e, task).success, task.task_id
