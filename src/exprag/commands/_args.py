"""Argument helpers shared by several subcommands (not a subcommand: the name starts with _)."""

from __future__ import annotations

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
