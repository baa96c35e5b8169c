"""Checkpoint selection by rollout success, not by validation loss (docs/method.md#checkpoint-selection):
out-of-distribution success keeps rising after the validation loss turns up.

``Selection`` keeps the metric history in RUN_DIR/selection.json, points RUN_DIR/best at the best
checkpoint (a relative symlink; a copy where symlinks fail), and plots success and validation loss
against epochs in RUN_DIR/selection.png. Ties go to the later checkpoint: out-of-distribution
success keeps rising with training, so an equal score is no reason to stop early; with a
small selection set (or a small model scoring 0 everywhere) the earlier rule kept epoch 1.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from exprag.config import EvalConfig, RetrievalConfig
from exprag.errors import ExpragError
from exprag.io import atomic_write_json

if TYPE_CHECKING:
    from exprag.train.config import SelectionConfig, TrainConfig

HISTORY = "selection.json"
PLOT = "selection.png"
BEST = "best"


class Selection:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        f = self.run_dir / HISTORY
        self.history: list[dict[str, Any]] = (
            json.loads(f.read_text(encoding="utf-8"))["history"] if f.is_file() else []
        )

    def has(self, epoch: int) -> bool:
        return any(h["epoch"] == epoch for h in self.history)

    def best_record(self) -> dict[str, Any] | None:
        best = None
        for h in self.history:  # history is sorted by epoch: >= lets ties go to the later checkpoint
            if best is None or h["success_rate"] >= best["success_rate"]:
                best = h
        return best

    def best(self) -> Path | None:
        rec = self.best_record()
        return self.run_dir / rec["checkpoint"] if rec else None

    def add(self, epoch: int, checkpoint: str | Path, success_rate: float, *,
            val_loss: float | None = None, train_loss: float | None = None) -> Path:
        """Record one evaluated checkpoint; returns the best checkpoint so far (RUN_DIR/best points at it)."""
        # Relative to the run directory, whether the paths given are absolute or relative to the cwd.
        rel = Path(os.path.relpath(Path(checkpoint).resolve(), self.run_dir.resolve()))
        self.history.append({"epoch": epoch, "checkpoint": str(rel), "success_rate": success_rate,
                             "val_loss": val_loss, "train_loss": train_loss})
        self.history.sort(key=lambda h: h["epoch"])
        best = self.best_record()
        assert best is not None
        atomic_write_json(self.run_dir / HISTORY, {"best": best, "history": self.history})
        self._point_best(best["checkpoint"])
        self.plot()
        return self.run_dir / best["checkpoint"]

    def _point_best(self, rel: str) -> None:
        link = self.run_dir / BEST
        tmp = self.run_dir / f".{BEST}.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp)
        try:
            os.symlink(rel, tmp, target_is_directory=True)
        except OSError:  # filesystems without symlinks: copy the adapter
            shutil.copytree(self.run_dir / rel, tmp)
        if link.exists() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)

    def plot(self) -> Path | None:
        """Success and validation loss vs epoch; None when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(epochs, [100 * h["success_rate"] for h in self.history], "o-", color="tab:blue",
                label="rollout success (%)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("success (%)", color="tab:blue")
        best = self.best_record()
        if best:
            ax.axvline(best["epoch"], color="tab:blue", ls=":", lw=1)
        losses = [(h["epoch"], h["val_loss"]) for h in self.history if h.get("val_loss") is not None]
        train = [(h["epoch"], h["train_loss"]) for h in self.history if h.get("train_loss") is not None]
        if losses or train:
            ax2 = ax.twinx()
            if losses:
                ax2.plot(*zip(*losses), "s--", color="tab:red", label="validation loss")
            if train:
                ax2.plot(*zip(*train), "^:", color="tab:gray", label="train loss")
            ax2.set_ylabel("loss", color="tab:red")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
        labels = [lab for a in fig.axes for lab in a.get_legend_handles_labels()[1]]
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        ax.set_title("checkpoint selection by rollout success (dotted: best)")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        out = self.run_dir / PLOT
        tmp = out.with_name(f".{PLOT}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out)
        return out


def selection_eval_config(sel: SelectionConfig, base: EvalConfig, adapter: str | Path, retrieval: RetrievalConfig,
                          out: str | Path, *, task_types: str | None = None,
                          task_ids: list[str] | None = None) -> EvalConfig:
    """The evaluation of one checkpoint on the selection split: ``base`` (env, model, agent settings,
    seed) with the adapter on the hf backend and the memory the method uses at test time.
    ``task_types``: the selection's types as eval takes them (default ``sel.task_types``);
    ``task_ids``: only these games (an experiment's expert ceiling)."""
    return replace(base, split=sel.split, task_types=task_types or sel.task_types, per_type=sel.per_type,
                   limit=sel.limit, adapter=str(adapter), backend="hf", base_url=None, retrieval=retrieval,
                   max_steps=sel.max_steps or base.max_steps, batch_size=sel.batch_size, out=str(out),
                   task_ids=task_ids)


def rollout_eval(config_for: Callable[[Path], EvalConfig]) -> Callable[[Path], float]:
    """``checkpoint -> success rate`` of the rollout evaluation (``exprag.evaluate``) that
    ``config_for(checkpoint)`` describes; evaluate() resumes its run directory, so an interrupted
    selection does not replay finished episodes."""
    from exprag.evaluate import evaluate

    return lambda ckpt: float(evaluate(config_for(ckpt)).success_rate)


def make_rollout_eval(cfg: TrainConfig, run_dir: str | Path) -> Callable[[Path], float]:
    """Selection for ``exprag train``: the selection split with the model's inference-time retrieval
    (``selection.bank``, else the training bank), results in RUN_DIR/eval/<ckpt>."""
    sel = cfg.selection
    base = EvalConfig(env=sel.env or _env_of(cfg), model=cfg.model, seed=cfg.seed)
    retrieval = replace(cfg.retrieval, bank=sel.bank or cfg.retrieval.bank)
    return rollout_eval(lambda ckpt: selection_eval_config(sel, base, ckpt, retrieval,
                                                           Path(run_dir) / "eval" / Path(ckpt).name))


def _env_of(cfg: TrainConfig) -> str:
    from exprag.trajectory import iter_jsonl

    for p in cfg.trajectories:
        for t in iter_jsonl(p):
            return t.env
    raise ExpragError("selection.env is not set and the training files are empty")
