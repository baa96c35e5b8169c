"""Environments behind one TextEnv protocol. ``make_env(name)`` starts one (lazily importing it)."""

from __future__ import annotations

from typing import Any

from exprag.envs.base import EnvBase, Reset, Step, TaskSpec, TextEnv
from exprag.envs.splits import ENVS, check_env

__all__ = ["ENVS", "EnvBase", "Reset", "Step", "TaskSpec", "TextEnv", "action_templates", "make_env"]


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


def action_templates(name: str) -> list[str]:
    """An env's global action templates without starting it (for prompts built offline, e.g. training)."""
    check_env(name)
    import importlib

    module = importlib.import_module(f"exprag.envs.{name}")
    templates = getattr(module, "ACTION_TEMPLATES", None)
    return list(templates if templates is not None else module.action_templates())
