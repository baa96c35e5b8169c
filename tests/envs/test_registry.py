"""The env registry: built-ins by name, and an env added from outside the package through the
``exprag.envs`` entry-point group, played by ``exprag collect`` and ``exprag eval`` like a built-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exprag.envs import action_templates, env_spec
from exprag.envs.registry import EnvSpec
from exprag.errors import UnknownEnvError
from exprag.trajectory import Trajectory

SRC = Path(__file__).resolve().parents[2] / "src"

# A package of its own: a counter game whose expert says "inc" until the counter reaches the goal.
TOYENV = textwrap.dedent('''
    from exprag.envs.base import EnvBase, Reset, Step, TaskSpec
    from exprag.envs.registry import EnvSpec

    GOALS = {"short": 2, "long": 3}


    class CounterEnv(EnvBase):
        name = "toyenv"
        cheap_admissible = True

        def __init__(self, seeds: int = 2):
            self.seeds = seeds
            self.count = self.goal = 0

        @property
        def version(self):
            return "toyenv==0.0"

        def task_types(self):
            return list(GOALS)

        def tasks(self, split, task_types):
            return [TaskSpec("toyenv", split, t, f"{t}/{split}{i}") for t in task_types for i in range(self.seeds)]

        def reset(self, task):
            self.count, self.goal = 0, GOALS[task.task_type]
            desc = f"count to {self.goal}"
            return Reset(observation=f"Your task is to {desc}. The counter shows 0.", task=desc)

        def step(self, action):
            if self.normalize_action(action) == "inc":
                self.count += 1
            won = self.count >= self.goal
            return Step(observation=f"The counter shows {self.count}.", reward=float(won), done=won, won=won)

        def expert_action(self):
            return "inc" if self.count < self.goal else None

        def admissible_actions(self):
            return ["inc", "wait"]

        def normalize_action(self, text):
            return text.strip().lower()

        def action_templates(self):
            return templates()

        def max_steps(self, task):
            return 5

        def close(self):
            pass


    def templates():
        return ["inc  (add one to the counter)", "wait"]


    SPEC = EnvSpec("toyenv", CounterEnv, templates, splits={"easy": ["short"], "hard": ["long"]},
                   rejections=("The counter does not know that.",))
''')


def _dist(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[exprag.envs]\n{entry_points}\n")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A directory holding the toy env's module and its installed-distribution metadata, plus a
    broken distribution whose entry point names a module that does not exist."""
    root = tmp_path_factory.mktemp("site")
    (root / "toyenv.py").write_text(TOYENV)
    _dist(root, "toyenv", "toyenv = toyenv:SPEC")
    _dist(root, "brokenenv", "brokenenv = no_such_module:SPEC")
    return str(root)


