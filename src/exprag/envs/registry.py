"""The environments exprag knows: one ``EnvSpec`` per env. The built-ins are registered here; another
package adds its own without forking exprag through the ``exprag.envs`` entry-point group:

    # the package's pyproject.toml
    [project.entry-points."exprag.envs"]
    myenv = "mypackage.myenv:env_spec"   # an EnvSpec whose name is "myenv"

Entry points are read only when a name is not a built-in (or to list the known names), so an
installed plugin never slows down or breaks runs of the built-ins; a built-in name cannot be taken
over. Built-in env modules are imported on first use: importing exprag starts and imports no simulator.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable, Mapping, Sequence

from exprag.envs.base import TextEnv
from exprag.errors import EnvError, UnknownEnvError

ENTRY_POINT_GROUP = "exprag.envs"
SPLITS = ("easy", "hard")

# A callable, or "module:attr" naming one, imported on first use (how built-ins stay lazy).
Ref = str | Callable[..., Any]


@dataclass(frozen=True)
class EnvSpec:
    """Everything exprag needs to know about an env without starting it."""

    name: str
    # The env class, or a function of the env options (``--env-arg KEY=VALUE``) that returns a TextEnv.
    factory: Ref
    # ``templates()``: the action templates of the default syntax; ``templates(syntax)``: those of a
    # syntax the env reported (``TextEnv.action_syntax``, recorded on every trajectory).
    templates: Ref
    # ``{"easy": [task types], "hard": [task types]}``; None: the bundled data/splits.yaml (built-ins).
    splits: Mapping[str, Sequence[str]] | None = None
    # ``leakage_group(task_id, scope) -> group`` (docs/method.md#leakage-free-training-memories);
    # None: every task id is its own group under every scope.
    leakage_group: Ref | None = None
    # Options of agent-only runs (eval), which need no expert: skipping it can save seconds per reset.
    agent_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Constructing the env starts nothing (it only checks its options and data), so a run's
    # preflight constructs one to refuse a bad option before its run directory exists.
    cheap_construct: bool = False
    # Observations (prefixes) with which the env answers an action it did not carry out. Dynamic
    # retrieval leaves such actions out of its queries and keys: a weak agent's non-actions say
    # nothing of the procedure under way (docs/retrieval-quality.md).
    rejections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.splits is not None and sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"env {self.name!r}: splits must map exactly {' and '.join(SPLITS)} to task types")

    def env_factory(self) -> Callable[..., TextEnv]:
        """The factory itself (its signature lists the env's options)."""
        return _load(self.factory)

    def make(self, **options: Any) -> TextEnv:
        return self.env_factory()(**options)

    def action_templates(self, syntax: str | None = None) -> list[str]:
        templates = _load(self.templates)
        return list(templates() if syntax is None else templates(syntax))

    def group(self, task_id: str, scope: str) -> str:
        return task_id if self.leakage_group is None else _load(self.leakage_group)(task_id, scope)


def _load(ref: Ref) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# The agent's own answer to a reply it cannot parse as an action (and ALFWorld's to an action it
# does not know or cannot do).
NOTHING_HAPPENS = "Nothing happens."

_BUILTINS = {spec.name: spec for spec in (
    EnvSpec("alfworld", "exprag.envs.alfworld:ALFWorldEnv", "exprag.envs.alfworld:action_templates",
            leakage_group="exprag.envs.alfworld:leakage_group", agent_defaults={"expert": None},
            cheap_construct=True, rejections=(NOTHING_HAPPENS,)),
    EnvSpec("scienceworld", "exprag.envs.scienceworld:ScienceWorldEnv",
            "exprag.envs.scienceworld:action_templates", leakage_group="exprag.envs.scienceworld:leakage_group",
            # its gold agent plays mendelian tasks for ~10 s on a scratch world
            agent_defaults={"gold": False}, rejections=("No known action matches that input.",)),
    EnvSpec("twx", "exprag.envs.twx:TWXEnv", "exprag.envs.twx:action_templates",
            leakage_group="exprag.envs.twx:leakage_group", rejections=("Unknown action:",)),
)}
_loaded: dict[str, EnvSpec] = {}  # the plugin specs this process has loaded


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _BUILTINS}


@lru_cache(maxsize=None)
def _plugin(name: str) -> EnvSpec:
    ep = _entry_points()[name]
    where = f"entry point {name} = {ep.value} (group {ENTRY_POINT_GROUP})"
    try:
        spec = ep.load()
    except Exception as e:
        raise EnvError(f"env {name!r}: {where} failed to load: {type(e).__name__}: {e}") from None
    if not isinstance(spec, EnvSpec):
        raise EnvError(f"env {name!r}: {where} is a {type(spec).__name__}, not an exprag EnvSpec")
    if spec.name != name:
        raise EnvError(f"env {name!r}: {where} names its env {spec.name!r}")
    if spec.splits is None:
        raise EnvError(f"env {name!r}: {where} has no splits (give EnvSpec(splits={{'easy': [...], 'hard': [...]}}))")
    _loaded[name] = spec
    return spec


def known_envs() -> list[str]:
    """The built-ins, then the envs installed packages declare (without loading them)."""
    return list(_BUILTINS) + sorted(_entry_points())


def rejections() -> tuple[str, ...]:
    """Every observation prefix meaning "that action was not carried out": the built-in envs', those
    of the env plugins loaded in this process, and the agent's answer to an unparsable reply."""
    found = {NOTHING_HAPPENS}
    for spec in (*_BUILTINS.values(), *_loaded.values()):
        found.update(spec.rejections)
    return tuple(sorted(found))


def env_spec(name: str) -> EnvSpec:
    """The spec of an env by name; an unknown name is an UnknownEnvError listing the known ones."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    if isinstance(name, str) and name in _entry_points():
        return _plugin(name)
    raise UnknownEnvError(f"unknown env {name!r} (choose one of: {', '.join(known_envs())})")


def check_env(name: str) -> str:
    env_spec(name)
    return name
