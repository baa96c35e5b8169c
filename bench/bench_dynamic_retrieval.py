"""Dynamic retrieval on agent episodes: does the history help the query, or drown the task text?

Dynamic retrieval re-queries the bank before every step with the task and the episode so far; the
keys are whole stored trajectories. An expert's history follows the procedure; an agent's wanders
(wrong rooms, "look", invalid actions, objects of no use). This measures, at steps 1, 5, 10 and 20 of
agent episodes, how often the top-1 and all of the top-K retrieved trajectories have the query's task
type, for several ways of building the query and the keys, with the default ``procedure`` scoring
and the paper's plain dense dot product.

Agent episodes: by default a **noisy expert**, played in the real environment: each step the expert's
next action with probability ``--p-expert`` (default 0.5), else a random valid action (ScienceWorld:
never ``focus on``, which ends the episode). Why not the bundled SmolLM2-135M: on 2 CPU cores it costs
tens of seconds per episode, and it rarely follows a procedure at all, which the random half of the
noisy expert reproduces (wandering, opening and examining what the task does not need) while the
expert half keeps the procedure words an agent that half-knows the task would produce. Recorded
episodes of a real agent can be given instead: ``--agent-trajectories runs/X/trajectories.jsonl``
(``exprag eval`` writes them; the bank is then built from that env's expert episodes).

Bank: expert episodes of train tasks; queries: agent episodes of test tasks (never the same game or
variation). Records are cached under ``$EXPRAG_CACHE/dynamic-retrieval/`` (default ``~/.cache/exprag``).

    python bench/bench_dynamic_retrieval.py [--envs alfworld scienceworld twx] [-k 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exprag.bank.encoders import DenseEncoder
from exprag.bank.quality import Rates
from exprag.bank.retriever import query_text
from exprag.bank.scoring import ScoringConfig, build_index
from exprag.bank.store import dynamic_key
from exprag.trajectory import Trajectory, history_text, read_jsonl, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headlines import dynamic_retrieval_headline  # noqa: E402
from runtime import log, offline_one_thread, write_json  # noqa: E402

STEPS = (1, 5, 10, 20)
# (bank train tasks, agent test tasks) per task type
SIZES = {"alfworld": (10, 3), "scienceworld": (3, 1), "twx": (10, 3)}


def _episode(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] != "system"]


# Query constructions: (task, episode messages so far) -> query text. "exprag" is the library's.
QUERIES: dict[str, Callable[[str, list[dict[str, str]]], str]] = {
    "task + whole history (before)": lambda task, msgs: history_text(task, _episode(msgs)),
    "task only": lambda task, msgs: task,
    "task + history, no first observation": lambda task, msgs: history_text(task, _episode(msgs)[1:]),
    "task + last 3 steps, no first observation": lambda task, msgs: history_text(task, _episode(msgs)[1:][-6:]),
    "task + actions so far (no observations)": lambda task, msgs: history_text(
        task, [m for m in _episode(msgs) if m["role"] == "assistant"]),
    "exprag query_text": lambda task, msgs: query_text(task, msgs, "dynamic"),
}
KEYS: dict[str, Callable[[Trajectory], str]] = {
    "whole trajectory (before)": lambda t: history_text(t.task, t.episode_messages()),
    "exprag dynamic_key": dynamic_key,
}


class MemoEncoder(DenseEncoder):
    """MiniLM with each text encoded once per run: the variants below share most query and key texts."""

    def __init__(self) -> None:
        super().__init__("minilm")
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        new = sorted({t for t in texts if t not in self._memo})
        if new:
            self._memo.update(zip(new, super().encode(new, progress)))
        return np.stack([self._memo[t] for t in texts]) if texts else super().encode([])


# ---- data ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("EXPRAG_CACHE") or Path.home() / ".cache" / "exprag") / "dynamic-retrieval"


def _make_env(name: str):
    from exprag.envs import make_env

    return make_env(name)


def _per_type(env, split: str, n: int) -> list:
    return [t for tt in env.task_types() for t in env.tasks(split, [tt])[:n]]


def noisy_expert(env, task, rng: random.Random, p_expert: float, steps: int) -> Trajectory:
    """An agent-like episode: the expert's action with probability ``p_expert``, else a random valid one."""
    from exprag.expert import EpisodeRecorder

    rec = EpisodeRecorder(env, task, env.reset(task), source="noisy-expert")
    while not rec.done and rec.steps < steps:
        action = env.expert_action() if rng.random() < p_expert else None
        if action is None:
            valid = [a for a in env.admissible_actions() if not a.startswith("focus on")]
            if not valid:
                break
            action = rng.choice(sorted(valid))
        rec.record(action, env.step(action))
    return rec.trajectory()


