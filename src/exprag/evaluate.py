"""Evaluation: run the agent over a split, resumably, and measure success per task type.

A run directory holds::

    config.json          the resolved EvalConfig (a rerun with another config is refused)
    results.jsonl        one line per finished episode, appended (fsync) as episodes finish
    trajectories.jsonl   the episodes as Trajectory records, appended likewise
    metrics.json         success overall and per task type, counts, 95% intervals (atomic)
    write-back.json      with --write-back: the run's tag, which the ids of its bank copies carry

Rerunning the same command skips every episode already in results.jsonl.

With ``--write-back`` each finished episode is appended to the bank as ``<trajectory id>@<run tag>``:
a second run (another ``--out``, or ``--overwrite``) gets another tag, so it can write back into a
bank that holds the first run's episodes. A resume first appends whatever finished episode the bank
lacks (a failed or killed append, or a rebuild of the bank by another process meanwhile), so a
finished run leaves every one of its episodes in the bank exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exprag.config import EvalConfig, changed_fields, to_dict
from exprag.errors import RunConfigError
from exprag.io import (append_jsonl, atomic_write_json, atomic_write_text, check_output_dir, check_writable,
                       iter_json_lines, pause_for_test, read_json_object, run_lock, truncate_torn_tail)
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
        for name in ("results.jsonl", "trajectories.jsonl", "metrics.json", WRITE_BACK_FILE):
            (out / name).unlink(missing_ok=True)
    atomic_write_json(path, want)


WRITE_BACK_FILE = "write-back.json"


def _write_back_tag(out: Path, resumed: bool) -> str | None:
    """The tag of this run's bank copies: read back on a resume, new for a new run (or --overwrite).
    A run begun by an exprag without tags (results, no file) keeps writing plain ids, as it did."""
    path = out / WRITE_BACK_FILE
    if resumed:
        rec = read_json_object(path)
        if rec is not None and (rec.get("run") is None or isinstance(rec.get("run"), str)):
            return rec.get("run")
        if not path.exists() and (out / "results.jsonl").is_file():
            atomic_write_json(path, {"run": None})
            return None
    tag = secrets.token_hex(4)
    atomic_write_json(path, {"run": tag})
    return tag


def bank_copy(t: Any, tag: str | None) -> Any:
    """The trajectory as write-back stores it: its id carries the run's tag."""
    return dataclasses.replace(t, id=f"{t.id}@{tag}") if tag else t


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
        resumed = not overwrite and (Path(cfg.out) / "config.json").is_file()
        try:
            return _evaluate(cfg, model=model, progress=progress, overwrite=overwrite, resumed=resumed,
                             on_episode=on_episode, workers=workers)
        except BaseException:
            if not resumed:
                _forget_failed_start(Path(cfg.out))
            raise


def _forget_failed_start(out: Path) -> None:
    """A new run that failed before its first episode finished (an adapter that does not load, an
    unknown task id, Ctrl-C) leaves nothing: its config.json would refuse the corrected command as a
    change of config."""
    if read_results(out / "results.jsonl"):
        return
    for name in ("config.json", WRITE_BACK_FILE, "results.jsonl", "trajectories.jsonl"):
        (out / name).unlink(missing_ok=True)


def _evaluate(cfg: EvalConfig, *, model, progress: bool, overwrite: bool, resumed: bool,
              on_episode: Callable[[dict[str, Any]], None] | None, workers: WorkerSpec) -> EvalResult:
    from exprag.agent import Agent, AgentConfig
    from exprag.bank import Retriever, append_to_bank
    from exprag.envs import env_spec, make_env
    from exprag.envs.splits import select_tasks
    from exprag.preflight import check_eval_inputs
    from exprag.progress import bar

    # Everything a start can fail on is checked before the run directory exists.
    types, bank = check_eval_inputs(cfg, check_model_spec=model is None)
    if cfg.write_back:  # before the model runs, not at the first append
        if bank is None:
            raise RunConfigError("--write-back needs a bank (--bank) to append the episodes to")
        check_writable(cfg.retrieval.bank, "--write-back bank")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg, overwrite)
    for name in ("results.jsonl", "trajectories.jsonl"):
        truncate_torn_tail(out / name)
    rows = read_results(out / "results.jsonl")
    done = {r["task_id"] for r in rows}
    _drop_orphan_trajectories(out / "trajectories.jsonl", {r["trajectory_id"] for r in rows})

    retriever = Retriever(bank) if bank is not None else None
    written: list[Any] = []  # this run's bank copies, offered again at every append (the bank keeps one each)
    if cfg.write_back:
        from exprag.trajectory import read_jsonl

        tag = _write_back_tag(out, resumed)
        if rows:
            written = [bank_copy(t, tag) for t in read_jsonl(out / "trajectories.jsonl")]
            retriever.bank = append_to_bank(retriever.bank, written, skip_known=True)

    envs = []
    hosts = None  # the worker pool the envs live in, when not in this process
    try:
        env_args = {**env_spec(cfg.env).agent_defaults, **cfg.env_args}  # agent runs need no expert
        first = make_env(cfg.env, **env_args)
        envs.append(first)
        pool = first.tasks(cfg.split, types)
        tasks = _chosen_tasks(cfg, pool, select_tasks)
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
            if cfg.write_back:
                written.append(bank_copy(res.trajectory, tag))
                retriever.bank = append_to_bank(retriever.bank, written, skip_known=True)
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


def _chosen_tasks(cfg: EvalConfig, pool: list[Any], select_tasks: Callable[..., list[Any]]) -> list[Any]:
    """The episodes of the run: the first ``per_type`` tasks of each type, or, when ``task_ids`` names
    them, exactly those (``per_type`` does not cut them; an id that is not a task of this selection is
    an error naming it), then ``limit``."""
    if cfg.task_ids is None:
        return select_tasks(pool, cfg.per_type, cfg.limit)
    known = {t.task_id for t in pool}
    missing = [i for i in cfg.task_ids if i not in known]
    if missing:
        raise RunConfigError(f"eval config: field 'task_ids': {missing[0]!r} is not a {cfg.split} task of "
                             f"the types {', '.join(sorted({t.task_type for t in pool}))} of {cfg.env}"
                             + (f" ({len(missing)} ids are not)" if len(missing) > 1 else ""))
    wanted = set(cfg.task_ids)
    return select_tasks([t for t in pool if t.task_id in wanted], None, cfg.limit)


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
