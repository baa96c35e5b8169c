"""ALFWorld (text): the official games when the user has them, games generated offline otherwise.

Data, first found wins:
1. ``ALFWorldEnv(data_dir=...)`` or the ``ALFWORLD_DATA`` variable: a directory holding the official
   ``json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/game.tw-pddl`` layout (or the
   ``json_2.1.1`` directory itself). Splits: train = train, dev = valid_seen, test = valid_unseen.
2. Otherwise a set generated from the ALFRED scenes shipped in the alfworld wheel
   (``exprag.envs.alfworld_gen``), kept under ``$EXPRAG_CACHE/alfworld`` (default
   ``~/.cache/exprag/alfworld``) and built on first use. Trajectories of generated games carry
   ``meta.generated = True``: their numbers are not comparable with published ALFWorld results.

Observations are the engine's text, unchanged (the first one starts with ALFWorld's welcome banner
and ends with "Your task is to: ..."); success is ALFWorld's ``won``; the step cap is 50 (docs/method.md#evaluation).
Actions are normalised first (``normalize_action``): ALFWorld 0.4 spells ``put X in/on Y`` as
``move X to Y``; both spellings and common variants reach the engine in its own syntax.
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any, Callable

from exprag.envs import alfworld_gen as gen
from exprag.envs.base import EnvBase, Reset, Step, TaskSpec, parse_action
from exprag.envs.splits import resolve_task_types
from exprag.errors import EnvError

MAX_STEPS = 50
TASK_TYPES = gen.TASK_TYPES
SPLIT_DIRS = gen.SPLIT_DIRS
# games the env generates for itself when no data is given (test ~ the 134 games of valid_unseen)
DEFAULT_GEN_PER_TYPE = {"train": 50, "dev": 10, "test": 22}
_TASK_RE = re.compile(r"Your task is to:\s*(.+?)\s*$", re.S)


def _per_split(option: str, value: Any, defaults: dict[str, int], least: int) -> dict[str, int]:
    """An option given per split: None (``defaults``), one integer >= ``least`` for every split, or a
    {split: integer} mapping whose missing splits keep their default; anything else is an EnvError
    naming the option."""
    def number(v: Any, where: str) -> int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.isascii() and v.isdigit())) \
                or int(v) < least:
            raise EnvError(f"alfworld: option {where} must be an integer >= {least}, got {v!r}")
        return int(v)

    if value is None:
        return dict(defaults)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SPLIT_DIRS))
        if unknown:
            raise EnvError(f"alfworld: option {option} names unknown splits {unknown} "
                           f"(choose among {', '.join(SPLIT_DIRS)})")
        return {**defaults, **{k: number(v, f"{option}.{k}") for k, v in value.items()}}
    n = number(value, option)
    return {s: n for s in SPLIT_DIRS}


def _gen_per_type(value: Any) -> dict[str, int]:
    """``gen_per_type``: games generated per task type, per split (configs give a mapping)."""
    return _per_split("gen_per_type", value, DEFAULT_GEN_PER_TYPE, 1)


def _gen_seed(value: Any) -> dict[str, int]:
    """``gen_seed``: the generation seed per split, 0 where not given, so that a new test seed leaves
    the train and dev games as they were."""
    return _per_split("gen_seed", value, {s: 0 for s in SPLIT_DIRS}, 0)


def cache_dir() -> Path:
    """exprag's cache directory: ``$EXPRAG_CACHE`` or ``~/.cache/exprag``."""
    return Path(os.environ.get("EXPRAG_CACHE") or Path.home() / ".cache" / "exprag")


def default_generated_dir(seed: int = 0) -> Path:
    return cache_dir() / "alfworld" / f"generated-v{gen.GENERATOR_VERSION}-s{seed}"