def load_data(name: str, p_expert: float, seed: int, refresh: bool, log: Callable[[str], None]
              ) -> dict[str, list[Trajectory]]:
    from exprag.expert import collect

    n_bank, n_query = SIZES[name]
    paths = {"bank": cache_dir() / f"{name}-expert-{n_bank}.jsonl",
             "agent": cache_dir() / f"{name}-noisy{p_expert}-seed{seed}-{n_query}.jsonl"}
    if not refresh and all(p.exists() for p in paths.values()):
        return {k: read_jsonl(p) for k, p in paths.items()}
    out: dict[str, list[Trajectory]] = {}
    with _make_env(name) as env:
        t0 = time.perf_counter()
        out["bank"] = (read_jsonl(paths["bank"]) if paths["bank"].exists() and not refresh
                       else list(collect(env, _per_type(env, "train", n_bank))))
        log(f"  {name}: {len(out['bank'])} expert episodes ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        rng = random.Random(seed)
        out["agent"] = [noisy_expert(env, t, rng, p_expert, max(STEPS)) for t in _per_type(env, "test", n_query)]
        log(f"  {name}: {len(out['agent'])} agent episodes ({time.perf_counter() - t0:.0f} s)")
    for k, p in paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(p, out[k])
    return out


# ---- measurement -----------------------------------------------------------------------------------------
def prefix(t: Trajectory, step: int) -> list[dict[str, str]] | None:
    """The messages an agent has before its ``step``-th action (None if the episode ended earlier)."""
    msgs = t.episode_messages()
    if t.num_steps < step - 1:
        return None
    return msgs[: 1 + 2 * (step - 1)]


def boilerplate_share(bank: list[Trajectory], agent: list[Trajectory], step: int) -> float:
    """Share of the query's (whole-history) words that are the first observation's: banner, room listing."""
    shares = []
    for t in agent:
        msgs = prefix(t, step)
        if msgs is None:
            continue
        whole = len(history_text(t.task, msgs).split())
        shares.append(len(msgs[0]["content"].split()) / max(whole, 1))
    return round(sum(shares) / len(shares), 3) if shares else 0.0


def measure(data: dict[str, list[Trajectory]], dense: DenseEncoder, k: int, scorings: list[str],
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    bank, agent = data["bank"], data["agent"]
    labels = [t.task_type for t in bank]
    rows = []
    for scoring in scorings:
        for key_name, key in KEYS.items():
            t0 = time.perf_counter()
            index = build_index(ScoringConfig(scoring), dense, [key(t) for t in bank], labels, "dynamic")
            for q_name, make_q in QUERIES.items():
                per_step = {}
                for step in STEPS:
                    live = [(t, m) for t in agent if (m := prefix(t, step)) is not None]
                    if not live:
                        continue
                    _, ids = index.top([make_q(t.task, m) for t, m in live], k)
                    r = Rates()
                    for (t, _), row in zip(live, ids):
                        r.add([bank[int(i)].task_type for i in row if i >= 0], t.task_type)
                    per_step[str(step)] = r.as_dict()
                rows.append({"scoring": scoring, "keys": key_name, "query": q_name, "steps": per_step})
            log(f"    {scoring}, keys {key_name}: {time.perf_counter() - t0:.1f} s")
    return rows


def table(res: dict, k: int) -> str:
    head = " | ".join(f"step {s} top-1 / all@{k}" for s in STEPS)
    lines = [f"| scoring | keys | query | {head} |", "|---|---|---|" + "---|" * len(STEPS)]
    for r in res["rows"]:
        cells = []
        for s in STEPS:
            d = r["steps"].get(str(s))
            cells.append("–" if d is None else f"{d['top1']:.2f} / {d['all_at_k']:.2f} (n={d['n']})")
        lines.append(f"| {r['scoring']} | {r['keys']} | {r['query']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["alfworld", "scienceworld", "twx"], choices=list(SIZES))
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--p-expert", type=float, default=0.5, help="noisy expert: chance of the expert's action")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scorings", nargs="+", default=["procedure", "dense"], choices=["procedure", "dense"])
    ap.add_argument("--agent-trajectories", nargs="+", default=None, metavar="F.jsonl",
                    help="recorded agent episodes (e.g. an `exprag eval` run's trajectories.jsonl) instead of "
                         "the noisy expert; --envs must then name their one env")
    ap.add_argument("--refresh", action="store_true", help="record the episodes again")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    offline_one_thread()

    t0 = time.perf_counter()
    dense = MemoEncoder()
    results = []
    for name in args.envs:
        t1 = time.perf_counter()
        data = load_data(name, args.p_expert, args.seed, args.refresh, log)
        agent_kind = f"noisy expert (p_expert={args.p_expert}, seed {args.seed})"
        if args.agent_trajectories:
            data["agent"] = [t for t in read_jsonl(*args.agent_trajectories) if t.env == name]
            agent_kind = f"recorded: {' '.join(args.agent_trajectories)}"
        res = {"env": name, "bank_size": len(data["bank"]), "queries": len(data["agent"]), "agent": agent_kind,
               "boilerplate_share": {str(s): boilerplate_share(data["bank"], data["agent"], s) for s in STEPS},
               "rows": measure(data, dense, args.k, args.scorings, log)}
        res["seconds"] = round(time.perf_counter() - t1, 1)
        results.append(res)
        print(f"\n{name}: bank {res['bank_size']} expert episodes, {res['queries']} agent episodes ({agent_kind}); "
              f"first observation's share of the whole-history query's words by step: {res['boilerplate_share']}\n")
        print(table(res, args.k))
    out = {"k": args.k, "steps": list(STEPS), "envs": results, "seconds": round(time.perf_counter() - t0, 1)}
    out["headline"] = dynamic_retrieval_headline(out)
    print(f"\ntotal {out['seconds']:.0f} s")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
