"""Replaying a finished experiment's cells on a few of its held-out games, beside the result the
experiment measured: the quickstart's agent step, which replays the frozen model, the LoRA adapter and
the ExpRAG-LoRA adapter committed in ``results/replication-cpu``.

Each replayed cell runs with exactly the evaluation its experiment ran (``replay_cell_config``: model,
adapter checkpoint, bank, memory format and budget, step cap, decoding), on the first ``per_type`` games
of each held-out type in generation order, so that a fresh machine generates only a handful of games.
Greedy decoding makes an episode repeatable, so each replayed game also checks the committed outcome.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exprag.errors import DataFormatError, ExpragError, RunConfigError
from exprag.validate import read_json

REPLICATION_DIR = "results/replication-cpu"
# The rows a newcomer compares: what retrieval in training does, on task types no adapter trained on.
ARMS = (("frozen model, no retrieval", "no_retrieval"),
        ("LoRA", "lora"),
        ("ExpRAG-LoRA (matched bank, K=2)", "exprag_lora"))
HELD_OUT_GROUP = "hard"
_TRIAL_INDEX = re.compile(r"_(\d+)$")


class ReplayError(ExpragError):
    """The experiment directory to replay is missing or lacks what a replay needs."""


@dataclass(frozen=True)
class Reference:
    """What the experiment measured for one cell (all its games)."""

    successes: int
    n: int
    ci95: tuple[float, float]
    valid_action_rate: float | None
    outcomes: dict[str, bool]  # task id -> success


@dataclass(frozen=True)
class ReplayRow:
    label: str
    cell_id: str
    adapter: str | None
    successes: int
    n: int
    valid_action_rate: float | None
    mean_steps: float
    same_outcome: int  # replayed games whose success matches the experiment's episode of that game
    episodes: dict[str, tuple[bool, int]]  # task id -> (success, steps) of the replayed episode
    seconds: float
    run_dir: str
    reference: Reference


@dataclass(frozen=True)
class Replay:
    run_dir: Path
    commit: str | None
    command: str | None
    games: list[str]
    task_types: list[str]
    contrast: str | None  # the added game on which the experiment's ExpRAG-LoRA and LoRA differed
    max_steps: int
    rows: list[ReplayRow]
    h1: tuple[int, int, float] | None  # (b, c, exact McNemar p) of ExpRAG-LoRA vs LoRA on all the games


def find_run_dir(path: str | Path | None = None) -> Path:
    """``path``, else the replication in the working directory, else the one in this source checkout."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [Path(REPLICATION_DIR), Path(__file__).resolve().parents[2] / REPLICATION_DIR]
    for c in candidates:
        if (c / "experiment.json").is_file():
            return c
    raise ReplayError(f"no experiment directory at {' or '.join(str(c) for c in candidates)} (it needs its "
                      "experiment.json); run from the repository root or pass --replication DIR")


def _trial_index(task_id: str) -> int:
    m = _TRIAL_INDEX.search(task_id)
    return int(m.group(1)) if m else 1 << 30


