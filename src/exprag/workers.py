"""Environments in worker processes (``--workers N``) or Ray actors (``--ray ADDRESS``).

Each worker hosts environment instances that it starts itself (the JVM-based envs, ScienceWorld and
TWX, must start in the process that uses them). The main process keeps the model and talks to an env
through an ``EnvProxy``, a ``TextEnv`` whose calls run in the worker, so the agent keeps one code path.
Parallelism comes from threads in the main process, each blocked on one worker (a pipe read or
``ray.get`` releases the GIL); every env sees the same calls in the same order as in one process,
so the results are the same as a serial run's.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from exprag.envs.base import Reset, Step, TaskSpec
from exprag.errors import EnvError
from exprag.validate import positive_int

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class WorkerSpec:
    """Where environments run: ``workers`` processes on this machine, or Ray actors on the cluster at
    ``ray`` (an address for ``ray.init``; ``local`` starts a head on this machine). ``workers == 1``
    without ``ray`` runs everything in this process, as before workers existed."""

    workers: int = 1
    ray: str | None = None

    @property
    def in_process(self) -> bool:
        return self.workers <= 1 and self.ray is None


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """``--workers`` / ``--ray``: where the environments run (collect and eval take the same two)."""
    p.add_argument("--workers", type=positive_int, default=1,
                   help="run the environments in N worker processes (default 1: in this process); "
                        "the results are the same as with 1")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the --workers as Ray actors on the cluster at ADDRESS (ray.init(address=...)); "
                        "'local' starts a head on this machine. Needs the optional package ray")


def spec_from_args(args: Any) -> WorkerSpec:
    return WorkerSpec(args.workers, args.ray)


# ---- the worker side ---------------------------------------------------------------------------------
class _Host:
    """The env instances of one worker, keyed by a small integer the main process chooses."""

    def __init__(self) -> None:
        self.envs: dict[int, Any] = {}

    def make(self, idx: int, name: str, env_args: dict[str, Any]) -> tuple[str, bool]:
        from exprag.envs import make_env

        env = self.envs[idx] = make_env(name, **env_args)
        return env.name, bool(env.cheap_admissible)

    def call(self, idx: int, method: str, args: tuple) -> Any:
        return getattr(self.envs[idx], method)(*args)

    def attr(self, idx: int, name: str) -> Any:
        return getattr(self.envs[idx], name)

    def expert(self, idx: int, task: TaskSpec, max_steps: int | None) -> Any:
        from exprag.expert import run_expert

        return run_expert(self.envs[idx], task, max_steps)

    def close(self, idx: int) -> None:
        env = self.envs.pop(idx, None)
        if env is not None:
            env.close()

    def close_all(self) -> None:
        errors = []
        for idx in list(self.envs):
            try:
                self.close(idx)
            except Exception as e:  # noqa: BLE001 - close the others first
                errors.append(e)
        if errors:
            raise errors[0]

    def run(self, op: str, args: tuple) -> tuple[str, Any]:
        """One request; an exception comes back as a value, re-raised as itself in the main process."""
        try:
            return "ok", getattr(self, op)(*args)
        except Exception as e:  # noqa: BLE001 - every error travels back to the caller
            return "err", _portable(e)


def _portable(e: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception that does not pickle travels as an EnvError
        return EnvError(f"{type(e).__name__}: {e}")


def _serve(conn) -> None:
    """A worker process: answer requests until the pipe closes. Ctrl-C and SIGTERM reach the whole
    process group: the main process handles them and closes the pipes; a worker ends quietly (its
    traceback in the middle of the user's terminal would say nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host = _Host()
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                break
            conn.send(host.run(op, args))
    finally:
        host.run("close_all", ())  # on the way out: an error closing is of no use to anyone


# ---- the main-process side ---------------------------------------------------------------------------
class _ProcessWorker:
    def __init__(self, ctx) -> None:
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()  # one request in flight per worker

    def request(self, op: str, *args: Any) -> tuple[str, Any]:
        with self._lock:
            try:
                self._conn.send((op, args))
                return self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise EnvError(f"worker process {self._proc.pid} died (exit code {self._proc.exitcode})") from None

    def shutdown(self) -> None:
        self._conn.close()
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


class _RayWorker:
    def __init__(self, actor_cls) -> None:
        self._actor = actor_cls.remote()

    def request(self, op: str, *args: Any) -> tuple[str, Any]:
        import ray

        return ray.get(self._actor.run.remote(op, args))

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self._actor.run.remote("close_all", ()))
        except Exception:  # noqa: BLE001 - the actor is going anyway
            pass
        ray.kill(self._actor)


