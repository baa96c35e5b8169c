"""`exprag export`: trajectories -> ShareGPT (LLaMA-Factory) or OpenAI `messages` (TRL) JSONL."""

from __future__ import annotations

import argparse
from functools import lru_cache


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert trajectories to ShareGPT or OpenAI-messages JSONL")
    p.add_argument("--trajectories", nargs="+", required=True, metavar="F.jsonl")
    p.add_argument("--format", required=True, choices=["sharegpt", "openai"])
    p.add_argument("--out", required=True)
    p.add_argument("--with-system", action="store_true",
                   help="prepend exprag's agent system prompt (the action templates of each trajectory's env)")
    p.set_defaults(func=run)


def _is_export_file(path) -> bool:
    """A JSONL file this command wrote (ShareGPT ``conversations`` or OpenAI ``messages`` records),
    which a rerun may replace; any other existing file is refused."""
    from exprag.io import first_json_record

    rec = first_json_record(path)
    return isinstance(rec, dict) and ("conversations" in rec or "messages" in rec) and "schema_version" not in rec


def run(args: argparse.Namespace) -> int:
    from exprag.envs import action_templates
    from exprag.io import check_output_file
    from exprag.prompt import system_prompt
    from exprag.trajectory import export_jsonl, read_jsonl

    @lru_cache(maxsize=None)
    def env_system(env: str, syntax: str | None) -> str:
        return system_prompt(action_templates(env, syntax))

    check_output_file(args.out, "export file", _is_export_file)
    system = (lambda t: env_system(t.env, t.action_syntax)) if args.with_system else None
    n = export_jsonl(args.out, read_jsonl(*args.trajectories), args.format, system)
    print(f"wrote {n} {args.format} records to {args.out}")
    return 0
