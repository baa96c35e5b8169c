"""Task-type splits (easy / hard) as data, and the split manifest written beside every collection.

A built-in env's split is in data/splits.yaml; another env's in its EnvSpec (``envs/registry.py``)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from exprag.envs.base import TaskSpec, TextEnv
from exprag.envs.registry import check_env, env_spec
from exprag.errors import UnknownTaskTypeError
from exprag.io import atomic_write_json


@lru_cache(maxsize=1)
def _bundled() -> dict[str, dict[str, list[str]]]:
    text = resources.files("exprag").joinpath("data/splits.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _splits(env: str) -> Mapping[str, Iterable[str]]:
    spec = env_spec(env)
    return spec.splits if spec.splits is not None else _bundled()[env]


def split_types(env: str, split: str) -> list[str]:
    """The task types of ``easy`` or ``hard`` for an env."""
    return list(_splits(env)[split])


def all_types(env: str) -> list[str]:
    return split_types(env, "easy") + split_types(env, "hard")


def type_split(env: str, task_type: str) -> str:
    """'easy' or 'hard' for a task type."""
    for name in ("easy", "hard"):
        if task_type in _splits(env)[name]:
            return name
    raise UnknownTaskTypeError(f"unknown task type {task_type!r} for env {env!r}")


def resolve_task_types(env: str, spec: str | Iterable[str]) -> list[str]:
    """``easy`` | ``hard`` | ``all`` | a comma list of task types (names may be mixed with groups)."""
    check_env(env)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    known = all_types(env)
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item in ("easy", "hard"):
            names = split_types(env, item)
        elif item == "all":
            names = known
        elif item in known:
            names = [item]
        else:
            raise UnknownTaskTypeError(
                f"unknown task type {item!r} for env {env!r}; use easy, hard, all or one of: {', '.join(known)}"
            )
        out.extend(n for n in names if n not in out)
    if not out:
        raise UnknownTaskTypeError(f"no task types given for env {env!r}")
    return out


# ---- deriving a split from per-type task counts -------------------------------------------------
# The paper gives only the sizes of its ScienceWorld split and a few example types per side;
# docs/scienceworld-split.md derives the lists with these functions (scripts/derive_scienceworld_split.py).


@dataclass(frozen=True)
class SplitSizes:
    """Tasks (ScienceWorld: variations) of the easy and hard types, in the train and test splits."""

    easy_train: int
    easy_test: int
    hard_train: int
    hard_test: int


# The paper's ScienceWorld split: 17 easy / 13 hard types of these sizes, with these examples.
# "mendelian-genetics" names one of the two mendelian-genetics-* types (or both).
PAPER_SCIENCEWORLD_SIZES = SplitSizes(easy_train=2335, easy_test=1183, hard_train=1254, hard_test=636)
PAPER_SCIENCEWORLD_EASY_EXAMPLES = ("find-plant", "find-animal", "boil", "melt", "freeze")
PAPER_SCIENCEWORLD_HARD_EXAMPLES = ("chemistry-mix", "mendelian-genetics", "grow-plant", "test-conductivity")


def task_counts(env: TextEnv, task_types: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{task type: (train tasks, test tasks)}`` as the env lists them."""
    return {t: (len(env.tasks("train", [t])), len(env.tasks("test", [t]))) for t in task_types}


def split_sizes(counts: Mapping[str, tuple[int, int]], easy: Iterable[str]) -> SplitSizes:
    """Sizes of the split whose easy side is ``easy`` (every other type is hard)."""
    easy = set(easy)
    e = [sum(c[i] for t, c in counts.items() if t in easy) for i in (0, 1)]
    h = [sum(c[i] for t, c in counts.items() if t not in easy) for i in (0, 1)]
    return SplitSizes(easy_train=e[0], easy_test=e[1], hard_train=h[0], hard_test=h[1])


