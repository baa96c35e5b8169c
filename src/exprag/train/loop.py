"""The training loop: optimizer steps over length-bucketed batches, epoch after epoch, with events
for callbacks (callbacks.py) that log, checkpoint and select; TRL-style hooks without TRL.

Events, in order: ``on_train_begin``; per optimizer step ``on_step``; per epoch ``on_epoch_end``
(the epoch's checkpoint is saved there) then ``on_evaluate`` (the epoch's figures, validation loss
included: logged, and scored by rollouts when due); ``on_train_end``. Callbacks run in list order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from exprag.io import pause_for_test
from exprag.train.config import TrainConfig
from exprag.train.data import Example, collate, length_batches, split_micro
from exprag.train.loss import lm_loss, validation_loss

# The running sums a mid-epoch checkpoint carries (trainer_state.json "sums": epoch totals, then the
# open logging window), so that a resumed epoch logs the same loss and token counts as an
# uninterrupted one. JSON keeps floats exact.
_SUMS = ("ep_loss", "ep_items", "ep_tokens", "ep_time", "ep_cpu", "win_loss", "win_items", "win_tokens", "win_time")


@dataclass(frozen=True)
class StepStats:
    """One optimizer step."""

    loss: float  # mean loss over its trained tokens
    items: int  # trained (action) tokens
    tokens: int  # all tokens but padding
    seconds: float
    cpu_seconds: float  # all threads


@dataclass
class Sums:
    """Running sums over optimizer steps: an epoch's, or a logging window's."""

    loss: float = 0.0  # loss x trained tokens
    items: int = 0
    tokens: int = 0
    time: float = 0.0
    cpu: float = 0.0

    def add(self, step: StepStats) -> None:
        self.loss += step.loss * step.items
        self.items += step.items
        self.tokens += step.tokens
        self.time += step.seconds
        self.cpu += step.cpu_seconds


@dataclass
class RunState:
    """Where a run stands; what a checkpoint records (trainer_state.json) and a resume restores."""

    epoch: int = 0  # epochs finished; during an epoch, its 0-based index
    batches_done: int = 0  # of the running epoch
    batches_in_epoch: int = 0  # this process's share
    global_step: int = 0
    epoch_sums: Sums = field(default_factory=Sums)
    window: Sums = field(default_factory=Sums)  # steps since the last logged step line
    tokens_total: int = 0  # this run's steps only (for TrainResult's tokens/s)
    time_total: float = 0.0
    last_checkpoint: Path | None = None
    best: Path | None = None  # the best checkpoint by rollout success: never pruned

    @classmethod
    def resumed(cls, trainer_state: dict[str, Any], ckpt: Path) -> RunState:
        st = cls(epoch=trainer_state["epoch"], batches_done=trainer_state["batches_done"],
                 batches_in_epoch=trainer_state["batches_in_epoch"], global_step=trainer_state["global_step"],
                 last_checkpoint=ckpt)
        sums = trainer_state.get("sums")
        if st.batches_done and sums:  # resumed mid-epoch: the epoch's record counts the batches done before too
            e, w = st.epoch_sums, st.window
            e.loss, e.items, e.tokens, e.time, e.cpu, w.loss, w.items, w.tokens, w.time = (sums[k] for k in _SUMS)
        return st

    def trainer_state(self, *, with_sums: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batches_done": self.batches_done,
                                 "batches_in_epoch": self.batches_in_epoch, "global_step": self.global_step}
        if with_sums:
            e, w = self.epoch_sums, self.window
            state["sums"] = dict(zip(_SUMS, (e.loss, e.items, e.tokens, e.time, e.cpu,
                                             w.loss, w.items, w.tokens, w.time)))
        return state


@dataclass(frozen=True)
class EpochStats:
    """A finished epoch's figures (this process's training steps; the validation loss on the main process)."""

    epoch: int  # 1-based
    train_loss: float | None
    val_loss: float | None
    tokens: int
    train_s: float
    train_cpu_s: float


class Callback:
    """Hooks the loop calls; each does nothing unless overridden."""

    def on_train_begin(self, state: RunState) -> None: ...

    def on_step(self, state: RunState, step: StepStats) -> None: ...

    def on_epoch_end(self, state: RunState) -> None: ...

    def on_evaluate(self, state: RunState, epoch: EpochStats) -> None: ...

    def on_train_end(self, state: RunState) -> None: ...


@dataclass
class Loop:
    """The optimizer loop over this process's share of the batches (accelerate: DDP when launched so)."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    model: Any  # prepared by acc
    optimizer: Any
    train_ex: list[Example]
    val_ex: list[Example]
    pad_id: int
    micro: int  # micro-batch size
    keep_logits: bool  # see loss.lm_loss
    autocast: Callable[[], Any]
    callbacks: Sequence[Callback] = ()
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(e) for e in self.train_ex]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        world, rank = self.acc.num_processes, self.acc.process_index
        bs = length_batches(self.lengths, batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch)
        usable = len(bs) // world * world or len(bs)  # equal counts per rank: DDP never waits forever
        return bs[rank:usable:world]

    def emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def run(self, state: RunState) -> None:
        self.emit("on_train_begin", state)
        for epoch in range(state.epoch, self.cfg.epochs):
            mine = self.epoch_batches(epoch)
            state.epoch, state.batches_in_epoch = epoch, len(mine)
            if not state.batches_done:  # else resumed mid-epoch, with the sums so far
                state.epoch_sums, state.window = Sums(), Sums()
            for i in range(state.batches_done, len(mine)):
                step = self.step(mine[i])
                state.global_step += 1
                state.batches_done = i + 1
                state.epoch_sums.add(step)
                state.window.add(step)
                self.emit("on_step", state, step)
            state.epoch, state.batches_done = epoch + 1, 0
            ep = state.epoch_sums
            state.tokens_total += ep.tokens
            state.time_total += ep.time
            # The unwrapped model: a DDP forward on one rank alone would wait for the others.
            with self.autocast():
                val_loss = (validation_loss(self.acc.unwrap_model(self.model), self.val_ex, self.micro,
                                            self.pad_id, self.acc.device)
                            if self.val_ex and self.acc.is_main_process else None)
            self.emit("on_epoch_end", state)
            self.emit("on_evaluate", state, EpochStats(
                epoch=epoch + 1, train_loss=ep.loss / max(ep.items, 1) if ep.items else None, val_loss=val_loss,
                tokens=ep.tokens, train_s=ep.time, train_cpu_s=ep.cpu))
            self.acc.wait_for_everyone()
            pause_for_test("train-epoch")
        self.emit("on_train_end", state)

    def step(self, batch: list[int]) -> StepStats:
        """One optimizer step on ``batch`` (example indices), in micro-batches with gradient accumulation."""
        t0, c0 = time.perf_counter(), time.process_time()
        micro_batches = [collate([self.train_ex[j] for j in mb], self.pad_id)
                         for mb in split_micro(batch, self.lengths, self.micro, self.cfg.max_batch_tokens)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        loss_sum = 0.0
        for k, mb in enumerate(micro_batches):
            mb = {key: v.to(self.acc.device) for key, v in mb.items()}
            last = k == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                # Loss = sum over the step's trained tokens / their count: micro-batches of
                # different sizes weigh by tokens, as one big batch would.
                with self.autocast():
                    loss = lm_loss(self.model, mb, n_items, self.keep_logits)
                self.acc.backward(loss)
            loss_sum += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        n_tok = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        return StepStats(loss=loss_sum, items=n_items, tokens=n_tok, seconds=seconds, cpu_seconds=cpu_seconds)
