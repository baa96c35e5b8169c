"""Environments behind one TextEnv protocol. ``make_env(name)`` starts one (lazily importing it)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from exprag.envs.base import EnvBase, Reset, Step, TaskSpec, TextEnv
from exprag.envs.splits import ENVS, check_env

__all__ = ["ENVS", "LEAKAGE_SCOPES", "EnvBase", "Reset", "Step", "TaskSpec", "TextEnv", "action_templates",
           "check_env_args", "leakage_group", "make_env"]


def make_env(name: str, **kwargs: Any) -> TextEnv:
    """Start an environment by name: ``scienceworld``, ``twx`` or ``alfworld``."""
    check_env(name)
    if name == "scienceworld":
        from exprag.envs.scienceworld import ScienceWorldEnv

        return ScienceWorldEnv(**kwargs)
    if name == "twx":
        from exprag.envs.twx import TWXEnv

        return TWXEnv(**kwargs)
    from exprag.envs.alfworld import ALFWorldEnv

    return ALFWorldEnv(**kwargs)


def _env_class(name: str) -> type:
    import importlib

    check_env(name)
    cls = {"scienceworld": "ScienceWorldEnv", "twx": "TWXEnv", "alfworld": "ALFWorldEnv"}[name]
    return getattr(importlib.import_module(f"exprag.envs.{name}"), cls)


def check_env_args(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse, before anything starts, an option the env does not take or an integer option given as
    text (``--env-arg KEY=VALUE`` and a config's ``env_args``)."""
    import inspect

    from exprag.errors import EnvError

    params = inspect.signature(_env_class(name).__init__).parameters
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


def action_templates(name: str) -> list[str]:
    """An env's global action templates without starting it (for prompts built offline, e.g. training)."""
    check_env(name)
    import importlib

    module = importlib.import_module(f"exprag.envs.{name}")
    templates = getattr(module, "ACTION_TEMPLATES", None)
    return list(templates if templates is not None else module.action_templates())


# Leakage scopes for training memories: "task" = the same game / variation / ALFWorld task folder
# (every trial of it); "scene" additionally every task of the same ALFWorld scene.
LEAKAGE_SCOPES = ("task", "scene")


@lru_cache(maxsize=65536)
def leakage_group(env: str, task_id: str, scope: str = "task") -> str:
    """The group of trajectories that count as the same task as ``task_id`` for leakage-free
    ExpRAG-LoRA memories, as the env defines task identity (each env module's ``leakage_group``)."""
    check_env(env)
    if scope not in LEAKAGE_SCOPES:
        raise ValueError(f"unknown leakage scope {scope!r} (choose one of: {', '.join(LEAKAGE_SCOPES)})")
    import importlib

    return importlib.import_module(f"exprag.envs.{env}").leakage_group(task_id, scope)
