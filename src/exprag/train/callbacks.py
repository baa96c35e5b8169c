"""What happens around the optimizer steps (loop.py events): the progress bar, metrics.jsonl lines,
checkpoints, and checkpoint selection by rollout success (docs/method.md#checkpoint-selection)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exprag.io import append_jsonl
from exprag.train.checkpoint import epoch_checkpoint, save_checkpoint, step_checkpoint
from exprag.train.loop import Callback, EpochStats, RunState, StepStats, Sums
from exprag.train.model import peak_memory_mb
from exprag.train.select import Selection

Log = Callable[[str], None]


class ProgressBar(Callback):
    def __init__(self, steps_per_epoch: int, epochs: int, world: int):
        from exprag.progress import bar

        self.steps_per_epoch, self.world = steps_per_epoch, world
        self.bar = bar(total=epochs * steps_per_epoch, desc="train", unit="step", enabled=True)

    def on_train_begin(self, state: RunState) -> None:
        self.bar.update(state.epoch * self.steps_per_epoch + state.batches_done)

    def on_step(self, state: RunState, step: StepStats) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{step.tokens * self.world / step.seconds:.0f}")

    def on_train_end(self, state: RunState) -> None:
        self.bar.close()


@dataclass
class MetricsLog(Callback):
    """metrics.jsonl: a "step" line every ``log_every_steps`` (the window's mean loss and tokens/s)
    and an "epoch" line per epoch; the epoch's summary on ``say``. Main process only."""

    path: Path
    log_every_steps: int
    lr: float
    epochs: int
    world: int
    started: float  # time.perf_counter() at the start of train()
    say: Log

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 2)

    def on_step(self, state: RunState, step: StepStats) -> None:
        if state.global_step % self.log_every_steps:
            return
        w = state.window
        append_jsonl(self.path, {
            "event": "step", "epoch": round(state.epoch + state.batches_done / state.batches_in_epoch, 4),
            "step": state.global_step, "loss": w.loss / max(w.items, 1),
            "tokens_per_s": w.tokens * self.world / w.time, "lr": self.lr, "elapsed_s": self.elapsed(),
        })
        state.window = Sums()

    def on_evaluate(self, state: RunState, epoch: EpochStats) -> None:
        tokens_per_s = (epoch.tokens * self.world / epoch.train_s) if epoch.train_s else None
        append_jsonl(self.path, {
            "event": "epoch", "epoch": epoch.epoch, "step": state.global_step, "train_loss": epoch.train_loss,
            "val_loss": epoch.val_loss, "tokens_per_s": tokens_per_s,
            # Training steps only; CPU time (all threads) is the steadier figure on a shared machine.
            "tokens": epoch.tokens, "train_s": round(epoch.train_s, 3), "train_cpu_s": round(epoch.train_cpu_s, 3),
            "peak_memory_mb": round(peak_memory_mb(), 1), "checkpoint": f"checkpoints/{epoch_checkpoint(epoch.epoch)}",
            "elapsed_s": self.elapsed(),
        })
        loss = epoch.train_loss
        self.say(f"epoch {epoch.epoch}/{self.epochs}: train loss {loss if loss is None else round(loss, 4)}"
                 + (f", val loss {epoch.val_loss:.4f}" if epoch.val_loss is not None else "")
                 + (f", {tokens_per_s:.0f} tokens/s" if tokens_per_s else ""))


@dataclass
class Checkpointer(Callback):
    """A checkpoint after each epoch, and every ``save_every_steps`` within one (with the running
    sums, see loop.RunState). Every process takes part; the main one writes."""

    acc: Any
    model: Any
    optimizer: Any
    out: Path
    save_every_steps: int | None
    keep_checkpoints: int | None

    def on_step(self, state: RunState, step: StepStats) -> None:
        every = self.save_every_steps
        if every and state.global_step % every == 0 and state.batches_done < state.batches_in_epoch:
            self.save(state, step_checkpoint(state.global_step), state.trainer_state(with_sums=True))

    def on_epoch_end(self, state: RunState) -> None:
        self.save(state, epoch_checkpoint(state.epoch), state.trainer_state())

    def save(self, state: RunState, name: str, trainer_state: dict[str, Any]) -> None:
        path = self.out / "checkpoints" / name
        if self.acc.is_main_process:
            protected = {state.best.name} if state.best is not None else set()
            path = save_checkpoint(self.acc.unwrap_model(self.model), self.optimizer, self.out, name,
                                   trainer_state, self.keep_checkpoints, protected)
        self.acc.wait_for_everyone()
        state.last_checkpoint = path


