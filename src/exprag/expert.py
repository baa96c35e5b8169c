"""Run an environment's expert (gold / hand-coded policy) and record trajectories."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from exprag.envs.base import EnvRestarted, Reset, Step, TaskSpec, TextEnv
from exprag.errors import EnvError, ExpragError
from exprag.trajectory import Trajectory
from exprag.workers import WorkerSpec


def trajectory_id(env: str, task: TaskSpec, source: str) -> str:
    return f"{env}:{task.split}:{task.task_type}:{task.task_id}:{source}"


@dataclass
class EpisodeRecorder:
    """Accumulates one episode's turns and turns them into a Trajectory (shared by expert and agent)."""

    env: TextEnv
    task: TaskSpec
    reset: Reset
    source: str
    messages: list[dict[str, str]] = field(default_factory=list)
    reward: float = 0.0
    won: bool = False
    done: bool = False
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.messages.append({"role": "user", "content": self.reset.observation})

    def record(self, action: str, step: Step) -> None:
        self.messages.append({"role": "assistant", "content": action})
        self.messages.append({"role": "user", "content": step.observation})
        self.steps += 1
        self.reward = step.reward
        self.won = self.won or step.won
        self.done = step.done

    def trajectory(self, meta: dict | None = None, traj_id: str | None = None, timed: bool = True) -> Trajectory:
        """``timed=False`` leaves out the wall time, so that the record depends on the episode only."""
        m = {"wall_s": round(time.perf_counter() - self.started, 3)} if timed else {}
        m.update(self.task.meta.get("trajectory_meta", {}))
        m.update(meta or {})
        return Trajectory(
            id=traj_id or trajectory_id(self.env.name, self.task, self.source),
            env=self.env.name,
            env_version=self.env.version,
            split=self.task.split,
            task_type=self.task.task_type,
            task_id=self.task.task_id,
            task=self.reset.task,
            messages=list(self.messages),
            success=bool(self.won),
            reward=float(self.reward),
            num_steps=self.steps,
            source=self.source,
            meta=m,
            action_syntax=self.env.action_syntax,
        )


def run_expert(env: TextEnv, task: TaskSpec, max_steps: int | None = None) -> Trajectory:
    """Play the expert to the end of the episode (or the step cap). An episode lost to a simulator
    restart (``EnvRestarted``) is played again from its start, once."""
    try:
        return _play_expert(env, task, max_steps)
    except EnvRestarted as e:
        first = str(e)
    try:
        return _play_expert(env, task, max_steps)
    except EnvRestarted as e:
        raise EnvError(f"{first}; replayed, and it died again: {e}") from None


def _play_expert(env: TextEnv, task: TaskSpec, max_steps: int | None) -> Trajectory:
    reset = env.reset(task)
    rec = EpisodeRecorder(env, task, reset, source="expert")
    cap = max_steps or env.max_steps(task)
    while not rec.done and rec.steps < cap:
        action = env.expert_action()
        if action is None:
            break
        rec.record(action, env.step(action))
    # Untimed: two collections of the same tasks write identical bytes.
    return rec.trajectory(timed=False)


@dataclass
class CollectReport:
    collected: int = 0
    failures: list[tuple[TaskSpec, str]] = field(default_factory=list)  # task, reason


def collect(env: TextEnv, tasks: Iterable[TaskSpec], *, report: CollectReport | None = None) -> Iterator[Trajectory]:
    """Yield one expert trajectory per task. Episodes that do not reach success are yielded too
    (with ``success=False``) and listed in ``report.failures``; an env error on one task is
    recorded and the collection goes on."""
    report = report if report is not None else CollectReport()
    for task in tasks:
        traj = _play_reported(env, task, report)
        if traj is not None:
            yield traj


def _play_reported(env: TextEnv, task: TaskSpec, report: CollectReport) -> Trajectory | None:
    """One expert episode, its failure (if any) recorded in ``report``; None after an env error."""
    try:
        outcome: Trajectory | EnvError = run_expert(env, task)
    except EnvError as e:
        outcome = e
    return _report(task, outcome, report)


def _report(task: TaskSpec, outcome: Trajectory | BaseException, report: CollectReport) -> Trajectory | None:
    """Record an expert episode's failure in ``report``: an env error (None), or no success."""
    if isinstance(outcome, EnvError):
        report.failures.append((task, str(outcome)))
        return None
    if isinstance(outcome, BaseException):
        raise outcome
    traj = outcome
    if not traj.success:
        report.failures.append((task, f"expert ended without success after {traj.num_steps} steps "
                                      f"(score {traj.reward:g})"))
    report.collected += 1
    return traj


