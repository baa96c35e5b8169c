"""TextWorldExpress: 8 fast procedurally generated games, train/dev/test seeds, gold paths.

TWX does not print the task in its observations, so the first user turn is the task description
followed by the initial observation; the task description alone is the static retrieval query.

Reproducible gold paths: a game is a pure function of (game, seed, fold), but for ``coin`` and
``twc`` the simulator's own gold agent explores by random walk with an unseeded ``scala.util.Random``
(``mkGameWithGoldPath`` creates ``new Random()``), so the expert's route and length changed from one
reset to the next. For those games we run the same gold agent on the same game through py4j with a
``Random`` seeded by the task seed, retrying up to 50 times as the simulator does; the other games'
gold agents are deterministic (cookingworld seeds its own).
"""

from __future__ import annotations

from importlib.metadata import version as _pkg_version

from exprag.envs.base import EnvBase, Reset, Step, TaskSpec, quiet_py4j
from exprag.envs.splits import all_types
from exprag.errors import EnvError, UnknownTaskTypeError

# py4j seed lists per fold; the JVM serves the same lists for every game.
_FOLDS = {"train": "getValidSeedsTrain", "dev": "getValidSeedsDev", "test": "getValidSeedsTest"}
# Step caps: gold paths are ≤ ~50 steps except cookingworld (recipe + navigation).
_MAX_STEPS = {"cookingworld": 80}
_DEFAULT_MAX_STEPS = 50
# Games whose simulator gold agent walks at random (class names in textworldexpress.goldagent).
_RANDOM_WALK_GOLD = {"coin": "CoinGoldAgent", "twc": "TWCGoldAgent"}
_GOLD_ATTEMPTS = 50  # the simulator's own limit
quiet_py4j()

ACTION_TEMPLATES = [
    "look around",
    "inventory",
    "task  (repeat the task description)",
    "move DIRECTION  (north, south, east, west)",
    "open OBJ / close OBJ  (containers and doors, e.g. open door to north)",
    "take OBJ / take OBJ from CONTAINER",
    "put OBJ in CONTAINER / put OBJ on SUPPORTER",
    "read OBJ",
    "examine OBJ",
    "eat OBJ / drink OBJ",
    "slice OBJ / chop OBJ / dice OBJ  (with a knife in inventory)",
    "cook OBJ in APPLIANCE  (stove, oven, ...)",
    "prepare meal",
    "smell OBJ / taste OBJ / touch OBJ",
]


def action_templates() -> list[str]:
    """TWX has one action syntax for every game."""
    return list(ACTION_TEMPLATES)


def leakage_group(task_id: str, scope: str = "task") -> str:
    """The trajectories that count as one task for leakage-free training memories: one game seed
    (``coin/seed12``). Every seed generates its own map, objects and goal, and seeds of one game
    share nothing more specific than the game type, so ``scene`` groups the same way."""
    return task_id


class TWXEnv(EnvBase):
    name = "twx"
    cheap_admissible = True  # the server returns valid actions with every step

    def __init__(self, env_step_limit: int = 100, game_params: str = ""):
        try:
            from textworld_express import TextWorldExpressEnv
        except ImportError as e:  # pragma: no cover - pinned dependency
            raise EnvError(f"textworld-express is not installed: {e}") from None
        self._env = TextWorldExpressEnv(envStepLimit=env_step_limit)
        self._game_params = game_params
        self._loaded: str | None = None
        self._gold: list[str] = []
        self._gold_pos = 0
        self._task: TaskSpec | None = None
        self._seeds: dict[str, list[int]] = {}

    @property
    def version(self) -> str:
        return f"textworld-express=={_pkg_version('textworld-express')}"

    def task_types(self) -> list[str]:
        return sorted(self._env.getGameNames())

    def _load(self, game: str) -> None:
        if self._loaded != game:
            self._env.load(game, self._game_params)
            self._loaded = game

    def _fold_seeds(self, game: str, split: str) -> list[int]:
        if split not in _FOLDS:
            raise EnvError(f"unknown split {split!r} for twx (choose train, dev or test)")
        if split not in self._seeds:
            self._load(game)
            self._seeds[split] = list(getattr(self._env, _FOLDS[split])())
        return self._seeds[split]

    def tasks(self, split: str, task_types: list[str]) -> list[TaskSpec]:
        games = set(self.task_types())
        out: list[TaskSpec] = []
        for t in task_types:
            if t not in games:
                raise UnknownTaskTypeError(
                    f"unknown task type {t!r} for env 'twx'; known: {', '.join(all_types('twx'))}"
                )
            for seed in self._fold_seeds(t, split):
                out.append(TaskSpec("twx", split, t, f"{t}/seed{seed}", {"seed": seed}))
        return out

    def reset(self, task: TaskSpec) -> Reset:
        game, _, seed_s = task.task_id.partition("/seed")
        if game != task.task_type or not seed_s.isdigit():
            raise EnvError(f"twx task id {task.task_id!r} is not of the form GAME/seedN")
        try:
            self._load(game)
            seeded = game in _RANDOM_WALK_GOLD
            obs, info = self._env.reset(seed=int(seed_s), gameFold=task.split, generateGoldPath=not seeded)
            self._gold = (self._seeded_gold(game, int(seed_s), task.split) if seeded
                          else list(self._env.getGoldActionSequence()))
        except EnvError:
            raise
        except Exception as e:  # py4j errors: name the task, hide the JVM trace
            raise EnvError(f"twx could not start task {task.task_id} ({task.split}): {e}") from None
        self._gold_pos = 0
        self._task = task
        desc = info["taskDescription"].strip()
        return Reset(observation=f"{desc}\n\n{obs.strip()}", task=desc, info={"seed": int(seed_s)})

    def _seeded_gold(self, game: str, seed: int, fold: str) -> list[str]:
        """The simulator's gold agent on a fresh copy of the game, its random walk seeded by ``seed``."""
        jvm = self._env._gateway.jvm
        agent_cls = getattr(jvm.textworldexpress.goldagent, _RANDOM_WALK_GOLD[game])
        generator = self._env.server.gameGenerator()
        rng = jvm.scala.util.Random(seed)
        for _ in range(_GOLD_ATTEMPTS):
            found = agent_cls(generator.mkGame(seed, fold)).mkGoldPath(rng)
            # A scala.Tuple2; the gateway's auto_field reads _1 / _2 as fields, not accessors.
            if bool(found._1):
                return [str(a) for a in found._2]
        raise EnvError(f"twx: no gold path for {game}/seed{seed} ({fold}) after {_GOLD_ATTEMPTS} attempts")

    def step(self, action: str) -> Step:
        if self._task is None:
            raise EnvError("twx: step() before reset()")
        action = " ".join(action.strip().split())
        if self._gold_pos < len(self._gold) and action == self._gold[self._gold_pos]:
            self._gold_pos += 1
        obs, _, done, info = self._env.step(action)
        return Step(
            observation=obs.strip(),
            reward=float(info["score"]),
            done=bool(done),
            won=bool(info["tasksuccess"]),
            info={"valid_actions": info.get("validActions")},
        )

    def expert_action(self) -> str | None:
        if self._gold_pos < len(self._gold):
            return self._gold[self._gold_pos]
        return None

    def admissible_actions(self) -> list[str]:
        hist = self._env.getRunHistory()["history"]
        return list(hist[-1].get("validActions", [])) if hist else []

    def action_templates(self) -> list[str]:
        return action_templates()

    def max_steps(self, task: TaskSpec) -> int:
        return _MAX_STEPS.get(task.task_type, _DEFAULT_MAX_STEPS)

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            try:
                env.close()
            except Exception:
                pass
