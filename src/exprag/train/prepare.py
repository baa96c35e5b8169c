"""The examples of a training run: trajectories (and memory from a bank) -> tokenized training and
validation examples, with the data report written to the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from exprag.io import sha256_file
from exprag.train.config import TrainConfig, TrainConfigError
from exprag.train.data import BuildReport, Example, build_examples, load_trajectories

Log = Callable[[str], None]


def input_digests(cfg: TrainConfig) -> list[dict[str, str]]:
    """The training files and their sha256 (a resumed run must train on the same data)."""
    return [{"path": str(p), "sha256": sha256_file(Path(p))} for p in cfg.trajectories]


def leakage_warnings(cfg: TrainConfig, bank: Any, trajs: list[Any]) -> list[str]:
    """Loud warnings: evaluation-split trajectories in the bank or the training data leak."""
    bad_splits = {"test"} | ({cfg.selection.split} if cfg.selection.every else set())
    out = []
    if bank is not None:
        for split in sorted(bad_splits):
            n = sum(1 for t in bank.trajectories if t.split == split)
            if n:
                out.append(f"WARNING: LEAKAGE: bank {cfg.retrieval.bank} holds {n} trajectories of the {split!r} split; "
                           f"training with it leaks evaluation data. Build the training bank from train-split "
                           f"trajectories only.")
    for split in sorted(bad_splits):
        n = sum(1 for t in trajs if t.split == split)
        if n:
            out.append(f"WARNING: LEAKAGE: {n} training trajectories are from the {split!r} split.")
    return out


def prepare_data(cfg: TrainConfig, tokenizer: Any, *, progress: bool = False,
                 log: Log | None = None) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Training and validation examples, plus the data report (with leakage warnings)."""
    from exprag.bank import load_bank
    from exprag.progress import bar

    trajs, load_rep = load_trajectories(cfg.trajectories, only_successful=cfg.only_successful)
    if not trajs:
        raise TrainConfigError(f"no trainable trajectories in {', '.join(cfg.trajectories)} "
                               f"({len(load_rep.skipped_unsuccessful)} unsuccessful skipped)")
    bank = load_bank(cfg.retrieval.bank) if cfg.retrieval.bank else None
    warnings = leakage_warnings(cfg, bank, trajs)
    for w in warnings:
        if log:
            log(w)
    def build(ts: list[Any], desc: str) -> tuple[list[Example], BuildReport]:
        return build_examples(
            ts, tokenizer, bank=bank, memory=cfg.retrieval.memory, leakage=cfg.leakage,
            empty_memory_fraction=cfg.empty_memory_fraction,
            serialization=cfg.serialization, max_length=cfg.max_length, overlong=cfg.overlong,
            train_eot=cfg.train_eot, seed=cfg.seed,
            progress=(lambda it: bar(it, desc=desc, unit="ex", enabled=True)) if progress else None,
        )

    train_ex, rep = build(trajs, "tokenize")
    val_ex: list[Example] = []
    val_rep: BuildReport | None = None
    if cfg.val_trajectories:
        vtrajs, _ = load_trajectories(cfg.val_trajectories, only_successful=cfg.only_successful)
        val_ex, val_rep = build(vtrajs, "tokenize val")
    if not train_ex:
        raise TrainConfigError(f"every example is longer than max_length={cfg.max_length}; raise it")
    problems = len(rep.dropped_overlong) + len(rep.truncated) + len(rep.trimmed_memory)
    if problems and log:
        log(f"over max_length={cfg.max_length}: {len(rep.trimmed_memory)} examples lost memory trajectories, "
            f"{len(rep.truncated)} truncated after a whole turn, {len(rep.dropped_overlong)} dropped "
            "(ids in data_report.json)")
    report = {
        "inputs": input_digests(cfg),
        "load": {"read": load_rep.read, "skipped_unsuccessful": len(load_rep.skipped_unsuccessful),
                 "splits": load_rep.splits},
        "train": rep.summary(),
        "val": val_rep.summary() if val_rep else None,
        "warnings": warnings,
        "trimmed_memory": rep.trimmed_memory,
        "truncated": rep.truncated,
        "dropped_overlong": rep.dropped_overlong,
        "bank": bank.describe() if bank is not None and hasattr(bank, "describe") else cfg.retrieval.bank,
    }
    return train_ex, val_ex, report