def _expert_outcomes(env: TextEnv, tasks: Iterable[TaskSpec], workers: WorkerSpec,
                     env_args: dict[str, Any] | None) -> Iterator[tuple[TaskSpec, Trajectory | BaseException]]:
    """(task, trajectory or the exception its episode raised), in the order of ``tasks``. With workers,
    episodes run in parallel on worker envs started with ``env_args`` (a list of tasks is played ahead;
    a generator, which decides its next task from the last episode, one at a time)."""
    if workers.in_process:
        for task in tasks:
            try:
                yield task, run_expert(env, task)
            except EnvError as e:
                yield task, e
        return
    from exprag.workers import WorkerPool

    with WorkerPool(workers) as pool:
        envs = pool.make_envs(env.name, dict(env_args or {}), len(pool))
        lookahead = len(envs) if isinstance(tasks, Sequence) else 1
        yield from pool.ordered(lambda e, t: e.expert_episode(t), envs, tasks, lookahead)


@dataclass(frozen=True)
class CollectedFile:
    """What ``collect_to_file`` played and wrote."""

    path: Path
    tasks: list[TaskSpec]  # every task the expert played, in order
    trajectories: list[Trajectory]  # the ones written to ``path``
    failures: list[tuple[TaskSpec, str]]  # task, why the expert did not succeed
    manifest: Path | None  # the split manifest beside ``path``, when one was written


def collect_to_file(
    env: TextEnv,
    tasks: Iterable[TaskSpec],
    path: str | Path,
    *,
    desc: str,
    total: int | None = None,
    progress: bool | None = None,
    keep_failures: bool = False,
    manifest: bool = True,
    on_episode: Callable[[TaskSpec, Trajectory | None], None] | None = None,
    empty_error: str | None = None,
    workers: WorkerSpec = WorkerSpec(),
    env_args: dict[str, Any] | None = None,
) -> CollectedFile:
    """Play the expert on ``tasks`` and write its trajectories to ``path`` atomically (successful ones
    only unless ``keep_failures``), with a split manifest beside it (``manifest``): the task list and
    its hash, the number written, the hash of the bytes written, and the failures.

    ``tasks`` may be a generator that decides the next task from what ``on_episode(task, trajectory or
    None after an env error)`` has seen so far. ``empty_error``: with nothing to write, raise ExpragError
    with this message instead, writing nothing (the file's existence means a finished collection).
    ``workers``: play the episodes in worker processes / Ray actors, each with its own env started
    with ``env_args``; the file is byte for byte the one a serial collection writes."""
    from exprag.envs.splits import write_manifest
    from exprag.io import pause_for_test, sha256_file
    from exprag.progress import bar
    from exprag.trajectory import write_jsonl

    path = Path(path)
    if total is None and isinstance(tasks, list):
        total = len(tasks)
    report = CollectReport()
    played: list[TaskSpec] = []
    written: list[Trajectory] = []
    pbar = bar(total=total, desc=desc, unit="ep", enabled=progress)
    with _interrupt_flag() as interrupted:
        try:
            for task, outcome in _expert_outcomes(env, tasks, workers, env_args):
                if interrupted():  # the simulator died with the Ctrl-C: this "failure" is the interrupt
                    raise KeyboardInterrupt
                _record(task, outcome, report, played, written, keep_failures, on_episode, pbar)
        except Exception:
            if interrupted():  # e.g. py4j's own error from a connection cut by the interrupt
                raise KeyboardInterrupt from None
            raise
        if interrupted():
            raise KeyboardInterrupt
    pbar.close()
    if empty_error is not None and not written:
        raise ExpragError(empty_error)
    pause_for_test("collect-done")  # kill tests: all the work done, nothing written yet
    n = write_jsonl(path, written)
    mpath = None
    if manifest:
        # sha256 covers the task list; content_sha256 the bytes written (same command + seed: same hash).
        mpath = write_manifest(path, played, collected=n, content_sha256=sha256_file(path), failures=[
            {"task_id": t.task_id, "task_type": t.task_type, "reason": why} for t, why in report.failures])
    return CollectedFile(path, played, written, list(report.failures), mpath)


def _record(task: TaskSpec, outcome: Trajectory | BaseException, report: CollectReport, played: list[TaskSpec],
            written: list[Trajectory], keep_failures: bool,
            on_episode: Callable[[TaskSpec, Trajectory | None], None] | None, pbar: Any) -> None:
    traj = _report(task, outcome, report)
    played.append(task)
    if traj is not None and (traj.success or keep_failures):
        written.append(traj)
    if on_episode:
        on_episode(task, traj)
    pbar.update(1)
    pbar.set_postfix(ok=sum(t.success for t in written), failed=len(report.failures))


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """Whether a SIGINT arrived during the block. Ctrl-C reaches the whole process group: the JVM of
    TWX / ScienceWorld dies with it, py4j may turn the KeyboardInterrupt into a connection error, and
    every remaining episode then "fails" in an instant; a collection must not write that as its
    output. The previous handler still runs (by default it raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    seen = []
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)
