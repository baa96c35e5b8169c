"""Typed run configurations, loadable from YAML; CLI flags override fields."""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from exprag.errors import DataFormatError
from exprag.memory_block import MemorySpec
from exprag.validate import BUDGET, COUNT, FIELD_RULES, K, SEED, check_config, coerce_field, union_args

T = TypeVar("T")

# The ``retrieval`` section as files write it (YAML configs, a run's config.json): flat, with the memory's
# fields under these names (file key -> MemorySpec field).
_MEMORY_KEYS = {"k": "k", "mode": "mode", "memory_format": "format", "token_budget": "token_budget"}


@dataclass(frozen=True)
class RetrievalConfig:
    """The ``retrieval`` section of eval and train configs: a bank and the memory block drawn from it.
    Files keep its flat shape ``{bank, k, mode, memory_format, token_budget}`` (``to_file``)."""

    bank: str | None = None  # bank directory; None = no retrieval
    memory: MemorySpec = field(default_factory=MemorySpec)

    def to_file(self) -> dict[str, Any]:
        return {"bank": self.bank, **{key: getattr(self.memory, name) for key, name in _MEMORY_KEYS.items()}}

    def with_fields(self, values: dict[str, Any]) -> "RetrievalConfig":
        """This section with some of its file keys (``bank``, ``k``, ``memory_format``, ...) set."""
        unknown = set(values) - {"bank", *_MEMORY_KEYS}
        if unknown:
            raise KeyError(sorted(unknown)[0])
        memory = {_MEMORY_KEYS[key]: v for key, v in values.items() if key in _MEMORY_KEYS}
        return RetrievalConfig(values.get("bank", self.bank), dataclasses.replace(self.memory, **memory))

    @classmethod
    def from_file(cls, data: dict[str, Any], where: str) -> "RetrievalConfig":
        hints = typing.get_type_hints(MemorySpec)
        rules = FIELD_RULES[MemorySpec]
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "bank":
                values[key] = coerce_field(value, str | None, where, key)
            elif key in _MEMORY_KEYS:
                name = _MEMORY_KEYS[key]
                values[key] = coerce_field(value, hints[name], where, key, rules.get(name))
            else:
                raise DataFormatError(f"{where}: unknown field {key!r} for {cls.__name__}")
        return cls().with_fields(values)


@dataclass
class EvalConfig:
    env: str = "twx"
    env_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"data_dir": "..."} for alfworld
    split: str = "test"
    task_types: str = "hard"  # easy | hard | all | comma list
    per_type: int | None = 5
    limit: int | None = None
    model: str = "smollm2-135m"
    adapter: str | None = None
    backend: str = "hf"  # hf | openai
    base_url: str | None = None
    request_timeout: float = 60.0  # seconds per request to an OpenAI-compatible server (backend openai)
    # requests in flight to that server; None = 8 (backend openai). Written only when set, so that
    # run directories from before this field keep their config.json bytes.
    concurrency: int | None = field(default=None, metadata={"omit_if_none": True})
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    max_steps: int | None = None  # None = the env's cap (ALFWorld 50)
    max_new_tokens: int = 32
    batch_size: int = 4  # episodes stepped together (one model call per step for the batch)
    write_back: bool = False
    show_admissible: bool = False
    seed: int = 2025
    out: str = "runs/eval"
    # None (the default) keeps runs made before these fields resumable: an absent key compares equal.
    task_ids: list[str] | None = None  # only these games of the selection (an experiment's expert ceiling)
    oracle_memory: bool | None = None  # diagnostic: memory = the bank's trajectories of the very game


def from_dict(cls: type[T], data: dict[str, Any], where: str = "<config>") -> T:
    """Build a (nested) config dataclass, rejecting unknown keys and values of the wrong type or range
    with the file and field named; numbers YAML reads as strings (``lr: 5e-5``) are accepted."""
    if not isinstance(data, dict):
        raise DataFormatError(f"{where}: expected a mapping for {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise DataFormatError(f"{where}: unknown field {key!r} for {cls.__name__}")
        ftype = hints.get(key, fields[key].type)
        sub = _dataclass_type(ftype)
        if sub is RetrievalConfig and isinstance(value, dict):  # its file shape is flat
            kwargs[key] = RetrievalConfig.from_file(value, f"{where}.{key}")
        elif sub and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}")
        elif sub:
            if not isinstance(value, sub):
                raise DataFormatError(f"{where}: field {key!r} must be a mapping, got {value!r}")
            kwargs[key] = value
        else:
            rule = FIELD_RULES.get(cls, {}).get(key)
            kwargs[key] = coerce_field(value, ftype, where, key, rule) if key in hints else value
    return check_config(cls(**kwargs), where)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: values pass unchecked, as before
        return {}


def _dataclass_type(ftype: Any) -> type | None:
    """The config dataclass of a resolved field type (``X`` or ``X | None``), else None."""
    for t in union_args(ftype):
        if dataclasses.is_dataclass(t):
            return t
    return None


FIELD_RULES[MemorySpec] = {"k": K, "token_budget": BUDGET}
FIELD_RULES[EvalConfig] = {"per_type": COUNT, "limit": COUNT, "max_steps": COUNT, "max_new_tokens": COUNT,
                           "batch_size": COUNT, "concurrency": COUNT, "seed": SEED}


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content (an empty file reads as ``{}``); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DataFormatError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: YAML nested too deeply") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_yaml(path), str(path))


def changed_fields(have: dict[str, Any], want: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Top-level fields whose values differ between two resolved configs (sorted), ``ignore`` left out:
    what decides whether a run directory may be resumed with the config given now."""
    skip = set(ignore)
    return [k for k in sorted(set(have) | set(want)) if k not in skip and have.get(k) != want.get(k)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as files hold it: ``dataclasses.asdict``, with ``retrieval`` sections in their flat
    file shape, so that run directories written before ``MemorySpec`` compare equal on resume."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.metadata.get("omit_if_none"):
            continue
        if isinstance(value, RetrievalConfig):
            out[f.name] = value.to_file()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def set_fields(cfg: Any, values: dict[str, Any], error: type[Exception] = DataFormatError,
               what: str = "config") -> Any:
    """Set config fields by dotted path (``retrieval.k``), as CLI flags override a loaded config; a
    path that names no field is ``error``. A ``retrieval`` section is keyed as files key it
    (``retrieval.memory_format``) and, frozen, replaced."""
    for path, value in values.items():
        owner, target = None, cfg
        *parents, last = path.split(".")
        for p in parents:
            owner, target = target, getattr(target, p)
        if isinstance(target, RetrievalConfig):
            try:
                setattr(owner, parents[-1], target.with_fields({last: value}))
            except KeyError:
                raise error(f"{what} has no field {path!r}") from None
            continue
        if not hasattr(target, last):
            raise error(f"{what} has no field {path!r}")
        setattr(target, last, value)
    return cfg
