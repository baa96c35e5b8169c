"""ScienceWorld (``scienceworld==1.2.3``) behind the TextEnv protocol.

The simulator is a Scala program reached through a py4j gateway; one JVM per ``ScienceWorldEnv``,
started on first use and stopped by ``close()`` (or the ``with`` block).

Fast stepping: the package's ``ScienceWorldEnv.step`` enumerates every valid action-object
combination after each action (plus look / inventory / task-description calls), which dominates its
cost. The simulator's own ``PythonInterface.step`` does not; we call it and then read the score,
completion flag and move count, which is all an agent loop needs. ``admissible_actions()`` enumerates
only when asked. ``fast_step=False`` goes through the package's ``step`` (for comparison).

Tasks are ``(task type, variation)``; the train / dev / test variation lists are ScienceWorld's
official ones. Success is the full score (100), as in the paper (docs/method.md#evaluation).

Quirks passed on as they are: unknown input answers "No known action matches that input."; an
ambiguous one lists numbered choices and expects the number as the next action; the simulator is not
deterministic across loads (the gold route, the order objects are listed in, a thermometer reading
or the tick a circuit powers up can differ between two resets of the same variation).

A JVM that dies (killed, out of memory) is restarted: a reset retries once on a fresh JVM; a step
raises ``EnvRestarted`` (the episode is lost; the expert and agent loops replay it from its start
once), and the next reset starts the new JVM. py4j's own log records of the broken connection are
kept off stderr (``quiet_py4j``; the error we raise says it in one line).
"""

from __future__ import annotations

import re
from itertools import groupby
from typing import Any

from exprag.envs.base import EnvBase, EnvRestarted, Reset, Step, TaskSpec, quiet_py4j
from exprag.errors import EnvError, UnknownTaskTypeError

SPLITS = ("train", "dev", "test")
quiet_py4j()

_TASK_ID = re.compile(r"^(?P<type>[a-z0-9-]+)/var(?P<var>\d+)$")

# Default step cap per task type: max(100, 1.25 x the longest gold sequence measured, rounded up to
# ten). Measured over every variation of boil / melt / freeze / change-the-state / grow-* / chemistry-mix
# / identify-life-stages-1 / the inclined planes (100 spread for friction-named), 60-75 spread ones of
# test-conductivity and measure-melting-point-*, 8 of the others; inclined-plane lengths are after
# ``compress_polls`` (raw: up to 793). Longest gold: boil 182, melt 150, mendelian ~136, named 93.
DEFAULT_STEP_LIMITS: dict[str, int] = {
    "boil": 230, "melt": 190, "freeze": 180, "change-the-state-of-matter-of": 170,
    "use-thermometer": 100, "measure-melting-point-known-substance": 100,
    "measure-melting-point-unknown-substance": 120, "power-component": 100,
    "power-component-renewable-vs-nonrenewable-energy": 100, "test-conductivity": 100,
    "test-conductivity-of-unknown-substances": 100, "find-living-thing": 100,
    "find-non-living-thing": 100, "find-plant": 100, "find-animal": 100, "grow-plant": 100,
    "grow-fruit": 130, "chemistry-mix": 100, "chemistry-mix-paint-secondary-color": 100,
    "chemistry-mix-paint-tertiary-color": 100, "lifespan-longest-lived": 100,
    "lifespan-shortest-lived": 100, "lifespan-longest-lived-then-shortest-lived": 100,
    "identify-life-stages-1": 100, "identify-life-stages-2": 100,
    "inclined-plane-determine-angle": 100, "inclined-plane-friction-named-surfaces": 120,
    "inclined-plane-friction-unnamed-surfaces": 100, "mendelian-genetics-known-plant": 170,
    "mendelian-genetics-unknown-plant": 170,
}
_FALLBACK_STEP_LIMIT = 100