# ---- leakage groups ---------------------------------------------------------------------------------
def leakage_group(task_id: str, scope: str = "task") -> str:
    """The trajectories that count as one task when training memories must not leak the example.

    A task id is ``<task folder>/<trial>`` (official ``json_2.1.1`` and generated games alike). The
    trials of one folder are the same scene, goal and task text, so ``task`` groups by folder.
    The folder name ends with the ALFRED scene (floorplan) number,
    ``pick_and_place_simple-Book-None-Desk-313`` -> 313, so ``scene`` groups every task of one
    scene; a folder without a trailing number stays its own group."""
    folder = task_id.split("/", 1)[0]
    if scope == "scene":
        scene = folder.rsplit("-", 1)[-1]
        if scene.isdigit() and "-" in folder:
            return f"scene-{int(scene)}"
    return folder


# ---- action normalisation ---------------------------------------------------------------------------
_PUT_RE = re.compile(r"(?:put|place|move)\s+(.+?)\s+(?:in/on|in or on|into|onto|inside|in|on|to)\s+(.+)")
_ALIASES = {
    "look around": "look",
    "check inventory": "inventory",
    "inv": "inventory",
    "i": "inventory",
}


def normalize_action(text: str, syntax: str = "move") -> str:
    """A model's action in the engine's syntax: ``move X to Y`` (``syntax='move'``, alfworld >= 0.4)
    or ``put X in/on Y`` (``'put'``, older games). Also accepted: ``put/place X in|on|into Y``,
    capitals, extra whitespace, a trailing period, articles ("the", "a"), "cabinet1" for "cabinet 1",
    a leading ``>`` or ``Action:``, surrounding quotes; only the first non-empty line is read."""
    s = parse_action(str(text)) or ""  # the first line, without prefixes and quotes
    s = " ".join(s.lower().split()).rstrip(".!;, ").strip("`'\"")
    s = re.sub(r"\b(?:the|a|an)\s+", "", s)
    s = re.sub(r"\b([a-z]+)(\d+)\b", r"\1 \2", s)
    s = re.sub(r"^goto\b", "go to", s)
    s = re.sub(r"^(?:pick up|grab|get)\s+(.+?)\s+from\s+", r"take \1 from ", s)
    s = re.sub(r"^(?:toggle|turn on|switch on)\s+", "use ", s)
    s = _ALIASES.get(s, s)
    m = _PUT_RE.fullmatch(s)
    if m:
        obj, recep = m.groups()
        s = f"move {obj} to {recep}" if syntax == "move" else f"put {obj} in/on {recep}"
    return s


def action_templates(syntax: str = "move") -> list[str]:
    """ALFWorld's global command list (its ``help``), in the engine's syntax."""
    put = "move OBJ to RECEP" if syntax == "move" else "put OBJ in/on RECEP"
    return [
        "look",
        "inventory",
        "go to RECEP",
        "open RECEP",
        "close RECEP",
        "take OBJ from RECEP",
        put,
        "examine OBJ",
        "examine RECEP",
        "use OBJ",
        "heat OBJ with RECEP",
        "clean OBJ with RECEP",
        "cool OBJ with RECEP",
        "slice OBJ with OBJ",
    ]


# ---- data -------------------------------------------------------------------------------------------
def _alfworld_default_data() -> Path:
    return Path.home() / ".cache" / "alfworld"  # where `import alfworld` points ALFWORLD_DATA when unset


def find_root(path: str | Path) -> Path | None:
    """The directory holding the split folders (train, valid_seen, valid_unseen), or None."""
    path = Path(path).expanduser()
    for cand in (path / gen.DATA_DIR, path):
        if any((cand / d).is_dir() for d in SPLIT_DIRS.values()):
            return cand
    return None


def list_games(root: Path, split: str) -> list[tuple[str, str, Path]]:
    """(task id, task type, game file) of the playable games of a split, sorted by id; like
    ``AlfredTWEnv.collect_game_files``: movable/sliced tasks and unsolvable games are skipped."""
    split_dir = root / SPLIT_DIRS[split]
    out = []
    for traj_path in sorted(split_dir.glob("*/*/traj_data.json")):
        game_dir = traj_path.parent
        tid = f"{game_dir.parent.name}/{game_dir.name}"
        if "movable" in tid or "Sliced" in tid:
            continue
        game_file = game_dir / "game.tw-pddl"
        if not game_file.is_file():
            continue
        task_type = tid.split("-", 1)[0]
        if task_type not in TASK_TYPES:
            task_type = _read_json(traj_path, tid).get("task_type", "")
        if task_type not in TASK_TYPES:
            continue
        if not _solvable(game_file, tid):
            continue
        out.append((tid, task_type, game_file))
    return out