def fitting_splits(counts: Mapping[str, tuple[int, int]], n_easy: int, easy_train: tuple[int, int],
                   easy_test: int, easy_fixed: Iterable[str] = (), hard_fixed: Iterable[str] = ()
                   ) -> list[frozenset[str]]:
    """Every easy side of ``n_easy`` types that holds ``easy_fixed`` and none of ``hard_fixed``, whose
    test tasks sum to exactly ``easy_test`` and train tasks to ``easy_train`` (an inclusive range:
    a simulator may list a few more train tasks than the sizes being matched were counted on).

    Depth-first over the free types, largest train count first; a branch stops once it overshoots a
    target or can no longer reach the train range with its largest remaining types."""
    easy_fixed, hard_fixed = set(easy_fixed), set(hard_fixed)
    lo, hi = easy_train
    free = sorted((t for t in counts if t not in easy_fixed | hard_fixed), key=lambda t: (-counts[t][0], t))
    prefix = [0]
    for t in free:
        prefix.append(prefix[-1] + counts[t][0])
    need = n_easy - len(easy_fixed)
    base = split_sizes({t: counts[t] for t in easy_fixed}, easy_fixed)
    out: list[frozenset[str]] = []

    def walk(i: int, chosen: list[str], train: int, test: int) -> None:
        if train > hi or test > easy_test:
            return
        k = need - len(chosen)
        if k == 0:
            if train >= lo and test == easy_test:
                out.append(frozenset(easy_fixed | set(chosen)))
            return
        if len(free) - i < k or train + prefix[i + k] - prefix[i] < lo:
            return
        t = free[i]
        walk(i + 1, chosen + [t], train + counts[t][0], test + counts[t][1])
        walk(i + 1, chosen, train, test)

    if need >= 0:
        walk(0, [], base.easy_train, base.easy_test)
    return out


def split_families(easy: Iterable[str], families: Mapping[str, str]) -> list[str]:
    """The families (``{task type: family}``) that have types on both sides of the split."""
    easy = set(easy)
    sides: dict[str, set[bool]] = {}
    for t, fam in families.items():
        sides.setdefault(fam, set()).add(t in easy)
    return sorted((f for f, s in sides.items() if len(s) == 2), key=_natural)


def scienceworld_families() -> dict[str, str]:
    """``{task type: family}`` from the task ids of the installed ScienceWorld ("3-4" is family 3:
    the four electricity tasks); read from the package's tasks.json, no simulator needed."""
    from scienceworld.constants import TASKS

    return {t["task_name"]: t["task_id"].split("-")[0] for t in TASKS}


def _natural(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.split("-"))


def select_tasks(tasks: list[TaskSpec], per_type: int | None = None, limit: int | None = None,
                 sample: bool = False, seed: int = 2025) -> list[TaskSpec]:
    """At most ``per_type`` tasks of each type (the first ones, or a seeded sample), then ``limit``."""
    by_type: dict[str, list[TaskSpec]] = {}
    for t in tasks:
        by_type.setdefault(t.task_type, []).append(t)
    rng = random.Random(seed)
    chosen: list[TaskSpec] = []
    for group in by_type.values():
        if sample:
            group = rng.sample(group, len(group))
        chosen.extend(group[:per_type] if per_type is not None else group)
    return chosen[:limit] if limit is not None else chosen


def manifest(tasks: list[TaskSpec], **extra) -> dict:
    """Task ids + a content hash: two collections on the same tasks have the same hash."""
    ids = [f"{t.task_type}\t{t.task_id}" for t in tasks]
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    return {
        "env": tasks[0].env if tasks else None,
        "splits": sorted({t.split for t in tasks}),
        "task_types": sorted({t.task_type for t in tasks}),
        "count": len(tasks),
        "sha256": digest,
        "tasks": [{"task_type": t.task_type, "task_id": t.task_id, "split": t.split} for t in tasks],
        **extra,
    }


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def write_manifest(out: str | Path, tasks: list[TaskSpec], **extra) -> Path:
    path = manifest_path(out)
    atomic_write_json(path, manifest(tasks, **extra))
    return path


def load_manifest(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
