"""`exprag export`: trajectories -> ShareGPT (LLaMA-Factory) or OpenAI `messages` (TRL) JSONL.

With ``--bank`` (or ``--config``, a training config) the records are the examples ``exprag train``
trains on: the system prompt with each example's leakage-free memory block (train/export.py)."""

from __future__ import annotations

import argparse
from functools import lru_cache

from exprag.validate import fraction, integer, non_negative_int, positive_int

# the flags export shares with `exprag train` (the training-data settings), mapped as train maps them
_TRAIN_FLAGS = ("trajectories", "model", "bank", "k", "memory_format", "token_budget", "leakage",
                "empty_memory_fraction", "max_length", "overlong", "seed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="convert trajectories, or ExpRAG-LoRA training examples (--bank), to ShareGPT or OpenAI JSONL",
        description="Write trajectories as ShareGPT or OpenAI-messages JSONL. With --bank BANK (or --config "
                    "TRAIN.yaml) write the examples `exprag train` trains on instead: the system prompt with "
                    "each example's memory block, retrieved as at inference and never from its own task.")
    p.add_argument("--trajectories", nargs="+", metavar="F.jsonl", help="trajectories (or the --config's)")
    p.add_argument("--format", required=True, choices=["sharegpt", "openai"])
    p.add_argument("--out", required=True)
    p.add_argument("--with-system", action="store_true",
                   help="prepend exprag's agent system prompt (the action templates of each trajectory's env)")
    t = p.add_argument_group("training examples (as `exprag train`; its defaults)")
    t.add_argument("--config", metavar="TRAIN.yaml", help="a training config: its data and retrieval settings")
    t.add_argument("--bank", metavar="BANK_DIR", help="the training bank (ExpRAG-LoRA examples)")
    t.add_argument("-k", type=non_negative_int, dest="k", help="memory trajectories per example (default 2)")
    t.add_argument("--memory-format", choices=["json", "text"])
    t.add_argument("--token-budget", type=positive_int, help="max tokens of the memory block (needs --model)")
    t.add_argument("--leakage", choices=["task", "scene"])
    t.add_argument("--empty-memory-fraction", type=fraction, metavar="P")
    t.add_argument("--seed", type=integer)
    t.add_argument("--model", help="the model to train: its tokenizer applies the trainer's length rules "
                                   "(--token-budget, --max-length, --overlong); without it they are not applied")
    t.add_argument("--max-length", type=positive_int)
    t.add_argument("--overlong", choices=["trim", "drop"])
    p.set_defaults(func=run)


def _is_export_file(path) -> bool:
    """A JSONL file this command wrote (ShareGPT ``conversations`` or OpenAI ``messages`` records),
    which a rerun may replace; any other existing file is refused."""
    from exprag.io import first_json_record

    rec = first_json_record(path)
    return isinstance(rec, dict) and ("conversations" in rec or "messages" in rec) and "schema_version" not in rec


def run(args: argparse.Namespace) -> int:
    from exprag.errors import ExpragError
    from exprag.io import check_output_file

    training = args.bank is not None or args.config is not None
    if not training and not args.trajectories:
        raise ExpragError("export needs --trajectories (or --config TRAIN.yaml)")
    check_output_file(args.out, "export file", _is_export_file)
    if training:
        return _run_training(args)
    from exprag.envs import action_templates
    from exprag.prompt import system_prompt
    from exprag.trajectory import export_jsonl, read_jsonl

    @lru_cache(maxsize=None)
    def env_system(env: str, syntax: str | None) -> str:
        return system_prompt(action_templates(env, syntax))

    system = (lambda t: env_system(t.env, t.action_syntax)) if args.with_system else None
    n = export_jsonl(args.out, read_jsonl(*args.trajectories), args.format, system)
    print(f"wrote {n} {args.format} records to {args.out}")
    return 0


def _run_training(args: argparse.Namespace) -> int:
    import json

    from exprag.commands._args import flag_overrides
    from exprag.commands.train import FIELDS
    from exprag.errors import ExpragError
    from exprag.io import atomic_write_text
    from exprag.train.config import load_train_config

    try:
        from exprag.train.export import load_tokenizer, records, training_chats
    except ModuleNotFoundError as e:  # an install without retrieval (core + an env only)
        raise ExpragError(f"export --bank / --config needs the retrieval packages ({e.name} is not installed): "
                          "pip install 'exprag[bank]'") from None

    # Only --model loads a tokenizer: a config's model field always has a value (its default), so it
    # cannot say whether the user wants the length rules applied.
    cfg = load_train_config(args.config, flag_overrides(args, {d: FIELDS[d] for d in _TRAIN_FLAGS}))
    if not cfg.trajectories:
        raise ExpragError("export needs --trajectories (flags or --config)")
    tokenizer = load_tokenizer(args.model) if args.model else None
    chats, counts = training_chats(cfg, tokenizer)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(chats, args.format)))
    memory = f"memory from {cfg.retrieval.bank}, K={cfg.retrieval.memory.k}" if cfg.retrieval.bank else "no memory (plain LoRA)"
    print(f"wrote {counts.examples} {args.format} training examples ({memory}) to {args.out}"
          + (f"; {counts.dropped_overlong} over max_length={cfg.max_length} dropped" if counts.dropped_overlong else "")
          + ("" if counts.checked_length else "; lengths not checked (give --model to apply max_length)"))
    return 0
