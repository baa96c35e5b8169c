"""Checks of user-supplied values at the boundary: numeric flags and config fields, output paths.

One set of rules serves both argparse (``type=positive_int`` ...) and the config dataclasses
(``check_fields``), so ``--per-type -1`` and ``per_type: -1`` in a YAML file are refused alike: a
negative count would otherwise slice from the end and select almost everything.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exprag.errors import DataFormatError, ExpragError
from exprag.io import check_writable


@dataclass(frozen=True)
class Num:
    """A numeric field's rule: integer or real, an inclusive minimum, or a minimum that must be exceeded."""

    kind: type  # int | float
    min: float | None = None
    above: float | None = None  # strict lower bound
    max: float | None = None

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.above is not None:
            return f"{what} > {self.above:g}"
        if self.min is not None and self.max is not None:
            return f"{what} in [{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f"{what} >= {self.min:g}"
        return what

    def check(self, value: Any) -> Any:
        """``value`` as ``kind``, or ValueError saying what is wanted."""
        if isinstance(value, bool):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        if isinstance(value, str):  # YAML reads 5e-5 (no dot) and quoted numbers as strings
            value = _parse_number(value, self)
        if self.kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError(f"must be {self.describe()}, got {value!r}")
        else:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"must be {self.describe()} (finite), got {value!r}")
            value = float(value)
        if ((self.min is not None and value < self.min) or (self.above is not None and value <= self.above)
                or (self.max is not None and value > self.max)):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        return value


def _parse_number(text: str, rule: Num) -> int | float:
    s = text.strip()
    try:
        return int(s) if rule.kind is int else float(s)
    except ValueError:
        raise ValueError(f"must be {rule.describe()}, got {text!r}") from None


COUNT = Num(int, min=1)  # tasks, epochs, steps, batch sizes
K = Num(int, min=0)  # retrieved trajectories (0 = an empty memory block)
BUDGET = Num(int, min=1)  # token budgets, lengths
SEED = Num(int)
NON_NEGATIVE = Num(float, min=0)
POSITIVE = Num(float, above=0)
FRACTION = Num(float, min=0, max=1)
PORT = Num(int, min=0, max=65535)


# ---- argparse types: a bad value is argparse's usage error (exit 2), naming the flag ---------------
def _arg_type(rule: Num, name: str):
    def parse(text: str) -> Any:
        try:
            return rule.check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_int = _arg_type(COUNT, "positive_int")
non_negative_int = _arg_type(K, "non_negative_int")
positive_float = _arg_type(POSITIVE, "positive_float")
non_negative_float = _arg_type(NON_NEGATIVE, "non_negative_float")
fraction = _arg_type(FRACTION, "fraction")
port = _arg_type(PORT, "port")
integer = _arg_type(SEED, "integer")


# ---- config dataclasses ---------------------------------------------------------------------------
# config class -> its numeric fields' rules; each config module registers its classes.
FIELD_RULES: dict[type, dict[str, Num]] = {}


def check_config(cfg: Any, where: str, error: type[ExpragError] = DataFormatError) -> Any:
    """``check_fields`` with the registered rules, through nested config dataclasses."""
    import dataclasses

    check_fields(cfg, FIELD_RULES.get(type(cfg), {}), where, error)
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            check_config(sub, f"{where}.{f.name}", error)
    return cfg


def check_fields(obj: Any, rules: dict[str, Num], where: str, error: type[ExpragError] = DataFormatError) -> None:
    """Check (and normalise, e.g. ``"1"`` -> 1) the numeric fields of a config object in place;
    None passes for optional fields. Errors name ``where`` and the field."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            checked = rule.check(value)
        except ValueError as e:
            raise error(f"{where}: field {name!r} {e}") from None
        if checked is not value:  # only a value that needed normalising is set (frozen specs hold checked ones)
            setattr(obj, name, checked)


def coerce_field(value: Any, annotation: Any, where: str, name: str, rule: Num | None = None) -> Any:
    """A YAML value checked against a dataclass field's type: numbers written as strings (``5e-5``,
    ``"1"``) become numbers; anything else of the wrong type is a DataFormatError naming the file and
    field. ``rule``: the field's range, checked with the type so that one message says both."""
    allowed = union_args(annotation)
    if value is None:
        if type(None) in allowed or annotation is Any:
            return None
        raise DataFormatError(f"{where}: field {name!r} must not be empty")
    if annotation is Any or any(a is Any for a in allowed):
        return value
    origins = {typing.get_origin(a) or a for a in allowed}
    if bool in origins:
        if isinstance(value, bool):
            return value
        raise DataFormatError(f"{where}: field {name!r} must be true or false, got {value!r}")
    for kind in (int, float):
        if kind in origins:
            try:
                return (rule if rule is not None and rule.kind is kind else Num(kind)).check(value)
            except ValueError as e:
                if str in origins and isinstance(value, str):
                    return value
                raise DataFormatError(f"{where}: field {name!r} {e}") from None
    if str in origins:
        if isinstance(value, str):
            return value
        raise DataFormatError(f"{where}: field {name!r} must be a string, got {value!r}")
    if list in origins:
        if isinstance(value, str):  # left to the field's reader (peft takes target_modules: all-linear)
            return value
        if not isinstance(value, list):
            raise DataFormatError(f"{where}: field {name!r} must be a list, got {value!r}")
        item = next((typing.get_args(a)[0] for a in allowed if typing.get_origin(a) is list and typing.get_args(a)),
                    None)
        if item is str and not all(isinstance(v, str) for v in value):
            raise DataFormatError(f"{where}: field {name!r} must be a list of strings")
        return value
    if dict in origins and not isinstance(value, dict):
        raise DataFormatError(f"{where}: field {name!r} must be a mapping, got {value!r}")
    return value


_PROSE = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
          dict: "an object"}


def check_type(value: Any, types: type | tuple[type, ...], where: str, name: str, *,
               python_names: bool = False) -> Any:
    """``value`` when it is one of ``types`` (a bool is never an int here, whatever Python says);
    else a DataFormatError naming ``where`` and the field: "must be an integer, got str", or with
    ``python_names`` "must be int, got str"."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(t.__name__ if python_names else _PROSE[t] for t in types)
        raise DataFormatError(f"{where}: field '{name}' must be {wanted}, got {type(value).__name__}")
    return value


def union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


# ---- output paths ---------------------------------------------------------------------------------
def check_output(path: str | Path, kind: str = "file", flag: str = "--out") -> Path:
    """Refuse, before any work is done, an output that cannot be written: a file where a directory is
    wanted (or the reverse), or a location whose nearest existing directory is not writable.
    Creates nothing."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ExpragError(f"{path}: {flag} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise ExpragError(f"{path}: {flag} is a directory; give a file path")
    check_writable(path, flag)
    return path


def read_json(path: str | Path, error: type[ExpragError] = DataFormatError) -> Any:
    """A JSON file's content; a missing, non-UTF-8, malformed or absurdly nested file is ``error``
    naming the file (and line)."""
    import json

    from exprag.io import not_a_file

    path = Path(path)
    if not path.is_file():  # a FIFO would block the read forever
        raise error(f"{path}: {not_a_file(path)}")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None