def exprag(plugin_path: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin_path, str(SRC)])}
    return subprocess.run([sys.executable, "-m", "exprag", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_builtins_are_registered_without_importing_their_simulators():
    code = ("import sys, exprag.cli, exprag.envs as e; from exprag.envs.splits import all_types; "
            "assert e.known_envs()[:3] == ['alfworld', 'scienceworld', 'twx']; "
            "assert len(e.action_templates('alfworld')) == len(e.action_templates('twx')) == 14; all_types('twx'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('alfworld', 'scienceworld', 'textworld_express')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_templates_follow_the_recorded_syntax():
    assert "put OBJ in/on RECEP" in action_templates("alfworld", "put")
    assert action_templates("alfworld") == action_templates("alfworld", "move")
    assert any(t.startswith("teleport") for t in action_templates("scienceworld"))
    assert not any(t.startswith("teleport") for t in action_templates("scienceworld", "no-teleport"))
    assert env_spec("scienceworld").agent_defaults == {"gold": False}
    with pytest.raises(UnknownEnvError, match=r"unknown env 'minigrid' \(choose one of: alfworld, scienceworld, twx"):
        env_spec("minigrid")
    with pytest.raises(ValueError, match="splits"):
        EnvSpec("x", object, list, splits={"easy": []})


def test_trajectories_without_a_syntax_load_and_are_written_as_before():
    base = dict(id="a", env="twx", env_version="v", split="train", task_type="coin", task_id="coin/seed1",
                task="t", messages=[{"role": "user", "content": "o"}], success=True, reward=1.0, num_steps=0,
                source="expert", meta={})
    old = Trajectory.from_dict(base)
    assert old.action_syntax is None and "action_syntax" not in old.to_dict()
    new = Trajectory.from_dict({**base, "action_syntax": "put"})
    assert new.action_syntax == "put" and new.to_dict()["action_syntax"] == "put"


def test_unknown_and_broken_envs_are_one_line_errors(plugin_path):
    res = exprag(plugin_path, "collect", "--env", "minigrid", "--out", "x.jsonl")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "unknown env 'minigrid' (choose one of: alfworld, scienceworld, twx, brokenenv, toyenv)" in res.stderr
    res = exprag(plugin_path, "collect", "--env", "brokenenv", "--out", "x.jsonl")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "brokenenv = no_such_module:SPEC" in res.stderr and "ModuleNotFoundError" in res.stderr


def test_an_env_from_an_entry_point_collects_and_evaluates(plugin_path, tmp_path):
    out = tmp_path / "toy.jsonl"
    res = exprag(plugin_path, "collect", "--env", "toyenv", "--split", "train", "--task-types", "all",
                 "--env-arg", "seeds=1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    trajs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(t["task_type"], t["num_steps"], t["success"]) for t in trajs] == [("short", 2, True), ("long", 3, True)]
    assert "action_syntax" not in trajs[0]  # one syntax: nothing recorded

    run = tmp_path / "run"
    res = exprag(plugin_path, "eval", "--env", "toyenv", "--split", "test", "--task-types", "hard",
                 "--model", "smollm2-135m", "--no-bank", "--limit", "1", "--max-steps", "2",
                 "--max-new-tokens", "4", "--out", str(run))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["task_id"] == "long/test0"
    traj = json.loads((run / "trajectories.jsonl").read_text().splitlines()[0])
    assert traj["env"] == "toyenv" and traj["meta"]["agent"]["invalid_actions"] >= 0  # cheap_admissible


def test_a_plugins_rejections_join_the_builtins_once_it_is_loaded(plugin_path, monkeypatch):
    """Dynamic retrieval leaves out actions an env rejected: a plugin env's rejections count as soon
    as this process has loaded its spec."""
    from exprag.envs import registry
    from exprag.trajectory import carried_out

    monkeypatch.syspath_prepend(plugin_path)
    monkeypatch.setattr(registry, "_loaded", {})
    registry._entry_points.cache_clear()
    registry._plugin.cache_clear()
    try:
        before = registry.rejections()
        assert {"Nothing happens.", "No known action matches that input.", "Unknown action:"} <= set(before)
        assert "The counter does not know that." not in before
        registry.env_spec("toyenv")
        assert "The counter does not know that." in registry.rejections()
        msgs = [{"role": "user", "content": "The counter shows 0."}, {"role": "assistant", "content": "dance"},
                {"role": "user", "content": "The counter does not know that."},
                {"role": "assistant", "content": "inc"}, {"role": "user", "content": "The counter shows 1."}]
        assert [m["content"] for m in carried_out(msgs, registry.rejections())] == ["inc"]
    finally:
        registry._entry_points.cache_clear()
        registry._plugin.cache_clear()


def test_the_recorded_syntax_maps_back_to_the_templates_the_env_showed():
    from exprag.envs.base import Reset, TaskSpec
    from exprag.envs.scienceworld import ScienceWorldEnv
    from exprag.expert import EpisodeRecorder

    for simplification in ("easy", "", "openDoors,teleportAction", "openDoors"):
        env = ScienceWorldEnv(simplification=simplification)  # starts no JVM until used
        assert action_templates("scienceworld", env.action_syntax) == env.action_templates()
    task = TaskSpec("scienceworld", "train", "boil", "boil/var0")
    traj = EpisodeRecorder(env, task, Reset("obs", "boil water"), source="expert").trajectory()
    assert traj.action_syntax == "no-teleport" and traj.to_dict()["action_syntax"] == "no-teleport"
