"""A training run directory: create it, check that it may be resumed (same recipe, same data), find
its resume point, and drop the metrics lines a resumed run will write again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from exprag.config import changed_fields
from exprag.errors import ExpragError
from exprag.io import LOCK_FILE, atomic_write_text, iter_json_lines
from exprag.train.config import LOGGING_FIELDS, TrainConfig, to_dict
from exprag.train.prepare import input_digests

CONFIG_FILE = "train_config.yaml"
# Fields that may change when resuming (more epochs, other logging / selection); anything else
# would make the resumed run a different experiment.
_RESUMABLE_CHANGES = {"epochs", "out", "save_every_steps", "log_every_steps", "keep_checkpoints",
                      "selection", "val_trajectories", *LOGGING_FIELDS}


class RunDirError(ExpragError):
    """An output directory that exists (without --resume / --overwrite) or cannot be resumed."""


def is_train_run(path: Path) -> bool:
    """An exprag training run directory (what ``train`` writes first: its config, then state)."""
    return any((Path(path) / name).exists() for name in (CONFIG_FILE, "state.json", "data_report.json"))


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool, main: bool = True) -> Path | None:
    """Create or check ``cfg.out``. Returns the checkpoint to resume from (None = fresh start)."""
    out = Path(cfg.out)
    if resume and overwrite:
        raise RunDirError("choose one of --resume and --overwrite")
    exists = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if exists and not (resume or overwrite):
        raise RunDirError(f"{out} exists; pass --resume to continue its training or --overwrite to "
                          "start over (which deletes it)")
    if exists and overwrite:
        if main:  # everything but the lock this process holds
            for p in out.iterdir():
                if p.name != LOCK_FILE:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        return None
    if not exists or not (out / "state.json").is_file():
        return None
    saved_file = out / CONFIG_FILE
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        now = to_dict(cfg)
        changed = changed_fields(saved, now, _RESUMABLE_CHANGES)
        if changed:
            key = changed[0]
            raise RunDirError(
                f"{saved_file}: field {key!r} was {saved.get(key)!r}, now {now.get(key)!r}; a resumed "
                "run must keep its recipe (only epochs, logging and selection may change); use --overwrite"
            )
    report = out / "data_report.json"
    if report.is_file():
        before = json.loads(report.read_text(encoding="utf-8")).get("inputs", [])
        if before and before != input_digests(cfg):
            raise RunDirError(f"{report}: the training files changed since this run started; use --overwrite")
    state = json.loads((out / "state.json").read_text(encoding="utf-8"))
    ckpt = out / state["last"]
    if not (ckpt / "optimizer.pt").is_file():
        raise RunDirError(f"{ckpt}: missing optimizer.pt; this checkpoint cannot be resumed")
    return ckpt


def write_run_config(cfg: TrainConfig) -> None:
    """The resolved config, which a resumed run is checked against."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to ``step``: the steps after the resume point will be redone and logged again."""
    if not path.is_file():
        return
    keep = [obj for _, obj in iter_json_lines(path) if obj.get("step", 0) <= step]
    # The same serialization as append_jsonl: kept lines stay byte for byte as they were.
    atomic_write_text(path, "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in keep))
