"""Environments behind one TextEnv protocol, looked up by name in the registry (``envs/registry.py``:
the built-ins, and envs other packages add through the ``exprag.envs`` entry-point group)."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from exprag.envs.base import EnvBase, Reset, Step, TaskSpec, TextEnv
from exprag.envs.registry import EnvSpec, check_env, env_spec, known_envs
from exprag.errors import EnvError

__all__ = ["LEAKAGE_SCOPES", "EnvBase", "EnvSpec", "Reset", "Step", "TaskSpec", "TextEnv", "action_templates",
           "check_env", "check_env_args", "env_spec", "known_envs", "leakage_group", "make_env"]


def make_env(name: str, **kwargs: Any) -> TextEnv:
    """Start an environment by name (``alfworld``, ``scienceworld``, ``twx`` or a plugin's)."""
    return env_spec(name).make(**kwargs)


def check_env_args(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse, before anything starts, an option the env does not take or an integer option given as
    text (``--env-arg KEY=VALUE`` and a config's ``env_args``)."""
    params = inspect.signature(env_spec(name).env_factory()).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p for p, v in params.items() if p != "self" and v.kind in named]
    for key, value in kwargs.items():
        if key not in accepted:
            raise EnvError(f"--env-arg {key!r}: {name} takes no such option (it takes: {', '.join(accepted)})")
        default = params[key].default
        if isinstance(default, int) and not isinstance(default, bool) and (
                not isinstance(value, int) or isinstance(value, bool)):
            raise EnvError(f"--env-arg {key!r}: must be an integer >= 0, got {value!r}")
    return kwargs


def action_templates(name: str, syntax: str | None = None) -> list[str]:
    """An env's global action templates without starting it (for prompts built offline, e.g. training):
    those of ``syntax`` as a trajectory records it (``Trajectory.action_syntax``), else the default's."""
    return env_spec(name).action_templates(syntax)


# Leakage scopes for training memories: "task" = the same game / variation / ALFWorld task folder
# (every trial of it); "scene" additionally every task of the same ALFWorld scene.
LEAKAGE_SCOPES = ("task", "scene")


@lru_cache(maxsize=65536)
def leakage_group(env: str, task_id: str, scope: str = "task") -> str:
    """The group of trajectories that count as the same task as ``task_id`` for leakage-free
    ExpRAG-LoRA memories, as the env defines task identity (its spec's ``leakage_group``)."""
    spec = env_spec(env)
    if scope not in LEAKAGE_SCOPES:
        raise ValueError(f"unknown leakage scope {scope!r} (choose one of: {', '.join(LEAKAGE_SCOPES)})")
    return spec.group(task_id, scope)
