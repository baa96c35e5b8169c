"""Argument helpers shared by several subcommands (not a subcommand: the name starts with _)."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from exprag.errors import ExpragError


def parse_env_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExpragError(f"--env-arg {item!r} is not KEY=VALUE")
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
        out[key.replace("-", "_")] = int(value) if value.isascii() and value.isdigit() else value
    return out


def flag_overrides(args: argparse.Namespace, fields: Mapping[str, str]) -> dict[str, Any]:
    """``{config field: value}`` for the flags given on the command line; ``fields`` maps each flag's
    argparse dest to the config field it overrides, dotted for nested sections (``retrieval.k``).
    A flag not given (None, or False for a switch) leaves the config's value alone; apply the result
    with ``exprag.config.set_fields``."""
    out = {}
    for dest, path in fields.items():
        value = getattr(args, dest)
        if value is not None and value is not False:
            out[path] = value
    return out
