"""`exprag eval`: run a model (optionally with an adapter and a bank) over a split; resumable."""

from __future__ import annotations

import argparse

from exprag.validate import non_negative_int, positive_int
from exprag.workers import add_worker_flags, spec_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model with or without retrieval (resumable run directory)",
                       description="Run the agent on a split and write config, per-episode results, "
                                   "trajectories and metrics to --out. Rerunning resumes.")
    p.add_argument("--config", default=None, help="YAML EvalConfig; flags below override its fields")
    p.add_argument("--env", default=None, help="alfworld | scienceworld | twx")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="environment option (repeatable), e.g. data_dir=/path/to/alfworld")
    p.add_argument("--split", default=None, choices=["train", "dev", "test"])
    p.add_argument("--task-types", default=None, help="easy | hard | all | comma list")
    p.add_argument("--per-type", type=positive_int, default=None)
    p.add_argument("--limit", type=positive_int, default=None)
    p.add_argument("--model", default=None, help="smollm2-135m | HF id in the local cache | local path")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory")
    p.add_argument("--backend", default=None, choices=["hf", "openai"])
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds per request to --base-url before retrying once, then failing (default: 60); "
                        "the server's API key comes from $OPENAI_API_KEY or $EXPRAG_API_KEY")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="requests in flight to --base-url at once (default: 8)")
    bank = p.add_mutually_exclusive_group()
    bank.add_argument("--bank", default=None, metavar="BANK_DIR")
    bank.add_argument("--no-bank", action="store_true")
    p.add_argument("-k", type=non_negative_int, default=None)
    p.add_argument("--mode", default=None, choices=["static", "dynamic"])
    p.add_argument("--memory-format", default=None, choices=["json", "text"])
    p.add_argument("--token-budget", type=positive_int, default=None,
                   help="max tokens of the memory block, shortening its trajectories (counted by the "
                        "model's tokenizer; the chars/4 estimate for an OpenAI-compatible server)")
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None, help="episodes stepped together")
    p.add_argument("--write-back", action="store_true", help="append finished episodes to the bank")
    p.add_argument("--show-admissible", action="store_true", help="list valid actions in the prompt")
    p.add_argument("--out", default=None, metavar="RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    add_worker_flags(p)
    p.set_defaults(func=run)


# flag dest -> the EvalConfig field it overrides (dotted for nested sections)
FIELDS = {name: name for name in ("env", "split", "task_types", "per_type", "limit", "model", "adapter", "backend",
                                  "base_url", "request_timeout", "concurrency", "max_steps", "max_new_tokens",
                                  "batch_size",
                                  "write_back", "show_admissible", "out")}
# the memory settings
FIELDS.update({"k": "retrieval.k", "mode": "retrieval.mode", "memory_format": "retrieval.memory_format",
               "token_budget": "retrieval.token_budget"})


def build_config(args: argparse.Namespace):
    from exprag.commands._args import flag_overrides
    from exprag.config import EvalConfig, load_yaml, set_fields

    cfg = load_yaml(EvalConfig, args.config) if args.config else EvalConfig()
    set_fields(cfg, flag_overrides(args, FIELDS))
    if not (type(cfg.request_timeout) in (int, float) and 0 < cfg.request_timeout <= 86400):
        from exprag.errors import DataFormatError

        raise DataFormatError(f"{args.config or '--request-timeout'}: field 'request_timeout' must be a "
                              f"number of seconds in (0, 86400], got {cfg.request_timeout!r}")
    if args.env_arg:
        from exprag.commands._args import parse_env_args

        cfg.env_args = {**cfg.env_args, **parse_env_args(args.env_arg)}
    if args.no_bank or args.bank:
        cfg.retrieval = cfg.retrieval.with_fields({"bank": None if args.no_bank else args.bank})
    return cfg


def run(args: argparse.Namespace) -> int:
    from exprag.evaluate import evaluate

    cfg = build_config(args)
    res = evaluate(cfg, progress=True, overwrite=args.overwrite, workers=spec_from_args(args))
    m = res.metrics
    print(f"{cfg.env}/{cfg.split} {','.join(m['task_types'])}: success {m['successes']}/{m['n']} "
          f"= {m['success_rate']:.1%} (95% CI {m['ci95'][0]:.1%}–{m['ci95'][1]:.1%}); "
          f"{res.new_episodes} new episodes, {res.skipped} resumed")
    for t, b in m["per_type"].items():
        print(f"  {t}: {b['successes']}/{b['n']} = {b['success_rate']:.1%}")
    print(f"run directory: {res.out}")
    return 0
