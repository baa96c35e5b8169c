"""Subcommands of ``exprag``: one module each, with ``register(subparsers)``."""