@dataclass
class RolloutSelection(Callback):
    """Score epoch checkpoints by rollout success every ``every`` epochs and after the last; the best
    is ``RUN_DIR/best`` (select.Selection). Main process only."""

    selection: Selection
    rollout_eval: Callable[[Path], float]
    out: Path
    every: int
    epochs: int
    say: Log

    def due(self, epoch: int) -> bool:
        return (epoch % self.every == 0 or epoch == self.epochs) and not self.selection.has(epoch)

    def on_train_begin(self, state: RunState) -> None:
        for e in range(1, state.epoch + 1):  # a run interrupted during an evaluation: score what it left unscored
            ckpt = self.out / "checkpoints" / epoch_checkpoint(e)
            if self.due(e) and ckpt.is_dir():
                self.score(state, e, ckpt, None, None)

    def on_evaluate(self, state: RunState, epoch: EpochStats) -> None:
        if self.due(epoch.epoch):
            assert state.last_checkpoint is not None
            self.score(state, epoch.epoch, state.last_checkpoint, epoch.val_loss, epoch.train_loss)

    def score(self, state: RunState, epoch: int, ckpt: Path, val_loss: float | None,
              train_loss: float | None) -> None:
        success = float(self.rollout_eval(ckpt))
        state.best = self.selection.add(epoch, ckpt, success, val_loss=val_loss, train_loss=train_loss)
        append_jsonl(self.out / "metrics.jsonl", {"event": "eval", "epoch": epoch, "success_rate": success,
                                                  "checkpoint": str(ckpt.relative_to(self.out))})
        self.say(f"epoch {epoch}: rollout success {success:.3f} (best: {state.best.name})")


def check_trackers(names: list[str]) -> None:
    """Before anything loads: a tracker asked for (``report_to``) whose package is not installed is an
    error, not the silent skip accelerate would make of it."""
    import importlib.util

    from exprag.train.config import TRACKERS, TrainConfigError

    for name in names:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKERS[name]):
            extra = f"pip install 'exprag[{name}]'" if name == "tensorboard" else f"pip install {TRACKERS[name][0]}"
            raise TrainConfigError(f"train config field 'report_to': tracker {name!r} is not installed ({extra})")


class Tracker(Callback):
    """Experiment trackers through accelerate's tracker classes (``report_to``; TensorBoard writes to
    RUN_DIR/tracking/<run name>): the training loss per optimizer step, the epoch's train and
    validation loss, and the rollout success of each checkpoint selection. Main process only."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any], selection: Selection | None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            # as accelerate's init_trackers builds them: (project or run name[, logging dir])
            args = (out.name, str(out / "tracking")) if cls.requires_logging_directory else (out.name,)
            tracker = cls(*args)
            tracker.start()
            tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)
        self.selection = selection
        # scored before this process started: logged by the process that scored them
        self.logged = {h["epoch"] for h in selection.history} if selection is not None else set()

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def on_train_begin(self, state: RunState) -> None:
        self.log_selection(state)  # checkpoints a resumed run scored on its way in

    def on_step(self, state: RunState, step: StepStats) -> None:
        self.log({"train/loss": step.loss}, state.global_step)

    def on_evaluate(self, state: RunState, epoch: EpochStats) -> None:
        values = {"train/epoch": float(epoch.epoch)}
        if epoch.train_loss is not None:
            values["train/epoch_loss"] = epoch.train_loss
        if epoch.val_loss is not None:
            values["eval/val_loss"] = epoch.val_loss
        self.log(values, state.global_step)
        self.log_selection(state)  # runs after RolloutSelection in the callback list

    def log_selection(self, state: RunState) -> None:
        for h in self.selection.history if self.selection is not None else []:
            if h["epoch"] not in self.logged:
                self.logged.add(h["epoch"])
                self.log({"eval/rollout_success": h["success_rate"], "eval/epoch": float(h["epoch"])},
                         state.global_step)

    def on_train_end(self, state: RunState) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyperparameters as trackers take them: flat keys, scalar values (None and lists as text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out
