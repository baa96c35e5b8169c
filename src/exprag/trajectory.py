"""The one record everything exchanges: a Trajectory, stored as schema-versioned JSONL.

A trajectory is one episode as a chat: ``user`` turns are observations (the first one carries the
task description), ``assistant`` turns are actions, and an optional leading ``system`` turn holds
instructions. Environments, the expert, the agent, the bank and the trainer all read and write it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from exprag.errors import DataFormatError
from exprag.io import atomic_write_text, iter_json_lines
from exprag.validate import check_type

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant")

# field name -> accepted python types (bool is checked before int, since bool is an int)
_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "env": (str,),
    "env_version": (str,),
    "split": (str,),
    "task_type": (str,),
    "task_id": (str,),
    "task": (str,),
    "messages": (list,),
    "success": (bool,),
    "reward": (int, float),
    "num_steps": (int,),
    "source": (str,),
    "meta": (dict,),
    "action_syntax": (str,),
}
# Deeper ``meta`` overflows Python's recursion when a record is copied or written (about 500 levels);
# metadata of any real use is a few levels deep.
MAX_META_DEPTH = 64


def _depth(obj: Any) -> int:
    """Nesting depth of a JSON value, without recursion (1 for a flat object or list)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_META_DEPTH:  # past the limit the answer is known
                stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


# Fields an older file may lack; ``action_syntax`` is also left out of files when None, so that a
# trajectory of a one-syntax env is written as before it existed.
_OPTIONAL = ("meta", "action_syntax")


@dataclass
class Trajectory:
    """One episode: the record environments write, banks store and trainers read (JSONL, one per
    line; ``schema_version`` 1). ``messages`` use chat roles: ``user`` = observation (the first one
    holds the task), ``assistant`` = action.

    Examples:
        >>> t = exprag.read_trajectories(TRAJ)[0]
        >>> t.num_steps == len(t.actions()), t.messages[1]["role"]
        (True, 'assistant')
        >>> exprag.Trajectory.from_dict(t.to_dict()) == t
        True
    """

    id: str
    env: str
    env_version: str
    split: str
    task_type: str
    task_id: str
    task: str
    messages: list[dict[str, str]]
    success: bool
    reward: float
    num_steps: int
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    # The env's action syntax the agent's prompt showed (``TextEnv.action_syntax``): training and
    # export rebuild the same templates from it. None: the env's default (and every older file).
    action_syntax: str | None = None
    schema_version: int = SCHEMA_VERSION

    # ---- views -------------------------------------------------------------------------------
    def actions(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    def observations(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]

    def episode_messages(self) -> list[dict[str, str]]:
        """The episode without any stored system turn: observations and actions only."""
        return [m for m in self.messages if m["role"] != "system"]

    def text(self) -> str:
        """The whole trajectory as plain text (dynamic keys use the task and actions only: store.dynamic_key)."""
        return history_text(self.task, self.episode_messages())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["action_syntax"] is None:
            del d["action_syntax"]
        return d

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "<dict>") -> "Trajectory":
        """Validate and build; errors name ``where`` (e.g. ``file.jsonl:12``) and the field."""
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        version = obj.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DataFormatError(f"{where}: field 'schema_version' must be an integer >= 1, got {version!r}")
        if version > SCHEMA_VERSION:
            raise DataFormatError(
                f"{where}: field 'schema_version' is {version}, newer than this exprag "
                f"(reads up to {SCHEMA_VERSION}); upgrade exprag"
            )
        for name, types in _FIELDS.items():
            if name not in obj:
                if name in _OPTIONAL:
                    continue
                raise DataFormatError(f"{where}: missing field '{name}'")
            check_type(obj[name], types, where, name)
        for i, m in enumerate(obj["messages"]):
            if not isinstance(m, dict):
                raise DataFormatError(f"{where}: field 'messages[{i}]' must be an object")
            if m.get("role") not in ROLES:
                raise DataFormatError(
                    f"{where}: field 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
                )
            if not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: field 'messages[{i}].content' must be a string")
        if not math.isfinite(obj["reward"]):  # JSON readers accept NaN and Infinity; means are poisoned
            raise DataFormatError(f"{where}: field 'reward' must be a finite number, got {obj['reward']!r}")
        if obj["num_steps"] < 0:
            raise DataFormatError(f"{where}: field 'num_steps' must be >= 0")
        if "meta" in obj and _depth(obj["meta"]) > MAX_META_DEPTH:
            raise DataFormatError(f"{where}: field 'meta' is nested deeper than {MAX_META_DEPTH} levels")
        unknown = set(obj) - set(_FIELDS) - {"schema_version"}
        if unknown:
            raise DataFormatError(f"{where}: unknown field '{sorted(unknown)[0]}'")
        return cls(
            **{k: obj[k] for k in _FIELDS if k in obj},
            schema_version=SCHEMA_VERSION,
        )