def _call(worker, op: str, *args: Any) -> Any:
    status, value = worker.request(op, *args)
    if status == "err":
        raise value
    return value


def connect_ray(address: str) -> None:
    """``ray.init`` once per process; ``local`` starts a head on loopback."""
    try:
        import ray
    except ImportError:
        raise EnvError("--ray needs the optional package ray (pip install ray; see requirements.lock)") from None
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


class WorkerPool:
    """``spec.workers`` workers (processes, or Ray actors with ``spec.ray``), closed on exit."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        n = max(1, spec.workers)
        if spec.ray is not None:
            connect_ray(spec.ray)
            import ray

            actor = ray.remote(num_cpus=1)(_Host)
            self._workers: list = [_RayWorker(actor) for _ in range(n)]
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # a forked JVM client is not safe
            self._workers = [_ProcessWorker(ctx) for _ in range(n)]
        self._next = 0
        self._threads = ThreadPoolExecutor(max_workers=n, thread_name_prefix="exprag-worker")

    def __len__(self) -> int:
        return len(self._workers)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for w in self._workers:
            w.shutdown()

    def make_envs(self, name: str, env_args: dict[str, Any], n: int) -> list["EnvProxy"]:
        """``n`` env instances spread round robin over the workers, started there in parallel."""
        slots = []
        for _ in range(n):
            slots.append((self._workers[self._next % len(self._workers)], self._next))
            self._next += 1
        infos = list(self._threads.map(lambda s: _call(s[0], "make", s[1], name, env_args), slots))
        return [EnvProxy(w, idx, env_name, cheap) for (w, idx), (env_name, cheap) in zip(slots, infos)]

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any]) -> list[R]:
        """``fn`` over ``iterables`` (as builtin ``map``) on the pool's threads, results in order."""
        args = list(zip(*iterables))
        if len(args) <= 1:
            return [fn(*a) for a in args]
        return list(self._threads.map(lambda a: fn(*a), args))

    def ordered(self, fn: Callable[["EnvProxy", T], R], envs: Sequence["EnvProxy"], items: Iterable[T],
                lookahead: int) -> Iterator[tuple[T, R | BaseException]]:
        """``fn(env, item)`` for each item, at most ``lookahead`` at once on free ``envs``; yields
        (item, result or the exception it raised) in the order of ``items``."""
        free = list(envs)
        lock = threading.Lock()

        def job(item: T) -> R | BaseException:
            with lock:
                env = free.pop()
            try:
                return fn(env, item)
            except Exception as e:  # noqa: BLE001 - handed to the caller in order
                return e
            finally:
                with lock:
                    free.append(env)

        window = max(1, min(lookahead, len(envs)))
        pending: list = []
        it = iter(items)
        while True:
            while len(pending) < window:
                try:
                    item = next(it)
                except StopIteration:
                    break
                pending.append((item, self._threads.submit(job, item)))
            if not pending:
                return
            item, fut = pending.pop(0)
            yield item, fut.result()


class EnvProxy:
    """A ``TextEnv`` whose instance lives in a worker; calls block until the worker answers."""

    def __init__(self, worker, idx: int, name: str, cheap_admissible: bool) -> None:
        self._worker = worker
        self._idx = idx
        self.name = name
        self.cheap_admissible = cheap_admissible

    def _call(self, method: str, *args: Any) -> Any:
        return _call(self._worker, "call", self._idx, method, args)

    def expert_episode(self, task: TaskSpec, max_steps: int | None = None):
        """The whole expert episode in the worker (``expert.run_expert``): one round trip."""
        return _call(self._worker, "expert", self._idx, task, max_steps)

    @property
    def version(self) -> str:
        return _call(self._worker, "attr", self._idx, "version")

    @property
    def action_syntax(self) -> str | None:
        return _call(self._worker, "attr", self._idx, "action_syntax")

    def task_types(self) -> list[str]:
        return self._call("task_types")

    def tasks(self, split: str, task_types: list[str]) -> list[TaskSpec]:
        return self._call("tasks", split, task_types)

    def reset(self, task: TaskSpec) -> Reset:
        return self._call("reset", task)

    def step(self, action: str) -> Step:
        return self._call("step", action)

    def expert_action(self) -> str | None:
        return self._call("expert_action")

    def admissible_actions(self) -> list[str]:
        return self._call("admissible_actions")

    def action_templates(self) -> list[str]:
        return self._call("action_templates")

    def normalize_action(self, text: str) -> str:
        return self._call("normalize_action", text)

    def max_steps(self, task: TaskSpec) -> int:
        return self._call("max_steps", task)

    def close(self) -> None:
        _call(self._worker, "close", self._idx)

    def __enter__(self) -> "EnvProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
