"""The one ``exprag`` command. Thin: parse, call the library, print.

Each subcommand lives in a module of ``exprag.commands`` that defines ``register(subparsers)``;
modules are discovered, so adding a command touches no shared file. Heavy imports stay inside the
command functions so that ``exprag --help`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from exprag import __version__
from exprag.errors import ExpragError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exprag",
        description="Retrieval-augmented LLM agents that learn from experience (ExpRAG, ExpRAG-LoRA).",
    )
    parser.add_argument("--version", action="version", version=f"exprag {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import exprag.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"exprag.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by default: bundled models load from site-packages, never from the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except ExpragError as e:
        print(f"exprag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("exprag: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