def held_out_games(run_dir: Path, per_type: int) -> tuple[list[str], list[str]]:
    """The first ``per_type`` games of each held-out type that passed the experiment's expert ceiling,
    in generation order (the trial index), and the types in the experiment's order."""
    path = run_dir / "data" / "ceiling.json"
    if not path.is_file():
        raise ReplayError(f"{path}: missing (the experiment's held-out games)")
    try:
        group = read_json(path)["groups"][f"test-{HELD_OUT_GROUP}"]
        kept, games = list(group["kept"]), {g["task_id"]: g["task_type"] for g in group["games"]}
    except (KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: unreadable held-out game list ({type(e).__name__}: {e})") from e
    types = list(dict.fromkeys(games[t] for t in kept if t in games))
    chosen = [t for tt in types for t in sorted((t for t in kept if games.get(t) == tt), key=_trial_index)[:per_type]]
    return chosen, types


def _outcomes(results: Path) -> dict[str, tuple[bool, int]]:
    """task id -> (success, steps) of the episodes in a run's results.jsonl."""
    from exprag.evaluate import read_results

    return {r["task_id"]: (bool(r["success"]), int(r["steps"])) for r in read_results(results)}


def _reference(run_dir: Path, cell_id: str) -> Reference:
    cell = run_dir / "cells" / cell_id
    m = read_json(cell / "metrics.json")
    try:
        return Reference(int(m["successes"]), int(m["n"]), tuple(m["ci95"]), m.get("valid_action_rate"),
                         {t: ok for t, (ok, _) in _outcomes(cell / "results.jsonl").items()})
    except (KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{cell}: unreadable cell record ({type(e).__name__}: {e})") from e


def _main_cells(run_dir: Path, meta: dict[str, Any]) -> dict[str, str]:
    """method -> id of its main-table cell on the held-out group (matched bank or none, main K, static)."""
    from exprag.experiment import experiment_config_from_dict, expand

    cfg = experiment_config_from_dict(meta.get("config") or {}, str(run_dir / "experiment.json"))
    found: dict[str, str] = {}
    for c in expand(cfg):
        if (c.group == HELD_OUT_GROUP and c.source in ("matched", "none") and c.k in (None, cfg.main_k)
                and c.mode in (None, "static")):
            found.setdefault(c.method, c.id)
    missing = [m for _, m in ARMS if m not in found]
    if missing:
        raise ReplayError(f"{run_dir / 'experiment.json'}: the grid has no {HELD_OUT_GROUP}-group cell for "
                          f"{', '.join(missing)}")
    return found


def contrast_game(ours: dict[str, bool], baseline: dict[str, bool], games: list[str]) -> str | None:
    """The first game (generation order) on which the experiment's ExpRAG-LoRA (``ours``) and LoRA
    (``baseline``) episodes differed, when none of ``games`` is one: replayed so that a newcomer sees a
    difference happen, and said so."""
    differ = sorted((t for t in ours if t in baseline and ours[t] != baseline[t]), key=_trial_index)
    if not differ or any(t in differ for t in games):
        return None
    return differ[0]


def _gen_args(env_args: dict[str, Any], split: str, games: list[str]) -> dict[str, Any]:
    """Generated ALFWorld games are a prefix by index: generating index+1 per type covers the chosen ones."""
    if "gen_per_type" not in env_args:
        return env_args
    need = max(_trial_index(t) for t in games) + 1
    gpt = env_args["gen_per_type"]
    have = gpt.get(split, need) if isinstance(gpt, dict) else gpt
    if not isinstance(have, int):
        return env_args
    return {**env_args, "gen_per_type": {split: min(have, need)}}


def replay(run_dir: str | Path, out: str | Path, *, per_type: int = 3, with_contrast: bool = True,
           max_steps: int | None = None, progress: bool = True) -> Replay:
    """Replay the three ARMS of ``run_dir`` on its first ``per_type`` held-out games per type, plus (with
    ``with_contrast``) the first game on which its ExpRAG-LoRA and LoRA differed, into ``out``.
    ``max_steps`` below the experiment's cap is for quick checks only (outcomes then differ)."""
    from exprag.evaluate import evaluate
    from exprag.experiment import read_json_record, replay_cell_config
    from exprag.report import mcnemar_p

    run_dir = Path(run_dir)
    games, types = held_out_games(run_dir, per_type)
    if not games:
        raise ReplayError(f"{run_dir / 'data' / 'ceiling.json'}: no held-out games to replay")
    meta = read_json_record(run_dir / "experiment.json")
    cells = _main_cells(run_dir, meta)
    refs = {method: _reference(run_dir, cells[method]) for _, method in ARMS}
    ours, baseline = refs["exprag_lora"].outcomes, refs["lora"].outcomes
    contrast = contrast_game(ours, baseline, games) if with_contrast else None
    games = games + ([contrast] if contrast else [])
    rows, cap = [], None
    for label, method in ARMS:
        cell_id, ref = cells[method], refs[method]
        ecfg = replay_cell_config(run_dir, cell_id, games, Path(out) / cell_id.replace("/", "-"))
        ecfg = replace(ecfg, env_args=_gen_args(ecfg.env_args, ecfg.split, games),
                       batch_size=min(ecfg.batch_size, len(games)),
                       **({"max_steps": max_steps} if max_steps is not None else {}))
        cap = ecfg.max_steps
        t0 = time.perf_counter()
        try:
            res = evaluate(ecfg, progress=progress)
        except RunConfigError:  # a replay left by other settings: a demo run is redone, not refused
            res = evaluate(ecfg, progress=progress, overwrite=True)
        seconds = time.perf_counter() - t0
        got = _outcomes(res.out / "results.jsonl")
        m = res.metrics
        rows.append(ReplayRow(label, cell_id, ecfg.adapter, m["successes"], m["n"], m.get("valid_action_rate"),
                              m["mean_steps"], sum(ok == ref.outcomes.get(t) for t, (ok, _) in got.items()),
                              got, seconds, str(ecfg.out), ref))
    pairs = [t for t in ours if t in baseline]
    h1 = None
    if pairs:
        bb, cc = sum(ours[t] and not baseline[t] for t in pairs), sum(baseline[t] and not ours[t] for t in pairs)
        h1 = (bb, cc, mcnemar_p(bb, cc))
    return Replay(run_dir, meta.get("commit"), meta.get("command"), games, types, contrast, cap or 0, rows, h1)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def format_replay(rep: Replay) -> str:
    """The comparison table and its provenance, for the terminal."""
    n_ref = rep.rows[0].reference.n if rep.rows else 0
    lines = [
        "| model | success here | valid actions | mean steps | same outcome as the experiment | "
        f"experiment, {n_ref} games: success [95% CI] | valid actions | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        ref = r.reference
        lines.append(
            f"| {r.label} | {r.successes}/{r.n} | {_pct(r.valid_action_rate)} | {r.mean_steps:.1f} | "
            f"{r.same_outcome}/{r.n} | {ref.successes}/{ref.n} ({100 * ref.successes / max(ref.n, 1):.0f}%) "
            f"[{100 * ref.ci95[0]:.1f}, {100 * ref.ci95[1]:.1f}] | {_pct(ref.valid_action_rate)} | {r.seconds:.0f} s |")
    if rep.contrast:
        outcome = ", ".join(f"{r.label}: {'success' if r.episodes[rep.contrast][0] else 'failed'} in "
                            f"{r.episodes[rep.contrast][1]} steps" for r in rep.rows if rep.contrast in r.episodes)
        lines.append(f"The game {rep.contrast} was added because the experiment's ExpRAG-LoRA and LoRA "
                     f"differed on it (the first such game in generation order), so the success counts here "
                     f"are a demonstration, not estimates; the experiment's columns are. Here: {outcome}. "
                     "Each run directory's trajectories.jsonl holds the episodes.")
    if rep.h1 is not None:
        b, c, p = rep.h1
        lines.append(f"On all {n_ref} games the experiment pairs ExpRAG-LoRA with LoRA game by game: ExpRAG-LoRA "
                     f"alone succeeded on {b}, LoRA alone on {c} (exact McNemar p = {p:.4f}); its pre-registered "
                     f"tests and conclusion: {rep.run_dir / 'report.md'}")
    adapters = [r for r in rep.rows if r.adapter]
    lines.append("adapters: " + "; ".join(f"{r.label}: {r.adapter}" for r in adapters)
                 + f" (trained by `{rep.command}` at commit {rep.commit})")
    lines.append("runs: " + "; ".join(r.run_dir for r in rep.rows))
    return "\n".join(lines)
