"""The TextEnv protocol every environment implements, and the data classes it exchanges.

An environment is started and stopped by our code (``with make_env(...) as env``). It lists its
tasks (``TaskSpec``: type, identity, split), plays one task at a time, knows the gold / expert
actions of the current task, and the global action templates an agent's prompt shows.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from exprag.errors import EnvError


# What precedes an action in a model reply: "> ", "Action:", "Action 2:", "1.", "1)", "- ".
_PREFIX = re.compile(r"^\s*(?:>\s*|action\s*\d*\s*:\s*|\d+[.)]\s+|-\s+)", re.IGNORECASE)


def parse_action(reply: str) -> str | None:
    """The first non-empty line, without "Action:" / "> " / list prefixes, quotes and a trailing
    period; None when nothing usable is left."""
    for line in reply.splitlines():
        line = line.strip().strip("`").strip()
        if not line:
            continue
        line = _PREFIX.sub("", line).strip().strip("\"'").strip()
        line = line.rstrip(".!").strip()
        line = " ".join(line.split())
        return line or None
    return None


@dataclass(frozen=True)
class TaskSpec:
    """One playable task: an env's game file / (task, variation) / (game, seed)."""

    env: str
    split: str  # train | dev | test
    task_type: str
    task_id: str  # unique within the env, stable across runs (game file, "boil/var12", ...)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Reset:
    observation: str  # the first user turn: includes the task description as the env prints it
    task: str  # the task description alone (static retrieval query)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    observation: str
    reward: float  # the env's score after this step (ScienceWorld 0..100, others 0..1)
    done: bool
    won: bool  # success as the env defines it (ALFWorld won, ScienceWorld full score, TWX success)
    info: dict[str, Any] = field(default_factory=dict)


class _FromPy4J(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}py4j{os.sep}" not in record.pathname


def quiet_py4j() -> None:
    """Keep py4j's log records off stderr. On a dead JVM py4j logs every failed call with a
    traceback, partly through the root logger's module functions (``logging.exception``), which
    also install a stderr handler on the root logger; the env adapters raise one EnvError that says
    what happened instead. Idempotent."""
    py4j = logging.getLogger("py4j")
    py4j.propagate = False
    if not any(isinstance(f, _FromPy4J) for f in logging.root.filters):
        py4j.addHandler(logging.NullHandler())
        logging.root.addFilter(_FromPy4J())


class EnvRestarted(EnvError):
    """The simulator process died mid-episode and was restarted: the episode in progress is lost;
    replay it from ``reset`` (once: a second death of the same episode is an ordinary EnvError)."""


@runtime_checkable
class TextEnv(Protocol):
    name: str  # its registry name (envs/registry.py): "scienceworld" | "twx" | "alfworld" | a plugin's
    # admissible_actions() costs nothing extra (the simulator lists them after every step anyway):
    # the agent then counts actions that are not admissible.
    cheap_admissible: bool

    @property
    def version(self) -> str: ...

    def task_types(self) -> list[str]: ...

    def tasks(self, split: str, task_types: list[str]) -> list[TaskSpec]: ...

    def reset(self, task: TaskSpec) -> Reset: ...

    def step(self, action: str) -> Step: ...

    def expert_action(self) -> str | None:
        """The expert's next action in the current state (gold sequence or hand-coded expert);
        None when the expert has nothing more to do."""
        ...

    def admissible_actions(self) -> list[str]:
        """Valid actions now (may be slow; only when asked)."""
        ...

    def action_templates(self) -> list[str]:
        """Global action templates for the agent's system prompt (docs/method.md#memory-block)."""
        ...

    @property
    def action_syntax(self) -> str | None:
        """Which of the env's action syntaxes ``action_templates()`` shows now, recorded on every
        trajectory so that training shows the same templates (its EnvSpec maps it back to them);
        None for an env with one syntax."""
        ...

    def normalize_action(self, text: str) -> str:
        """An action as the env itself will read it (to compare with ``admissible_actions()``)."""
        ...

    def max_steps(self, task: TaskSpec) -> int: ...

    def close(self) -> None: ...


class EnvBase:
    """Context-manager plumbing and the protocol's defaults, shared by the adapters."""

    name = "base"
    cheap_admissible = False

    @property
    def action_syntax(self) -> str | None:
        return None

    def normalize_action(self, text: str) -> str:
        return text

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass
