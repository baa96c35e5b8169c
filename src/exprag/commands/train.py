"""`exprag train` (LoRA / ExpRAG-LoRA) and `exprag train merge`."""

from __future__ import annotations

import argparse
import os
import sys

from exprag.validate import fraction, integer, non_negative_int, positive_float, positive_int

# flag dest -> the TrainConfig field it overrides (dotted for nested sections)
FIELDS = {name: name for name in (
    "trajectories", "val_trajectories", "model", "out", "empty_memory_fraction", "leakage", "serialization",
    "max_length", "overlong", "epochs", "lr", "batch_size", "max_batch_tokens", "micro_batch_size", "precision",
    "optimizer", "seed", "gradient_checkpointing", "save_every_steps", "keep_checkpoints", "report_to")}
# the memory settings
FIELDS.update({"k": "retrieval.k", "mode": "retrieval.mode", "memory_format": "retrieval.memory_format",
               "token_budget": "retrieval.token_budget", "bank": "retrieval.bank"})
FIELDS.update({f"eval_{name}": f"selection.{name}" for name in ("every", "env", "split", "task_types", "per_type",
                                                                 "limit", "bank")})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="LoRA fine-tuning on trajectories (ExpRAG-LoRA with --bank); `train merge` folds an adapter",
        description="Train a LoRA adapter with the paper's recipe (configs/train-*.yaml). With --bank, every "
                    "example carries the memory block retrieved as at inference (ExpRAG-LoRA), never its own "
                    "task. Multi-GPU: accelerate launch -m exprag train ... (or torchrun -m exprag train ...).",
    )
    p.add_argument("--config", metavar="X.yaml", help="a TrainConfig YAML; flags override its fields")
    p.add_argument("--trajectories", nargs="+", metavar="F.jsonl", help="training trajectories")
    p.add_argument("--val-trajectories", nargs="+", metavar="F.jsonl", help="validation-loss trajectories")
    p.add_argument("--model", help="bundled alias (smollm2-135m), local directory / .gguf, or cached hub id")
    p.add_argument("--out", metavar="RUN_DIR")
    bank = p.add_mutually_exclusive_group()
    bank.add_argument("--bank", metavar="BANK_DIR", help="training bank: ExpRAG-LoRA (none: plain LoRA)")
    bank.add_argument("--no-bank", action="store_true", help="plain LoRA even if the config names a bank")
    p.add_argument("-k", type=non_negative_int, dest="k", help="memory trajectories per example (default 2)")
    p.add_argument("--mode", choices=["static", "dynamic"], help="retrieval mode (default static)")
    p.add_argument("--memory-format", choices=["json", "text"])
    p.add_argument("--token-budget", type=positive_int,
                   help="max tokens of the memory block (the model's tokenizer counts); longer memories are shortened")
    p.add_argument("--leakage", choices=["task", "scene"],
                   help="memories never from the example's task (default; ALFWorld: every trial of its task "
                        "folder), or also from its ALFWorld scene")
    p.add_argument("--empty-memory-fraction", type=fraction, metavar="P",
                   help="fraction of examples trained with an empty memory block (default 0)")
    p.add_argument("--serialization", choices=["trajectory", "step"],
                   help="one example per trajectory (default) or per step")
    p.add_argument("--max-length", type=positive_int)
    p.add_argument("--overlong", choices=["trim", "drop"])
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--batch-size", type=positive_int, help="examples per optimizer step")
    p.add_argument("--max-batch-tokens", type=positive_int)
    p.add_argument("--micro-batch-size", type=positive_int, help="examples per forward pass (default: 1 on CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--optimizer", choices=["auto", "paged_adamw_8bit", "adamw"])
    p.add_argument("--seed", type=integer)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward: less memory, ~30%% slower")
    p.add_argument("--save-every-steps", type=positive_int, metavar="N")
    p.add_argument("--keep-checkpoints", type=positive_int, metavar="N")
    p.add_argument("--eval-every", type=positive_int, metavar="E",
                   help="rollout-evaluate every E epochs and keep the best checkpoint (RUN_DIR/best)")
    p.add_argument("--eval-env")
    p.add_argument("--eval-split", help="selection split (default dev; never the split you report)")
    p.add_argument("--eval-task-types", help="easy | hard | all | comma list (default hard)")
    p.add_argument("--eval-per-type", type=positive_int)
    p.add_argument("--eval-limit", type=positive_int)
    p.add_argument("--eval-bank", metavar="BANK_DIR", help="memory at evaluation (default: --bank)")
    p.add_argument("--report-to", metavar="TRACKER", help="also log to accelerate trackers, comma-separated: "
                   "tensorboard (RUN_DIR/tracking; pip install 'exprag[tensorboard]'), wandb, mlflow, ... (default none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete RUN_DIR and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    tsub = p.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    m = tsub.add_parser("merge", help="merge a LoRA adapter into its base model (merge_and_unload)")
    m.add_argument("--adapter", required=True, metavar="DIR")
    m.add_argument("--out", required=True, metavar="DIR", dest="merge_out")
    m.add_argument("--model", dest="merge_model", help="base model (default: the adapter's)")
    m.add_argument("--overwrite", action="store_true", dest="merge_overwrite")
    m.set_defaults(func=run_merge)


def _err(msg: str) -> None:
    print(f"exprag: {msg}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    from exprag.commands._args import flag_overrides
    from exprag.train.config import load_train_config

    overrides = flag_overrides(args, FIELDS)
    if args.no_bank:
        overrides[FIELDS["bank"]] = ""
    cfg = load_train_config(args.config, overrides)
    cfg.retrieval = cfg.retrieval.with_fields({"bank": cfg.retrieval.bank or None})
    missing = [flag for flag, value in (("--trajectories", cfg.trajectories), ("--model", cfg.model)) if not value]
    if missing:
        _err(f"error: train needs {' and '.join(missing)} (flags or --config)")
        return 2
    if args.out is None and not args.config:
        _err("error: train needs --out RUN_DIR (or a --config that sets out)")
        return 2
    from exprag.train.lora import train  # checks its inputs before torch loads: a bad start fails in a second

    res = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                log=_err)
    if int(os.environ.get("RANK", "0")) != 0:  # multi-GPU: the main process reports
        return 0
    print(f"trained {res.epochs_done} epochs ({res.steps} steps) in {res.wall_s:.1f}s, "
          f"{res.tokens_per_s:.0f} tokens/s; adapter: {res.last_checkpoint}")
    if res.best_checkpoint is not None:
        best = max(res.history, key=lambda h: h["success_rate"])
        print(f"best checkpoint by rollout success: {best['checkpoint']} "
              f"(epoch {best['epoch']}, success {best['success_rate']:.3f}) -> {res.best_checkpoint}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from exprag.train.model import merge_adapter

    out = merge_adapter(args.adapter, args.merge_out, model=args.merge_model, overwrite=args.merge_overwrite)
    print(f"merged {args.adapter} into {out}")
    return 0