# The simulator's own templates (``getPossibleActions`` on an electrical task under "easy", the
# superset over tasks), less "reset task": it restarts the episode mid-trajectory, so agents are never
# offered it (typing it still reaches the simulator). A test checks this list against the JVM.
RAW_TEMPLATES = (
    "activate OBJ", "close OBJ", "connect OBJ to OBJ", "deactivate OBJ", "disconnect OBJ",
    "dunk OBJ in OBJ", "eat OBJ", "flush OBJ", "focus on OBJ", "go OBJ", "inventory", "look around",
    "look at OBJ", "look in OBJ", "mix OBJ", "move OBJ to OBJ", "open OBJ", "pick up OBJ",
    "pour OBJ in OBJ", "put down OBJ", "read OBJ", "task", "teleport OBJ", "use OBJ on OBJ", "wait",
    "wait1",
)

# The same, readable, for the agent's system prompt (default "easy" simplification).
ACTION_TEMPLATES = [
    "look around  (describe the current room)",
    "look at OBJ / look in OBJ  (describe an object / a container's contents)",
    "open OBJ / close OBJ  (containers and doors, e.g. open door to kitchen)",
    "activate OBJ / deactivate OBJ  (devices, e.g. activate stove)",
    "go to LOC  (an adjacent room, e.g. go to kitchen)",
    "teleport to LOC  (any room, e.g. teleport to kitchen)",
    "pick up OBJ / put down OBJ",
    "move OBJ to OBJ  (e.g. move metal pot to stove)",
    "pour OBJ in OBJ / dunk OBJ in OBJ",
    "mix OBJ  (chemically mix a container's contents)",
    "use OBJ on OBJ  (e.g. use thermometer on water)",
    "connect OBJ to OBJ / disconnect OBJ  (electrical components, e.g. connect battery anode to orange wire)",
    "read OBJ / eat OBJ / flush OBJ",
    "focus on OBJ  (mark the object the task is about; focusing on a wrong object ends the episode)",
    "wait / wait1  (let 10 / 1 time steps pass)",
    "inventory  (list what you carry)",
    "task  (repeat the task description)",
]


# The simplification decides the one difference between action sets: teleport exists only with
# teleportAction ("easy" includes it). Trajectories record which (``Trajectory.action_syntax``).
SYNTAXES = ("teleport", "no-teleport")


def syntax_for(simplification: str) -> str:
    parts = set(simplification.split(","))
    return "teleport" if "easy" in parts or "teleportAction" in parts else "no-teleport"


def action_templates(syntax: str = "teleport") -> list[str]:
    """ACTION_TEMPLATES of an action syntax (``SYNTAXES``)."""
    if syntax not in SYNTAXES:
        raise EnvError(f"scienceworld: unknown action syntax {syntax!r} (one of: {', '.join(SYNTAXES)})")
    return [t for t in ACTION_TEMPLATES if syntax == "teleport" or not t.startswith("teleport")]


def templates_for(simplification: str) -> list[str]:
    """ACTION_TEMPLATES for a simplification string."""
    return action_templates(syntax_for(simplification))


def task_id(task_type: str, variation: int) -> str:
    return f"{task_type}/var{variation}"


def parse_task_id(tid: str) -> tuple[str, int]:
    m = _TASK_ID.match(tid)
    if not m:
        raise EnvError(f"scienceworld: malformed task id {tid!r} (expected 'TASK_TYPE/varN')")
    return m["type"], int(m["var"])


def leakage_group(task_id: str, scope: str = "task") -> str:
    """The trajectories that count as one task for leakage-free training memories: one variation
    (``boil/var12``). Variations of a type differ in their objects and substances; there is no
    scene identity finer than the variation, so ``scene`` groups the same way."""
    return task_id


# Ticks of simulated time per action (the move counter): "look at X" 1, "wait1" 2, "wait" 11.
_WAIT, _WAIT_TICKS, _WAIT1, _WAIT1_TICKS = "wait", 11, "wait1", 2
_MIN_POLL_RUN = 12


