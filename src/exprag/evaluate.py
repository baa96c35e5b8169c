"""Evaluation: run the agent over a split, resumably, and measure success per task type.

A run directory holds::

    config.json          the resolved EvalConfig (a rerun with another config is refused)
    results.jsonl        one line per finished episode, appended (fsync) as episodes finish
    trajectories.jsonl   the episodes as Trajectory records, appended likewise
    metrics.json         success overall and per task type, counts, 95% intervals (atomic)

Rerunning the same command skips every episode already in results.jsonl.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exprag.config import EvalConfig, changed_fields, to_dict
from exprag.errors import RunConfigError
from exprag.io import (append_jsonl, atomic_write_json, atomic_write_text, check_output_dir, iter_json_lines,
                       pause_for_test, read_json_object, run_lock, truncate_torn_tail)
from exprag.stats import wilson  # its home is exprag.stats; exprag.evaluate.wilson stays importable
from exprag.validate import read_json
from exprag.workers import WorkerPool, WorkerSpec

# Fields that may change between a run and its resumption without changing what is measured.
_RESUMABLE = {"out", "batch_size", "limit", "per_type", "request_timeout", "concurrency"}


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, Any]
    new_episodes: int = 0
    skipped: int = 0

    @property
    def success_rate(self) -> float:
        return float(self.metrics["success_rate"])


def compute_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        s = sum(bool(r["success"]) for r in rs)
        gen = sum(r.get("gen_s", 0.0) for r in rs)
        toks = sum(r.get("prefill_tokens", 0) + r.get("completion_tokens", 0) for r in rs)
        out = {
            "n": n, "successes": s,
            "success_rate": round(s / n, 4) if n else 0.0,
            "ci95": wilson(s, n),
            "mean_steps": round(sum(r["steps"] for r in rs) / n, 2) if n else 0.0,
            "tokens_per_s": round(toks / gen, 1) if gen > 0 else None,
            "unparsable_rate": _rate(rs, "unparsable"),
        }
        if rs and all("invalid_actions" in r for r in rs):
            out["valid_action_rate"] = round(1 - _rate(rs, "invalid_actions") - out["unparsable_rate"], 4)
        return out

    by_type: dict[str, list] = defaultdict(list)
    for r in rows:
        by_type[r["task_type"]].append(r)
    return {**block(rows), "per_type": {t: block(rs) for t, rs in sorted(by_type.items())}}


def _rate(rows: list[dict[str, Any]], key: str) -> float:
    steps = sum(r["steps"] for r in rows)
    return round(sum(r.get(key, 0) for r in rows) / steps, 4) if steps else 0.0


def read_results(path: Path) -> list[dict[str, Any]]:
    """Finished episodes; a torn last line (killed mid-write) is dropped, any other bad line is an error."""
    if not path.is_file():
        return []
    return [row for _, row in iter_json_lines(path, torn_tail=True)]


def _drop_orphan_trajectories(path: Path, keep: set[str]) -> None:
    """A kill between the two appends leaves a trajectory without its result line; the episode
    will be rerun, so its first trajectory goes."""
    if not path.is_file():
        return
    records = [obj for _, obj in iter_json_lines(path)]
    kept = [obj for obj in records if obj.get("id") in keep]
    if len(kept) != len(records):  # the kept lines come back byte for byte: append_jsonl's serialisation
        atomic_write_text(path, "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in kept))


def _check_config(out: Path, cfg: EvalConfig, overwrite: bool) -> None:
    path = out / "config.json"
    want = to_dict(cfg)
    if path.is_file() and not overwrite:
        have = read_json(path, RunConfigError)
        diff = changed_fields(have, want, _RESUMABLE)
        if diff:
            k = diff[0]
            raise RunConfigError(
                f"{path}: field '{k}' is {have.get(k)!r} in the existing run but {want.get(k)!r} now; "
                "use another --out, or --overwrite to discard the old run"
            )
    if overwrite:
        for name in ("results.jsonl", "trajectories.jsonl", "metrics.json"):
            (out / name).unlink(missing_ok=True)
    atomic_write_json(path, want)


def is_eval_run(path: Path) -> bool:
    """An exprag eval run directory: its config.json is an evaluation's settings."""
    cfg = read_json_object(Path(path) / "config.json")
    return cfg is not None and {"env", "split", "model", "retrieval"} <= cfg.keys()


def evaluate(cfg: EvalConfig, *, model=None, progress: bool = False, overwrite: bool = False,
             on_episode: Callable[[dict[str, Any]], None] | None = None,
             workers: WorkerSpec = WorkerSpec()) -> EvalResult:
    """Run (or resume) an evaluation. ``model``: a loaded ChatModel to share between runs.
    ``workers``: where the envs run (the model stays here); not part of the run's config, since the
    results are the same wherever the envs run.

    ``cfg.out`` must be absent, empty or an eval run; it is locked for the run (a second process on
    it gets RunLockedError)."""
    check_output_dir(cfg.out, "eval run directory", is_eval_run)
    with run_lock(cfg.out, "eval run directory"):
        return _evaluate(cfg, model=model, progress=progress, overwrite=overwrite, on_episode=on_episode,
                         workers=workers)


