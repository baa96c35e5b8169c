"""The LoRA recipe (docs/method.md#lora-recipe) and ExpRAG-LoRA (docs/method.md#exprag-lora): a plain
torch loop on transformers + peft. ``train()`` sets a run up (accelerate, model, data, resume point)
and runs the loop (loop.py) with its callbacks (callbacks.py: progress, metrics, checkpoints, selection).

Why not TRL's SFTTrainer: our examples are already tokenized with exact masks, and what we need
around the loop (length-bucketed batches, adapter-only checkpoints with optimizer state, rollout
selection between epochs) is short to write and measured faster here (bench/bench_train.py).

Multi-GPU without code changes: the loop runs under ``accelerate.Accelerator``; launched with
``accelerate launch -m exprag train ...`` or ``torchrun --nproc_per_node N -m exprag train ...``
each process trains on its share of the batches (DDP), the main process writes everything.

Run directory layout::

    train_config.yaml        the resolved config
    data_report.json         examples, tokens, trimmed / truncated / dropped, warnings, inputs (sha256)
    metrics.jsonl            {"event": "step" | "epoch" | "eval", ...}: loss, tokens/s, val loss, success
    checkpoints/epoch-003/   adapter (PEFT) + trainer_state.json; the latest also optimizer.pt, rng.pt
    checkpoints/step-000120/ mid-epoch checkpoints (save_every_steps)
    state.json               the latest checkpoint (resume point)
    selection.json/.png, best -> checkpoints/epoch-00N   with rollout selection (see select.py)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from exprag.io import atomic_write_json, check_output_dir, run_lock
from exprag.train.callbacks import Checkpointer, MetricsLog, ProgressBar, RolloutSelection, Tracker, check_trackers
from exprag.train.checkpoint import load_checkpoint, resumed_step
from exprag.train.config import TrainConfig, to_dict
from exprag.train.loop import Callback, Loop, RunState
from exprag.train.loss import supports_logits_to_keep
from exprag.train.model import add_lora, load_model, make_optimizer, resolve_precision
from exprag.train.prepare import prepare_data
from exprag.train.rundir import is_train_run, prepare_run_dir, trim_metrics, write_run_config

Log = Callable[[str], None]


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    steps: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          rollout_eval: Callable[[Path], float] | None = None, progress: bool = False,
          log: Log | None = None) -> TrainResult:
    """Train a LoRA adapter (ExpRAG-LoRA when ``cfg.retrieval.bank`` is set) into ``cfg.out``.

    ``rollout_eval(adapter_dir) -> success rate`` scores checkpoints when ``cfg.selection.every``
    is set; None = ``exprag.evaluate`` on ``cfg.selection`` (see select.make_rollout_eval).
    ``cfg.out`` must be absent, empty or a training run; the main process locks it for the run.
    """
    from exprag.preflight import check_train_inputs

    kw = dict(resume=resume, overwrite=overwrite, rollout_eval=rollout_eval, progress=progress, log=log)
    cfg.validate()
    check_train_inputs(cfg)  # model, data and banks, before torch loads: a failed start creates no run directory
    check_trackers(cfg.trackers())
    if os.environ.get("RANK", "0") != "0":  # another process of a distributed run: the main one locks
        return _train(cfg, **kw)
    check_output_dir(cfg.out, "training run directory", is_train_run)
    with run_lock(cfg.out, "training run directory"):
        return _train(cfg, **kw)


def _train(cfg: TrainConfig, *, resume: bool, overwrite: bool, rollout_eval: Callable[[Path], float] | None,
           progress: bool, log: Log | None) -> TrainResult:
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from transformers import set_seed

    from exprag.train.select import Selection, make_rollout_eval

    started = time.perf_counter()
    precision = resolve_precision(cfg.precision)
    # Autocast is ours, not Accelerator(mixed_precision=...): accelerate's state is a process-wide
    # singleton that refuses a second train() call with another precision.
    # A long timeout: with rollout selection the other processes wait while the main one evaluates.
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])

    def autocast() -> Any:
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)

    main = acc.is_main_process
    say: Log = (log if (log and main) else (lambda s: None))
    resume_from = prepare_run_dir(cfg, resume=resume, overwrite=overwrite, main=main)
    acc.wait_for_everyone()
    out = Path(cfg.out)
    if main:
        write_run_config(cfg)
        # Steps logged after the checkpoint we resume from will be redone: drop their lines.
        trim_metrics(out / "metrics.jsonl", resumed_step(resume_from))

    set_seed(cfg.seed)
    # bf16: bf16 base weights on GPU (the paper's recipe, half the memory); on CPU fp32 weights under
    # bf16 autocast (as fast, and exact master weights). LoRA weights stay fp32 (peft upcasts them).
    dtype = torch.bfloat16 if precision == "bf16" and torch.cuda.is_available() else torch.float32
    tokenizer, base, _ = load_model(cfg.model, dtype=dtype, device=acc.device)
    train_ex, val_ex, data_report = prepare_data(cfg, tokenizer, progress=progress and main, log=say)
    if main:
        atomic_write_json(out / "data_report.json", data_report)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base, cfg)
    optimizer, opt_name = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)

    state = RunState()
    if resume_from is not None:
        state = RunState.resumed(load_checkpoint(resume_from, model, optimizer), resume_from)
        say(f"resuming from {resume_from} (epoch {state.epoch + state.batches_done / max(state.batches_in_epoch, 1):.2f}, "
            f"step {state.global_step})")
    keep_logits = supports_logits_to_keep(model)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    micro = cfg.micro_batch_size or (cfg.batch_size if acc.device.type == "cuda" else 1)
    loop = Loop(cfg=cfg, acc=acc, model=model, optimizer=optimizer, train_ex=train_ex, val_ex=val_ex,
                pad_id=pad_id, micro=micro, keep_logits=keep_logits, autocast=autocast)
    steps_per_epoch = len(loop.epoch_batches(0))
    world = acc.num_processes
    selection = Selection(out) if main else None
    if cfg.selection.every and rollout_eval is None and main:
        rollout_eval = make_rollout_eval(cfg, out)
    say(f"{len(train_ex)} examples ({data_report['train']['tokens']} tokens, "
        f"{data_report['train']['trained_tokens']} trained), {steps_per_epoch} steps/epoch, "
        f"batch {cfg.batch_size} (micro {micro}), {opt_name}, {precision}, {world} process(es) on {acc.device}"
        + (f" ({torch.get_num_threads()} threads)" if acc.device.type == "cpu" else ""))

    callbacks: list[Callback] = []
    if progress and main:
        callbacks.append(ProgressBar(steps_per_epoch, cfg.epochs, world))
    if main:
        callbacks.append(MetricsLog(out / "metrics.jsonl", cfg.log_every_steps, cfg.lr, cfg.epochs, world,
                                    started, say))
    callbacks.append(Checkpointer(acc, model, optimizer, out, cfg.save_every_steps, cfg.keep_checkpoints))
    if selection is not None:
        state.best = selection.best()
        if cfg.selection.every:
            assert rollout_eval is not None
            callbacks.append(RolloutSelection(selection, rollout_eval, out, cfg.selection.every, cfg.epochs, say))
    if main and cfg.trackers():
        callbacks.append(Tracker(cfg.trackers(), out, to_dict(cfg), selection))
    loop.callbacks = callbacks
    loop.run(state)
    return TrainResult(
        out=out, epochs_done=cfg.epochs, steps=state.global_step, last_checkpoint=state.last_checkpoint,
        best_checkpoint=(out / "best") if selection and selection.best() else None,
        history=selection.history if selection else [], wall_s=time.perf_counter() - started,
        tokens_per_s=(state.tokens_total * world / state.time_total) if state.time_total else 0.0,
        data=data_report,
    )