def compress_polls(actions: list[str]) -> list[str]:
    """Shorten the gold agent's polling loops without changing the simulated time.

    In the inclined-plane tasks the gold agent watches a block slide with one "look at PLANE" per
    tick, up to 700 in a row on a high-friction surface (gold sequences of up to ~800 actions). A run
    of k >= 12 identical "look at" actions keeps its first and last look and fills the k - 2 ticks
    between them with "wait" / "wait1" (and at most one extra look), so every later action happens at
    the same simulated time as in the original sequence.
    """
    out: list[str] = []
    for action, group in groupby(actions):
        k = len(list(group))
        if k < _MIN_POLL_RUN or not action.startswith("look at "):
            out.extend([action] * k)
            continue
        waits, rest = divmod(k - 2, _WAIT_TICKS)
        out += [action] + [_WAIT] * waits + [_WAIT1] * (rest // _WAIT1_TICKS) + [action] * (rest % _WAIT1_TICKS)
        out.append(action)
    return out


class ScienceWorldEnv(EnvBase):
    """One ScienceWorld simulator (JVM). Not thread-safe: use one instance per worker.

    Options:
      env_step_limit: step cap per episode; an int for every task, a dict ``{task_type: cap}`` that
        overrides the per-type defaults (``DEFAULT_STEP_LIMITS``), or None for the defaults.
        ``step`` reports ``done`` when the cap is reached.
      simplification: ScienceWorld simplification string. ``"easy"`` (default, as in the
        ScienceWorld examples and most LLM-agent work) = teleport action, open doors,
        self-watering flower pots, no electrical actions except in electrical tasks.
        ``""`` for none, or a comma list (``"openDoors,teleportAction"``).
      enumerate_valid: also return the valid actions in every ``info["valid"]`` (slow).
      fast_step: step through the simulator directly (default) or through the package's ``step``.
      gold: generate the gold action sequence at each reset (needed by ``expert_action``;
        False saves 0.1-1 s per reset, ~10 s for mendelian-genetics, in agent-only runs).
      compress_gold: shorten the gold agent's polling loops (``compress_polls``): the inclined-plane
        gold sequences drop from up to ~800 actions to under ~200 and still reach full score.
    """

    name = "scienceworld"

    def __init__(
        self,
        env_step_limit: int | dict[str, int] | None = None,
        simplification: str = "easy",
        enumerate_valid: bool = False,
        *,
        fast_step: bool = True,
        gold: bool = True,
        compress_gold: bool = True,
    ) -> None:
        self.env_step_limit = env_step_limit
        self.simplification = simplification
        self.enumerate_valid = enumerate_valid
        self.fast_step = fast_step
        self.gold = gold
        self.compress_gold = compress_gold
        self._sw: Any = None  # scienceworld.ScienceWorldEnv, started lazily
        self._variations: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self._task: TaskSpec | None = None
        self._gold_actions: list[str] = []
        self._gold_pos = 0
        self._steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def version(self) -> str:
        from importlib.metadata import version

        return f"scienceworld=={version('scienceworld')}"

    def _env(self) -> Any:
        if self._sw is None:
            try:
                from scienceworld import ScienceWorldEnv as _SW

                # The package's own step-limit check counts simulator moves; ours counts actions,
                # so its limit is set out of reach and ours applies on both stepping paths.
                self._sw = _SW("", envStepLimit=10**9)
            except Exception as e:  # JVM missing, jar unreadable, port trouble
                raise EnvError(f"scienceworld: could not start the simulator JVM (is Java 8+ on PATH?): {e}") from e
        return self._sw

    def _jvm_exit(self, grace: float) -> int | None:
        """The JVM's exit code when it has died (waiting up to ``grace`` seconds: its socket closes
        a moment before the process is gone), else None."""
        import subprocess

        proc = getattr(getattr(self._sw, "_gateway", None), "java_process", None)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return None

    def _dead_jvm(self, task_id: str, error: BaseException | None = None) -> str | None:
        """After a failed simulator call: when the JVM died, drop it (the next call starts a new
        one) and say so; None when it is alive (the call failed for another reason)."""
        from py4j.protocol import Py4JError, Py4JJavaError

        if self._sw is None:
            return None
        # A py4j error other than a Java exception (which came back over a live connection) is a
        # broken connection: give a dying JVM time to go. Anything else: is it gone already?
        broken = isinstance(error, Py4JError) and not isinstance(error, Py4JJavaError)
        code = self._jvm_exit(5.0 if broken else 0.0)
        if code is None:
            return None
        self.close()
        return f"scienceworld: {task_id}: the simulator JVM died (exit code {code})"

    def close(self) -> None:
        sw, self._sw = self._sw, None
        self._task = None
        if sw is None:
            return
        proc = getattr(sw._gateway, "java_process", None)
        try:
            sw.close()
        except Exception:  # the JVM may already be gone; we only want it stopped
            pass
        # The package's __del__ calls close() again on a dead gateway; make that a no-op.
        sw.close = lambda: None
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()

    # ---- tasks -------------------------------------------------------------------------------
    def task_types(self) -> list[str]:
        from scienceworld.constants import ID2TASK  # tasks.json shipped with the package; no JVM

        return list(ID2TASK.values())

    def _check_type(self, task_type: str) -> None:
        if task_type not in self.task_types():
            raise UnknownTaskTypeError(f"unknown task type {task_type!r} for env 'scienceworld'")

    def variations(self, task_type: str, split: str) -> list[int]:
        """ScienceWorld's official variation list of a task type for one split."""
        if split not in SPLITS:
            raise EnvError(f"unknown split {split!r} for scienceworld (choose train, dev or test)")
        self._check_type(task_type)
        if task_type not in self._variations:
            # The server computes the splits from the task name alone (getSets reads ``taskStr``),
            # so setting that field avoids loading the task (~0.02 s per type instead of ~1 s).
            server = self._env().server
            saved = server.taskStr()
            try:
                getattr(server, "taskStr_$eq")(task_type)
                sets = tuple(
                    [int(v) for v in vs]
                    for vs in (server.getVariationsTrain(), server.getVariationsDev(), server.getVariationsTest())
                )
            except Exception as e:
                raise EnvError(f"scienceworld: could not list the variations of {task_type!r}: {e}") from e
            finally:
                getattr(server, "taskStr_$eq")(saved)
            self._variations[task_type] = sets  # type: ignore[assignment]
        return list(self._variations[task_type][SPLITS.index(split)])

    def tasks(self, split: str, task_types: list[str]) -> list[TaskSpec]:
        return [
            TaskSpec(env=self.name, split=split, task_type=t, task_id=task_id(t, v), meta={"variation": v})
            for t in task_types
            for v in self.variations(t, split)
        ]

    def max_steps(self, task: TaskSpec) -> int:
        limit = self.env_step_limit
        if isinstance(limit, int):
            return limit
        if isinstance(limit, dict) and task.task_type in limit:
            return int(limit[task.task_type])
        return DEFAULT_STEP_LIMITS.get(task.task_type, _FALLBACK_STEP_LIMIT)

    # ---- episode -----------------------------------------------------------------------------
    def _locate(self, task: TaskSpec) -> tuple[str, int]:
        ttype, var = parse_task_id(task.task_id)
        if ttype != task.task_type:
            raise EnvError(f"scienceworld: task id {task.task_id!r} does not match task type {task.task_type!r}")
        try:
            self._check_type(ttype)
        except UnknownTaskTypeError as e:
            raise EnvError(f"scienceworld: {task.task_id}: {e}") from None
        return ttype, var

    def reset(self, task: TaskSpec) -> Reset:
        self._task = None  # a failed reset leaves no episode to step
        ttype, var = self._locate(task)
        try:
            return self._reset(task, ttype, var)
        except EnvError as e:
            died = self._dead_jvm(task.task_id, e.__cause__)
            if died is None:
                raise
        try:  # once more, on a fresh JVM
            return self._reset(task, ttype, var)
        except EnvError as e:
            again = self._dead_jvm(task.task_id, e.__cause__)
            raise EnvError(f"{died}; the restarted one failed too: {again or e}") from None

    def _reset(self, task: TaskSpec, ttype: str, var: int) -> Reset:
        sw = self._env()
        try:
            n_max = sw.server.getTaskMaxVariations(ttype)
        except Exception as e:
            raise EnvError(f"scienceworld: {task.task_id}: the simulator does not answer: {e}") from e
        if not 0 <= var < n_max:
            raise EnvError(f"scienceworld: {task.task_id}: variation {var} out of range (0..{n_max - 1})")
        try:
            # load() builds a fresh world (after playing the gold path on a scratch one when asked);
            # the package's reset() would load it all over again, so we go straight to the first move.
            sw.load(ttype, var, self.simplification, generateGoldPath=self.gold)
            look = sw.server.step("look around")
            if look.startswith("ERROR"):
                raise EnvError(look)
            desc = sw.server.getTaskDescription()
            score = int(round(100 * sw.server.getScore()))
            gold = [str(a) for a in sw.server.getGoldActionSequence()] if self.gold else []
            if self.compress_gold:
                gold = compress_polls(gold)
        except EnvError as e:
            raise EnvError(f"scienceworld: {task.task_id}: {e}") from None
        except Exception as e:  # py4j / JVM errors, invalid simplification
            raise EnvError(f"scienceworld: {task.task_id}: could not load the task: {e}") from e
        self._task, self._steps = task, 0
        self._gold_actions, self._gold_pos = gold, 0
        info: dict[str, Any] = {"score": score, "moves": 0, "variation": var, "task_type": ttype,
                                "simplification": self.simplification}
        if self.enumerate_valid:
            info["valid"] = self.admissible_actions()
        return Reset(observation=f"Task Description:\n{desc}\n\n{look}", task=desc, info=info)

    def _current(self) -> TaskSpec:
        if self._task is None or self._sw is None:
            raise EnvError("scienceworld: no task loaded; call reset(task) first")
        return self._task

    def step(self, action: str) -> Step:
        task = self._current()
        sw = self._sw
        try:
            if self.fast_step:
                obs = sw.server.step(action)
                raw = int(round(100 * sw.server.getScore()))
                completed = bool(sw.server.getCompleted())
                moves = int(sw.server.getNumMoves())
            else:
                obs, _, completed, pinfo = sw.step(action)
                raw, moves = int(pinfo["score"]), int(pinfo["moves"])
        except Exception as e:
            died = self._dead_jvm(task.task_id, e)
            if died is not None:
                raise EnvRestarted(f"{died} at step {self._steps + 1}; the episode must start over on a new JVM") from None
            raise EnvError(f"scienceworld: {task.task_id}: step {action!r} failed: {e}") from None
        self._steps += 1
        if self._gold_pos < len(self._gold_actions) and _same(action, self._gold_actions[self._gold_pos]):
            self._gold_pos += 1
        won = raw >= 100
        # A negative score is ScienceWorld's failure signal (e.g. focusing on the wrong object): the
        # episode is over. The reported reward is clamped to the documented 0..100 range.
        done = completed or raw < 0 or won or self._steps >= self.max_steps(task)
        info: dict[str, Any] = {"score": raw, "moves": moves, "completed": completed}
        if self.enumerate_valid:
            info["valid"] = self.admissible_actions()
        return Step(observation=obs, reward=float(max(raw, 0)), done=done, won=won, info=info)

    def expert_action(self) -> str | None:
        """The next gold action not yet taken (the cursor advances when ``step`` plays it)."""
        self._current()
        if not self.gold:
            raise EnvError("scienceworld: expert_action() needs ScienceWorldEnv(gold=True)")
        if self._gold_pos >= len(self._gold_actions):
            return None
        return self._gold_actions[self._gold_pos]

    def gold_actions(self) -> list[str]:
        """The whole gold action sequence of the current task (as ``expert_action`` plays it)."""
        self._current()
        return list(self._gold_actions)

    def admissible_actions(self) -> list[str]:
        task = self._current()
        try:
            return [str(a) for a in self._sw.server.getValidActionObjectCombinations()]
        except Exception as e:
            died = self._dead_jvm(task.task_id, e)
            if died is not None:
                raise EnvRestarted(f"{died}; the episode must start over on a new JVM") from None
            raise EnvError(f"scienceworld: {task.task_id}: could not enumerate valid actions: {e}") from None

    # ---- prompt material ---------------------------------------------------------------------
    @property
    def action_syntax(self) -> str:
        return syntax_for(self.simplification)

    def action_templates(self) -> list[str]:
        """ScienceWorld's action templates under this simplification, the same for every task."""
        return templates_for(self.simplification)


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())