def _read_json(path: Path, tid: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EnvError(f"alfworld: {tid}: corrupt {path.name} at {path} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise EnvError(f"alfworld: {tid}: corrupt {path.name} at {path} (not a JSON object)")
    return data


def _solvable(game_file: Path, tid: str) -> bool:
    # AlfredTWEnv reads the whole game file for this flag; its last few hundred bytes hold it when
    # the file was written by alfworld-generate or by us (json.dump keeps key order)
    try:
        with game_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", "replace")
    except OSError as e:
        raise EnvError(f"alfworld: {tid}: cannot read {game_file} ({e})") from None
    m = re.search(r'"solvable":\s*(true|false|null)', tail)
    if m:
        return m.group(1) == "true"
    return _read_json(game_file, tid).get("solvable") is True


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


# ---- the environment --------------------------------------------------------------------------------
class ALFWorldEnv(EnvBase):
    """ALFWorld through the TextEnv protocol.

    ``data_dir``: official (or previously generated) games; default ``$ALFWORLD_DATA``, else a
    generated set. ``expert``: 'handcoded' (default), 'planner' or None (agent-only, a bit faster).
    ``generate``: build the generated set on first use (else raise, naming the command to run).
    ``gen_seed`` / ``gen_per_type``: the generated set (per split, or one number for all splits). Each
    (split, seed) lives in its own place, ``generated-v<V>-s<seed>/json_2.1.1/<split dir>``, so a split
    with another seed never mixes its games with another seed's.
    ``fast``: memoised engine (byte-identical text, several times faster); False does not install the
    memoisation (it is process-wide once any fast engine installed it).
    ``on_generate``: progress callback ``(task_type, solvable)`` while games are being generated."""

    name = "alfworld"
    cheap_admissible = True  # the engine lists admissible commands after every step anyway

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        expert: str | None = "handcoded",
        generate: bool | str = True,
        gen_seed: int | dict[str, int] | None = None,
        gen_per_type: int | dict[str, int] | None = None,
        fast: bool | str = True,
        on_generate: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.expert = None if expert in (None, "", "none", "None") else str(expert)
        self.fast = _as_bool(fast)
        self.generate = _as_bool(generate)
        self.gen_seeds = _gen_seed(gen_seed)
        self.gen_per_type = _gen_per_type(gen_per_type)
        self.on_generate = on_generate
        self.root, self.generated = self._resolve_data(data_dir)
        self._engine = None
        self._task: TaskSpec | None = None
        self._state: dict[str, Any] | None = None
        self._steps = 0
        self._done = False
        self._syntax = "move"
        self._syntax_by_root: dict[Path, str] = {}

    # ---- data source --------------------------------------------------------------------------
    def _resolve_data(self, data_dir: str | Path | None) -> tuple[Path, bool]:
        """(json_2.1.1 root, generated?) — generated means the default cache set, built on demand."""
        given = data_dir if data_dir not in (None, "") else os.environ.get("ALFWORLD_DATA")
        if given:
            root = find_root(given)
            if root is not None:
                return root, False
            implicit = data_dir in (None, "") and Path(given).expanduser() == _alfworld_default_data()
            if not implicit:  # an empty ~/.cache/alfworld is alfworld's import side effect, not a choice
                raise EnvError(
                    f"alfworld: no ALFWorld games under {given}: expected "
                    f"{gen.DATA_DIR}/{{train,valid_seen,valid_unseen}}/<task>/<trial>/game.tw-pddl there "
                    f"(official data: alfworld-download; generated: exprag alfworld generate --out {given})")
        return gen.data_root(default_generated_dir(self.gen_seeds["train"])), True

    def split_root(self, split: str) -> Path:
        """The json_2.1.1 directory holding ``split``'s games: with generated games, that of the split's
        own seed (``self.root`` is the train seed's)."""
        return gen.data_root(default_generated_dir(self.gen_seeds[split])) if self.generated else self.root

    @property
    def version(self) -> str:
        v = f"alfworld=={_pkg_version('alfworld')}"
        return v + (f"+gen-v{gen.GENERATOR_VERSION}" if self.generated else "")

    def task_types(self) -> list[str]:
        return list(TASK_TYPES)

    def _ensure_generated(self, split: str, types: list[str]) -> list[Path]:
        n = self.gen_per_type.get(split, 0)
        seed = self.gen_seeds[split]
        out_dir = self.split_root(split).parent
        pbar = None
        if self.on_generate is None:
            pbar = gen.GenerationBar(n * len(types), f"generating ALFWorld {split} games", lazy=True)
        try:
            report = gen.generate(out_dir, split=split, per_type=n, seed=seed, task_types=types,
                                  progress=self.on_generate or pbar, build=self.generate)
        finally:
            if pbar is not None:
                pbar.close()
        if report is None:
            raise EnvError(
                f"alfworld: no ALFWorld data given (data_dir / ALFWORLD_DATA) and the generated {split} set "
                f"is not built yet (generate=False); build it with: exprag alfworld generate "
                f"--out {out_dir} --split {split} --per-type {n} --seed {seed}")
        return report.games

    def tasks(self, split: str, task_types: list[str]) -> list[TaskSpec]:
        if split not in SPLIT_DIRS:
            raise EnvError(f"alfworld: unknown split {split!r} (choose one of: {', '.join(SPLIT_DIRS)})")
        types = resolve_task_types("alfworld", task_types)
        if self.generated:
            wanted = {str(p) for p in self._ensure_generated(split, types)}
            games = [g for g in list_games(self.split_root(split), split) if str(g[2]) in wanted]
        else:
            games = list_games(self.root, split)
            if not games and not any(list_games(self.root, s) for s in SPLIT_DIRS if s != split):
                raise EnvError(f"alfworld: no playable ALFWorld games under {self.root}")
        syntax = self._root_syntax(self.split_root(split), games)
        out = []
        for tid, ttype, game_file in games:
            if ttype not in types:
                continue
            # labelled in every trajectory: generated games are not comparable with published numbers
            tmeta: dict[str, Any] = {"generated": self.generated or "/trial_gen_" in tid, "action_syntax": syntax}
            if tmeta["generated"]:
                tmeta["generator"] = f"{gen.GENERATOR} v{gen.GENERATOR_VERSION}"
            out.append(TaskSpec(env=self.name, split=split, task_type=ttype, task_id=tid,
                                meta={"game_file": str(game_file), "trajectory_meta": tmeta}))
        return out

    def _root_syntax(self, root: Path, games: list[tuple[str, str, Path]]) -> str:
        # a data release is written with one grammar: read it from one game
        if root not in self._syntax_by_root and games:
            from exprag.envs.alfworld_engine import action_syntax, read_game

            self._syntax_by_root[root] = action_syntax(read_game(games[0][2])["grammar"])
        return self._syntax_by_root.get(root, "move")

    def max_steps(self, task: TaskSpec) -> int:
        return MAX_STEPS

    # ---- episodes -----------------------------------------------------------------------------
    def _game_file(self, task: TaskSpec) -> Path:
        if task.meta.get("game_file"):
            return Path(task.meta["game_file"])
        if task.split not in SPLIT_DIRS:
            raise EnvError(f"alfworld: {task.task_id}: unknown split {task.split!r}")
        return self.split_root(task.split) / SPLIT_DIRS[task.split] / task.task_id / "game.tw-pddl"

    def reset(self, task: TaskSpec) -> Reset:
        from exprag.envs.alfworld_engine import Engine, action_syntax, read_game

        self._task, self._state, self._done = None, None, False  # a failed reset leaves nothing to step
        if task.task_type not in TASK_TYPES:
            raise EnvError(f"alfworld: {task.task_id}: unknown task type {task.task_type!r} "
                           f"(one of: {', '.join(TASK_TYPES)})")
        game_file = self._game_file(task)
        data = read_game(game_file)
        if data.get("solvable") is False:
            raise EnvError(f"alfworld: {task.task_id}: {game_file} is marked unsolvable")
        if self.expert:  # alfworld's expert reads its targets from traj_data.json beside the game
            traj_path = game_file.parent / "traj_data.json"
            if not traj_path.is_file():
                raise EnvError(f"alfworld: {task.task_id}: the expert needs {traj_path}")
            if "pddl_params" not in _read_json(traj_path, task.task_id):
                raise EnvError(f"alfworld: {task.task_id}: {traj_path} has no pddl_params (the expert's targets)")
        if self._engine is None:
            self._engine = Engine(self.expert, fast=self.fast)
        try:
            state = self._engine.load(game_file, seed=task.task_id)
        except EnvError:
            raise
        except Exception as e:  # PDDL / grammar errors of a damaged game
            raise EnvError(f"alfworld: {task.task_id}: cannot load {game_file} "
                           f"({type(e).__name__}: {str(e).strip()[:300]})") from None
        self._task, self._state, self._steps = task, state, 0
        self._syntax = action_syntax(data["grammar"])
        obs = state["feedback"]
        m = _TASK_RE.search(obs)
        desc = m.group(1) if m else ""
        generated = task.meta.get("trajectory_meta", {}).get("generated", self.generated)
        info = {"game_file": str(game_file), "admissible_commands": list(state["admissible_commands"]),
                "action_syntax": self._syntax, "generated": bool(generated)}
        return Reset(observation=obs, task=desc, info=info)

    def _current(self) -> TaskSpec:
        if self._task is None or self._state is None:
            raise EnvError("alfworld: no game loaded; call reset(task) first")
        return self._task

    @property
    def action_syntax(self) -> str:
        """The current game's: ``move`` (alfworld >= 0.4) or ``put``."""
        return self._syntax

    def normalize_action(self, text: str) -> str:
        """``normalize_action`` in the current game's syntax."""
        return normalize_action(text, self._syntax)

    def step(self, action: str) -> Step:
        task = self._current()
        if self._done:
            raise EnvError(f"alfworld: {task.task_id}: the episode is over; call reset(task)")
        if not isinstance(action, str):
            raise EnvError(f"alfworld: {task.task_id}: an action must be a string, got {type(action).__name__}")
        admissible = self._state["admissible_commands"]
        command = normalize_action(action, self._syntax)
        if command not in admissible and action.strip() in admissible:
            command = action.strip()
        try:
            state, _ = self._engine.step(command)
        except Exception as e:
            raise EnvError(f"alfworld: {task.task_id}: step {action!r} failed "
                           f"({type(e).__name__}: {str(e).strip()[:300]})") from None
        self._state = state
        self._steps += 1
        won = bool(state["won"])
        truncated = not won and self._steps >= MAX_STEPS
        self._done = won or truncated
        info = {"command": command, "recognized": command in admissible, "truncated": truncated,
                "admissible_commands": list(state["admissible_commands"])}
        return Step(observation=state["feedback"], reward=1.0 if won else 0.0, done=self._done, won=won, info=info)

    def expert_action(self) -> str | None:
        """The hand-coded (or planner) expert's next action; None once the episode is over or the
        expert has given up."""
        task = self._current()
        if not self.expert:
            raise EnvError(f"alfworld: {task.task_id}: expert_action() needs "
                           f"ALFWorldEnv(expert='handcoded' or 'planner')")
        if self._done:
            return None
        plan = self._state.get("extra.expert_plan") or []
        return plan[0] if plan else None

    def expert_error(self) -> str | None:
        """Why the expert gave up, if it did."""
        return self._state.get("extra.expert_error") if self._state else None

    def admissible_actions(self) -> list[str]:
        self._current()
        return list(self._state["admissible_commands"])

    def action_templates(self) -> list[str]:
        return action_templates(self._syntax)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._task = self._state = None
