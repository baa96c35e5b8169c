"""An experiment's cells as Ray tasks (``eval.ray`` / ``exprag experiment --ray ADDRESS``).

The driver (``exprag experiment``) keeps the expert data, the banks and the training, and decides
which cells are finished; each unfinished cell becomes one Ray task that runs the serial runner's own
``_run_cell`` into the cell's directory, with its own model and its envs in the task itself. The
run directory stays the single source of truth (a rerun resumes from it as usual), so it must be on a
filesystem every node sees at the same path: the driver writes a probe file into it and each task reads
it back before it does any work.
"""

from __future__ import annotations

import os
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from exprag.config import EvalConfig
from exprag.errors import ExpragError
from exprag.io import atomic_write_text

if TYPE_CHECKING:
    from exprag.experiment import Cell

PROBE = ".ray-probe"
# Switches the exprag command sets for itself, which tasks on other nodes would not inherit.
_FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


class SharedFilesystemError(ExpragError):
    """A Ray node does not see the experiment directory the driver writes."""


@dataclass(frozen=True)
class SharedDir:
    """The experiment directory as the driver sees it: what every task must find at the same path."""

    probe: str  # absolute path of the probe file
    token: str  # its content, unique to this run
    cwd: str  # the driver's working directory: a cell's paths may be relative to it

    def check(self) -> None:
        """Raise SharedFilesystemError unless this process reads the driver's probe and working directory."""
        try:
            seen = Path(self.probe).read_text(encoding="utf-8")
        except OSError as e:
            seen = f"unreadable ({e.strerror or e})"
        where = f"Ray node {platform.node()}"
        if seen != self.token:
            raise SharedFilesystemError(
                f"{self.probe}: {where} cannot read the probe file the driver wrote there "
                f"({'missing' if seen.startswith('unreadable') else 'other content'}); the experiment directory "
                "must be on a shared filesystem that every Ray node mounts at the same path")
        if not os.path.isdir(self.cwd):
            raise SharedFilesystemError(
                f"{self.cwd}: {where} does not have the driver's working directory, to which the experiment's "
                "paths are relative; give an absolute --out on a shared filesystem")


def write_probe(out: Path) -> SharedDir:
    probe = out.resolve() / PROBE
    token = uuid.uuid4().hex
    atomic_write_text(probe, token)
    return SharedDir(str(probe), token, os.getcwd())


def _cell_task(shared: SharedDir, cell: "Cell", ecfg: EvalConfig) -> dict[str, Any]:
    """One cell in a Ray worker: the serial runner's code, after checking the shared directory (so
    that a node without it writes nothing)."""
    shared.check()
    from exprag.experiment import _lazy_model, _run_cell
    from exprag.workers import WorkerSpec

    old = os.getcwd()
    os.chdir(shared.cwd)  # a worker's own cwd is Ray's; the cell's paths are the driver's
    try:
        return _run_cell(ecfg, cell, _lazy_model(ecfg), False, WorkerSpec())
    finally:
        os.chdir(old)


@dataclass(frozen=True)
class CellResources:
    """What one cell task asks Ray for: with ``gpus=1`` a GPU cluster runs one cell per GPU."""

    cpus: float = 1.0
    gpus: float = 0.0


def run_cells(address: str, out: Path, jobs: Sequence[tuple["Cell", EvalConfig]],
              resources: CellResources) -> Iterator[tuple["Cell", dict[str, Any]]]:
    """Submit one task per ``(cell, eval config)`` in ``jobs``; yield ``(cell, cell record)`` as tasks
    finish. The first failure cancels the tasks still out (their cells resume episode by
    episode on a rerun) and is raised naming its cell."""
    from exprag.workers import connect_ray

    connect_ray(address)
    import ray

    shared = write_probe(out)
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    task = ray.remote(_cell_task).options(num_cpus=resources.cpus, num_gpus=resources.gpus,
                                          runtime_env={"env_vars": env} if env else None)
    pending = {task.remote(shared, cell, ecfg): cell for cell, ecfg in jobs}
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            yield cell, _result(ray, ref, cell.id)
    finally:
        for ref in pending:  # a failure, or the driver stopped (Ctrl-C, on_cell raised)
            ray.cancel(ref)
        Path(shared.probe).unlink(missing_ok=True)


def _result(ray: Any, ref: Any, cell_id: str) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise cell_error(cell_id, e.cause if e.cause is not None else e) from e
    except ray.exceptions.RayError as e:  # the worker or its node died
        raise cell_error(cell_id, e) from e


def cell_error(cell_id: str, e: BaseException) -> Exception:
    """The error of a cell's task, naming the cell: a user's problem keeps its ExpragError type (the
    CLI exits 2), anything else is an internal error (exit 1)."""
    if isinstance(e, ExpragError):
        return type(e)(f"cell {cell_id}: {e}")  # exprag's errors take one message
    return RuntimeError(f"cell {cell_id}: {type(e).__name__}: {e}")
