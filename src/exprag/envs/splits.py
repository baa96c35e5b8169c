"""Task-type splits (easy / hard) as data, and the split manifest written beside every collection."""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable

import yaml

from exprag.envs.base import TaskSpec
from exprag.errors import UnknownEnvError, UnknownTaskTypeError
from exprag.io import atomic_write_json

ENVS = ("alfworld", "scienceworld", "twx")


@lru_cache(maxsize=1)
def _splits() -> dict[str, dict[str, list[str]]]:
    text = resources.files("exprag").joinpath("data/splits.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def check_env(env: str) -> str:
    if env not in ENVS:
        raise UnknownEnvError(f"unknown env {env!r} (choose one of: {', '.join(ENVS)})")
    return env


def split_types(env: str, split: str) -> list[str]:
    """The task types of ``easy`` or ``hard`` for an env."""
    return list(_splits()[check_env(env)][split])


def all_types(env: str) -> list[str]:
    return split_types(env, "easy") + split_types(env, "hard")


def type_split(env: str, task_type: str) -> str:
    """'easy' or 'hard' for a task type."""
    for name in ("easy", "hard"):
        if task_type in _splits()[check_env(env)][name]:
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