def carried_out(messages: Sequence[dict[str, str]], rejections: Sequence[str]) -> list[dict[str, str]]:
    """The actions (assistant messages) of an episode that the env carried out: those whose answer
    does not start with one of ``rejections`` (``exprag.envs.registry.rejections``)."""
    prefixes = tuple(rejections)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        answer = messages[i + 1] if i + 1 < len(messages) else None
        if answer is not None and answer["role"] == "user" and answer["content"].lstrip().startswith(prefixes):
            continue
        out.append(m)
    return out


def history_text(task: str, messages: Iterable[dict[str, str]]) -> str:
    """Plain-text rendering of a (partial) episode, shared by dynamic keys and dynamic queries."""
    lines = [f"Task: {task}"]
    for m in messages:
        if m["role"] == "user":
            lines.append(f"Observation: {m['content']}")
        elif m["role"] == "assistant":
            lines.append(f"Action: {m['content']}")
    return "\n".join(lines)


# ---- JSONL ---------------------------------------------------------------------------------------
def iter_jsonl_located(path: str | Path) -> Iterator[tuple[str, Trajectory]]:
    """Validated trajectories with where each came from (``file:line``), for errors found later."""
    for where, obj in iter_json_lines(path):
        yield where, Trajectory.from_dict(obj, where=where)


def iter_jsonl(path: str | Path) -> Iterator[Trajectory]:
    for _, t in iter_jsonl_located(path):
        yield t


def read_jsonl(*paths: str | Path) -> list[Trajectory]:
    """Read and validate every line of every file; duplicate ids across files are an error."""
    located = [pair for p in paths for pair in iter_jsonl_located(p)]
    check_unique_ids(located)
    return [t for _, t in located]


def check_unique_ids(located: Sequence[tuple[str | None, Trajectory]]) -> None:
    """A DataFormatError at the first id seen twice: naming the duplicate's ``file:line`` and the first
    one's, or, for trajectories that come from no file (``where`` None), how often the id appears."""
    seen: dict[str, str | None] = {}
    for where, t in located:
        if t.id not in seen:
            seen[t.id] = where
        elif where is None:
            n = sum(u.id == t.id for _, u in located)
            raise DataFormatError(f"field 'id': trajectory id {t.id!r} appears {n} times")
        else:
            raise DataFormatError(f"{where}: field 'id' {t.id!r} duplicates the trajectory at {seen[t.id]}")


def dumps(t: Trajectory) -> str:
    return json.dumps(t.to_dict(), ensure_ascii=False)


def write_jsonl(path: str | Path, trajectories: Iterable[Trajectory]) -> int:
    """Write atomically (temp file, then rename): readers never see half a file."""
    lines = [dumps(t) for t in trajectories]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


# ---- converters for other trainers -------------------------------------------------------------
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def to_openai(t: Trajectory, system: str | None = None) -> dict[str, Any]:
    """OpenAI ``messages`` record (TRL's conversational format)."""
    msgs = t.episode_messages() if system is not None else list(t.messages)
    if system is not None:
        msgs = [{"role": "system", "content": system}] + msgs
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


def to_sharegpt(t: Trajectory, system: str | None = None) -> dict[str, Any]:
    """ShareGPT record as LLaMA-Factory reads it (``conversations`` + optional ``system``)."""
    sys_turns = [m["content"] for m in t.messages if m["role"] == "system"]
    record: dict[str, Any] = {
        "conversations": [
            {"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in t.episode_messages()
        ]
    }
    sys_text = system if system is not None else ("\n\n".join(sys_turns) if sys_turns else None)
    if sys_text:
        record["system"] = sys_text
    return record


def export_jsonl(path: str | Path, trajectories: Iterable[Trajectory], fmt: str,
                 system: Callable[[Trajectory], str] | None = None) -> int:
    """Write converted records atomically; ``system(t)`` gives each record's system prompt."""
    conv = {"openai": to_openai, "sharegpt": to_sharegpt}.get(fmt)
    if conv is None:
        raise ValueError(f"unknown export format {fmt!r} (choose openai or sharegpt)")
    lines = [json.dumps(conv(t, system(t) if system else None), ensure_ascii=False) for t in trajectories]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
