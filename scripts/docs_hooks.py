"""MkDocs hook: the CLI reference page (docs/cli.md) gets every command's ``--help``, generated from
``exprag.cli``'s argparse parser at build time, so the page cannot drift from the code."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# the repository's own code, whatever else is installed: the page documents this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MARKER = "<!-- cli-reference -->"


def _commands(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + [name])


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal's width: make it fixed
    from exprag.cli import build_parser

    parts = []
    for path, parser in _commands(build_parser(), ["exprag"]):
        parts.append(f"{'#' * (2 if len(path) <= 2 else 3)} `{' '.join(path)}`\n\n```text\n{parser.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "cli.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/cli.md lost its {MARKER} line")
        return markdown.replace(MARKER, cli_reference())
    return markdown