def _evaluate(cfg: EvalConfig, *, model, progress: bool, overwrite: bool,
              on_episode: Callable[[dict[str, Any]], None] | None, workers: WorkerSpec) -> EvalResult:
    from exprag.agent import Agent, AgentConfig
    from exprag.bank import Retriever, append_to_bank
    from exprag.envs import env_spec, make_env
    from exprag.envs.splits import select_tasks
    from exprag.preflight import check_eval_inputs
    from exprag.progress import bar

    # Everything a start can fail on is checked before the run directory exists.
    types, bank = check_eval_inputs(cfg, check_model_spec=model is None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg, overwrite)
    for name in ("results.jsonl", "trajectories.jsonl"):
        truncate_torn_tail(out / name)
    rows = read_results(out / "results.jsonl")
    done = {r["task_id"] for r in rows}
    _drop_orphan_trajectories(out / "trajectories.jsonl", {r["trajectory_id"] for r in rows})

    retriever = Retriever(bank) if bank is not None else None

    envs = []
    hosts = None  # the worker pool the envs live in, when not in this process
    try:
        env_args = {**env_spec(cfg.env).agent_defaults, **cfg.env_args}  # agent runs need no expert
        first = make_env(cfg.env, **env_args)
        envs.append(first)
        pool = first.tasks(cfg.split, types)
        if cfg.task_ids is not None:
            wanted = set(cfg.task_ids)
            pool = [t for t in pool if t.task_id in wanted]
        tasks = select_tasks(pool, cfg.per_type, cfg.limit)
        todo = [t for t in tasks if t.task_id not in done]
        if todo:
            if model is None:
                transport = openai_transport(cfg)
                model = LazyModel(cfg.model, adapter=cfg.adapter, backend=cfg.backend, base_url=cfg.base_url,
                                  **transport)
            n = min(cfg.batch_size, len(todo))
            if workers.in_process:
                for _ in range(n - 1):
                    envs.append(make_env(cfg.env, **env_args))
            else:  # the batch's envs start in the workers; the one that listed the tasks is done
                envs.pop().close()
                hosts = WorkerPool(workers)
                envs.extend(hosts.make_envs(cfg.env, env_args, n))
        agent = Agent(model, retriever, AgentConfig(memory=cfg.retrieval.memory, max_steps=cfg.max_steps,
                                                    max_new_tokens=cfg.max_new_tokens,
                                                    show_admissible=cfg.show_admissible,
                                                    same_task_memory=bool(cfg.oracle_memory)),
                      step_map=hosts.map if hosts is not None else None)
        pbar = bar(total=len(tasks), desc=f"eval {cfg.env}/{cfg.split}", unit="ep", enabled=progress or None)
        pbar.update(len(tasks) - len(todo))
        for res in (agent.run(envs, todo) if todo else []):
            row = {"task_id": res.task.task_id, "task_type": res.task.task_type, "split": res.task.split,
                   "success": res.trajectory.success, "reward": res.trajectory.reward,
                   "trajectory_id": res.trajectory.id, **res.stats}
            append_jsonl(out / "trajectories.jsonl", res.trajectory.to_dict())
            append_jsonl(out / "results.jsonl", row)
            pause_for_test("eval-episode")
            rows.append(row)
            if cfg.write_back and retriever is not None:
                retriever.bank = append_to_bank(retriever.bank, [res.trajectory])
            if on_episode:
                on_episode(row)
            pbar.update(1)
            pbar.set_postfix(success=f"{sum(x['success'] for x in rows)}/{len(rows)}")
        pbar.close()
    finally:
        for e in envs:
            e.close()
        if hosts is not None:
            hosts.close()
    selected = {t.task_id for t in tasks}
    metrics = compute_metrics([x for x in rows if x["task_id"] in selected])
    metrics.update({"env": cfg.env, "split": cfg.split, "task_types": types, "model": cfg.model,
                    "adapter": cfg.adapter, "retrieval": cfg.retrieval.to_file() if cfg.retrieval.bank else None,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(out / "metrics.json", metrics)
    return EvalResult(out, metrics, new_episodes=len(todo), skipped=len(tasks) - len(todo))


def openai_transport(cfg: EvalConfig) -> dict[str, Any]:
    """Client settings of an OpenAI-compatible server (none for the hf backend)."""
    if cfg.backend != "openai":
        return {}
    return {"timeout": cfg.request_timeout, **({"concurrency": cfg.concurrency} if cfg.concurrency else {})}


class LazyModel:
    """Loads the chat model on first use, so that a fully resumed run never loads it."""

    def __init__(self, spec: str, **kwargs: Any):
        adapter = kwargs.get("adapter")
        # The same name the loaded backend reports (trajectories record it as their source).
        self.name = spec if not adapter else f"{spec}+{Path(adapter).name}"
        self._spec = spec
        self._kwargs = kwargs
        self._model = None

    def _get(self):
        if self._model is None:
            from exprag.llm import load_chat_model

            self._model = load_chat_model(self._spec, **self._kwargs)
        return self._model

    def generate(self, *args: Any, **kwargs: Any):
        return self._get().generate(*args, **kwargs)

    def end_session(self, session_id: str) -> None:
        if self._model is not None:
            self._model.end_session(session_id)

    @property
    def tokenizer(self):
        """The backend's tokenizer (HF), None for one without (OpenAI-compatible servers): a token
        budget counts with it. Loads the model, which the first step needs anyway."""
        return getattr(self._get(), "tokenizer", None)
