"""The one ``exprag`` command. Thin: parse, call the library, print.

Each subcommand lives in a module of ``exprag.commands`` that defines ``register(subparsers)``;
modules are discovered, so adding a command touches no shared file. Heavy imports stay inside the
command functions so that ``exprag --help`` starts fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import signal
import sys
import typing

from exprag import __version__
from exprag.errors import ExpragError, Terminated


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2), like every other exprag error; subcommand
    parsers inherit it (argparse makes them with the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="exprag",
        description="Retrieval-augmented LLM agents that learn from experience (ExpRAG, ExpRAG-LoRA).",
    )
    parser.add_argument("--version", action="version", version=f"exprag {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also EXPRAG_DEBUG=1); accepted anywhere")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    if debug:
        argv.remove("--debug")
    debug = debug or os.environ.get("EXPRAG_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("exprag: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("exprag: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    except BrokenPipeError:  # the reader went away (`exprag bank query ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a Unix tool stopped by the closed pipe
    except Exception as e:
        if debug:
            raise
        message, code = _one_line(e)
        print(f"exprag: error: {message}", file=sys.stderr)
        return code
    return int(rc or 0)


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def _one_line(e: Exception) -> tuple[str, int]:
    """The message and exit code of an error. Typed errors are the user's to fix (2); so are files
    the system refuses to read or write; anything else is a bug in exprag (1), reported in one line
    with a pointer to --debug rather than a traceback."""
    if isinstance(e, ExpragError):
        return str(e).replace("\n", " "), 2
    if isinstance(e, OSError) and (e.filename is not None or isinstance(e, PermissionError)
                                   or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror or e}", 2
    return f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} " \
           "(rerun with --debug for the traceback)", 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
