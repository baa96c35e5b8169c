"""Retrieval quality before / after: does static retrieval hand the agent the query's task type?

For each environment a bank is built from train tasks and queried with held-out test tasks, without
any task-type filter; we report top-1 / all-of-K / any-of-K same-task-type rates (overall and on the
queries with no exact-text twin in the bank) and the copy rate (two of the K slots with the same task
text), for the paper's plain dense dot product ("before"), plain BM25, and the alternatives weighed
against each other, down to exprag's default ("after": procedure-weighted keys + dense + diversity).

Sizes (the issue's): TWX 10 train / 5 test tasks per game (8 games); ScienceWorld the full official
split, every train variation (3592) -> every test variation (1819); ALFWorld the generated set,
50 train games per type (300) -> 22 test games per type (132), judged on the queries with no twin.

Records: static retrieval reads only task descriptions, so every bank and query here is a
**reset-only record** (the task and the first observation, no expert actions): a reset per task
instead of an expert episode. They are cached under ``$EXPRAG_CACHE/retrieval-quality/`` (default
``~/.cache/exprag``); the first run pays the resets (ScienceWorld: ~5400 resets at ~0.06-0.15 s each,
5-14 min on a shared 2-core machine; ALFWorld: the generated games, ~1 s each, built once by the env
itself and shared with every ALFWorld run). ``--refresh`` recollects. Nothing else is cached: every
index is built and every query retrieved in this run (MiniLM on CPU, 1 thread).

``--dynamic`` adds ALFWorld with expert episodes (the same 300 / 132 games; ~1 s per episode the first
time, cached): dense / BM25 / procedure banks built with ``build_bank``, static and dynamic retrieval
(the dynamic query is the task and the episode's first two steps, as ``evaluate_retrieval`` does).

``--paraphrases`` adds the paraphrase benchmark (ALFWorld, ScienceWorld): banks of templated task texts
queried with the templated test tasks and with the hand-written paraphrases shipped in
``exprag/data/paraphrases/`` (``dev``: the set the defaults were tuned on; ``test``: held out), for
dense, BM25, the procedure scoring as it was before word expansion, and the default; with the latency
per query (1 thread). ALFWorld's bank here is the templated task text of each generated game (the
generator's own sampling, no game is built: seconds); ScienceWorld's the reset-only records above.
``--no-templated`` skips the main table.

``--encoder PATH`` runs every configuration with another sentence encoder (a local
sentence-transformers directory) instead of the bundled MiniLM: your own model on the same sets.

``--small-banks`` adds ALFWorld banks of 30, 60, 120 and 300 random reset-only records of the 432
generated games (the rest, less exact-text twins, as queries; 20 random splits each): the default with
and without the template term (minutes: every split builds and queries its own index).

    python bench/bench_retrieval_quality.py [--envs twx scienceworld alfworld] [-k 2] [--dynamic]
                                            [--paraphrases [--no-templated]] [--small-banks] [--encoder PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from exprag.bank.encoders import BM25Encoder, DenseEncoder, Index
from exprag.bank.topk import top_from_scores
from exprag.bank.procedure import ProcedureIndex, text_key
from exprag.bank.quality import evaluate_retrieval
from exprag.bank.scoring import ScoringConfig, build_index
from exprag.bank.store import Bank, build_bank
from exprag.trajectory import Trajectory, read_jsonl, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headlines import (PARAPHRASE_BEFORE, PARAPHRASE_LEXICON, PARAPHRASE_OURS, PARAPHRASE_WORD_SPACE,  # noqa: E402
                       retrieval_quality_headline)
from runtime import log, offline_one_thread, write_json  # noqa: E402

TARGET_TOP1, TARGET_ALL = 0.95, 0.90
TWX_PER_GAME = {"train": 10, "test": 5}


# ---- data: reset-only records, cached ----------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("EXPRAG_CACHE") or Path.home() / ".cache" / "exprag") / "retrieval-quality"


def reset_record(env: Any, task: Any) -> Trajectory:
    r = env.reset(task)
    return Trajectory(
        id=f"{env.name}:{task.split}:{task.task_type}:{task.task_id}:reset", env=env.name, env_version=env.version,
        split=task.split, task_type=task.task_type, task_id=task.task_id, task=r.task,
        messages=[{"role": "user", "content": r.observation}], success=True, reward=0.0, num_steps=0,
        source="reset-only", meta={"reset_only": True},
    )


def cached_records(name: str, make_env: Callable[[], Any], select: Callable[[Any, str], list],
                   refresh: bool, log: Callable[[str], None]) -> dict[str, list[Trajectory]]:
    """{"train": bank records, "test": query records}; resumable (a killed run keeps its records)."""
    path = cache_dir() / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(path):  # two recorders appending at once wrote every record twice
        return _cached_records(path, make_env, select, refresh, log)


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_records(path: Path, make_env: Callable[[], Any], select: Callable[[Any, str], list],
                    refresh: bool, log: Callable[[str], None]) -> dict[str, list[Trajectory]]:
    name = path.stem
    if refresh and path.exists():
        path.unlink()
    have: dict[str, Trajectory] = {t.id: t for t in read_jsonl(path)} if path.exists() else {}
    out: dict[str, list[Trajectory]] = {"train": [], "test": []}
    t0, n_new = time.perf_counter(), 0
    with make_env() as env:
        for split in ("train", "test"):
            tasks = select(env, split)
            missing = [t for t in tasks if f"{env.name}:{t.split}:{t.task_type}:{t.task_id}:reset" not in have]
            if missing:
                log(f"  {name}: {len(missing)} {split} resets to record (cached in {path})")
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                for i, task in enumerate(missing, 1):
                    rec = reset_record(env, task)
                    have[rec.id] = rec
                    f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
                    f.flush()
                    n_new += 1
                    if i % 500 == 0:
                        log(f"    {i}/{len(missing)} ({time.perf_counter() - t0:.0f} s)")
            out[split] = [have[f"{env.name}:{t.split}:{t.task_type}:{t.task_id}:reset"] for t in tasks]
    if n_new:
        log(f"  {name}: recorded {n_new} resets in {time.perf_counter() - t0:.0f} s "
            f"({(time.perf_counter() - t0) / n_new:.3f} s each)")
    return out


def load_env_data(env_name: str, refresh: bool, log: Callable[[str], None]) -> dict[str, list[Trajectory]]:
    from exprag.envs import make_env

    if env_name == "twx":
        return cached_records("twx", lambda: make_env("twx"), lambda env, split: [
            t for g in env.task_types() for t in env.tasks(split, [g])[: TWX_PER_GAME[split]]], refresh, log)
    if env_name == "scienceworld":
        # gold=False: a reset without the gold path (the task description does not depend on it)
        return cached_records("scienceworld", lambda: make_env("scienceworld", gold=False),
                              lambda env, split: env.tasks(split, env.task_types()), refresh, log)
    if env_name == "alfworld":
        # the env's default generated set: 50 train / 22 test games per type (built on first use)
        return cached_records("alfworld", lambda: make_env("alfworld", expert=None),
                              lambda env, split: env.tasks(split, list(env.task_types())), refresh, log)
    raise SystemExit(f"unknown env {env_name!r}")


def alfworld_episodes(refresh: bool, log: Callable[[str], None]) -> dict[str, list[Trajectory]]:
    """Expert episodes of the default generated ALFWorld set, cached like the reset records."""
    from exprag.envs import make_env
    from exprag.expert import collect

    out: dict[str, list[Trajectory]] = {}
    with make_env("alfworld") as env:
        for split in ("train", "test"):
            path = cache_dir() / f"alfworld-expert-{split}.jsonl"
            if path.exists() and not refresh:
                out[split] = read_jsonl(path)
                continue
            t0 = time.perf_counter()
            tasks = env.tasks(split, list(env.task_types()))
            log(f"  alfworld: running the expert on {len(tasks)} {split} games (cached in {path})")
            out[split] = list(collect(env, tasks))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, out[split])
            log(f"  alfworld: {len(tasks)} episodes in {time.perf_counter() - t0:.0f} s")
    return out


def bench_dynamic(k: int, dense: DenseEncoder, refresh: bool, log: Callable[[str], None]) -> dict:
    import tempfile

    data = alfworld_episodes(refresh, log)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in ("dense", "bm25", "procedure"):
            t0 = time.perf_counter()
            bank = build_bank(data["train"], Path(tmp) / scoring, dense, retrieval=scoring)
            for mode in ("static", "dynamic"):
                rep = evaluate_retrieval(bank, data["test"], k=k, mode=mode).as_dict()
                rows.append({"config": f"{scoring} ({mode})", "overall": rep["overall"], "no_twin": rep["no_twin"],
                             "copy_rate": rep["copy_rate"], "confusion": rep["confusion"]})
            log(f"  alfworld episodes, {scoring}: {time.perf_counter() - t0:.1f} s")
    return {"env": "alfworld", "bank_size": len(data["train"]), "queries": len(data["test"]),
            "judged_on": "no_twin", "records": "expert episodes", "rows": rows}


# ---- the alternatives weighed (indexes built from library pieces) ------------------------------------
@dataclass
class FusionIndex:
    """Hybrid without learned weights: BM25 scaled to [0, 1] per query (by its max) + dense dot product."""

    bm25: Index
    dense: Index
    dense_weight: float = 1.0

    @property
    def size(self) -> int:
        return self.bm25.size

    def scores(self, queries: list[str]) -> np.ndarray:
        b = self.bm25.scores(queries)
        b = b / np.maximum(b.max(1, keepdims=True), 1e-9)
        return b + self.dense_weight * self.dense.scores(queries)

    def top(self, queries: list[str], k: int):
        return top_from_scores(self.scores(queries), k)

    def save(self, path: Path) -> None:  # pragma: no cover - in-memory only
        raise NotImplementedError


@dataclass
class MaskedDenseIndex:
    """Hard entity masking: words the bank's term weights call entities (below half the top weight)
    become "something", in keys and queries alike, before the dense encoder sees them."""

    proc: ProcedureIndex
    encoder: DenseEncoder

    def __post_init__(self) -> None:
        self.emb = self.encoder.encode([self.proc.weights.mask(t) for t in self.proc.texts])

    @property
    def size(self) -> int:
        return self.proc.size

    def scores(self, queries: list[str]) -> np.ndarray:
        return self.encoder.encode([self.proc.weights.mask(q) for q in queries]) @ self.emb.T

    def top(self, queries: list[str], k: int):
        return top_from_scores(self.scores(queries), k)

    def save(self, path: Path) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class RerankIndex:
    """A reranker: the first stage's top ``n`` reordered by the second stage's score."""

    first: Index
    second: Index
    n: int = 32

    @property
    def size(self) -> int:
        return self.first.size

    def scores(self, queries: list[str]) -> np.ndarray:
        _, ids = self.first.top(queries, self.n)
        s2 = self.second.scores(queries)
        out = np.full_like(s2, -1e9)
        rows = np.arange(len(queries))[:, None]
        out[rows, ids] = s2[rows, ids] + 10.0  # the reranked candidates stay above everything else
        return out

    def top(self, queries: list[str], k: int):
        return top_from_scores(self.scores(queries), k)

    def save(self, path: Path) -> None:  # pragma: no cover
        raise NotImplementedError


def configs(bank_trajs: list[Trajectory], dense: DenseEncoder, log: Callable[[str], None]
            ) -> list[tuple[str, str, Index]]:
    """(name, what it is, static index) for each alternative, best known last."""
    texts = [t.task for t in bank_trajs]
    labels = [t.task_type for t in bank_trajs]
    t0 = time.perf_counter()
    default = build_index(ScoringConfig(), dense, texts, labels, "static")  # exprag's default
    log(f"  built the default index ({len(texts)} keys, dense encoding included) in {time.perf_counter() - t0:.1f} s")
    plain_dense = build_index(ScoringConfig("dense"), dense, texts, labels, "static")
    bm25 = build_index(ScoringConfig("bm25"), BM25Encoder(), texts, labels, "static")
    lexical = replace(default, dense=None, diversity=False)
    no_div = replace(default, diversity=False, template_weight=0.0, _template_emb={})
    return [
        ("dense (paper)", "MiniLM dot product on raw task texts", plain_dense),
        ("bm25", "plain BM25", bm25),
        ("hybrid bm25+dense", "BM25 (max-scaled) + MiniLM, no learned weights", FusionIndex(bm25, plain_dense)),
        ("masked dense", "MiniLM on keys and queries with entity-like words masked", MaskedDenseIndex(default, dense)),
        ("rerank dense→procedure", "MiniLM top-32 reranked by procedure-weighted lexical", RerankIndex(plain_dense, lexical)),
        ("procedure lexical", "learned term weights, cosine; no dense, no diversity", lexical),
        ("procedure + dense", "+ 0.5 x MiniLM dot product, word expansion; no template term, no diversity", no_div),
        ("procedure + dense + diversity", "exprag default (--scoring procedure): + template term, diversity", default),
    ]


# ---- paraphrases ------------------------------------------------------------------------------------------
def text_record(i: int, env: str, split: str, task_type: str, text: str) -> Trajectory:
    return Trajectory(id=f"{env}:{split}:{i}:text", env=env, env_version="templated", split=split,
                      task_type=task_type, task_id=f"{split}/{i}", task=text, messages=[], success=True,
                      reward=0.0, num_steps=0, source="templated-text", meta={})


def alfworld_templated(split: str, per_type: int) -> list[Trajectory]:
    """The templated task text of the first ``per_type`` candidate games per type, as the generator
    samples them (same seeds as ``alfworld_gen.generate``; nothing is built)."""
    import random

    from exprag.envs import alfworld_gen as gen

    out = []
    for tt in gen.TASK_TYPES:
        for i in range(per_type):
            spec = gen.sample_game(tt, split, random.Random(f"{gen.GENERATOR}:{gen.GENERATOR_VERSION}:0:{split}:{tt}:{i}"))
            if spec is not None:
                out.append(text_record(len(out), "alfworld", split, tt, spec.task_desc))
    return out


def paraphrase_configs(bank: list[Trajectory], dense: DenseEncoder) -> list[tuple[str, Index]]:
    texts, labels = [t.task for t in bank], [t.task_type for t in bank]
    default = build_index(ScoringConfig(), dense, texts, labels, "static")
    return [("dense (paper)", build_index(ScoringConfig("dense"), dense, texts, labels, "static")),
            ("bm25", build_index(ScoringConfig("bm25"), BM25Encoder(), texts, labels, "static")),
            (PARAPHRASE_BEFORE, replace(default, dense_weight=0.05, expand=False, template_weight=0.0,
                                        _templates=None, _word_emb={}, _template_emb={})),
            (PARAPHRASE_WORD_SPACE, replace(default, lexicon=None, template_weight=0.0, _templates=None, _word_emb={},
                                            _template_emb={})),
            (PARAPHRASE_LEXICON, replace(default, template_weight=0.0, _templates=None, _word_emb={},
                                         _template_emb={})),
            (PARAPHRASE_OURS, default)]


def bench_paraphrases(env_name: str, k: int, dense: DenseEncoder, refresh: bool, log: Callable[[str], None]) -> dict:
    from exprag.bank.quality import evaluate_text_queries, paraphrase_file, read_text_queries

    if env_name == "alfworld":
        train, test = alfworld_templated("train", 50), alfworld_templated("test", 22)
    else:
        data = load_env_data(env_name, refresh, log)
        train, test = data["train"], data["test"]
    sets = {"templated": test, "dev": read_text_queries(paraphrase_file(env_name, "dev")),
            "test": read_text_queries(paraphrase_file(env_name, "test"))}
    rows = []
    for name, index in paraphrase_configs(train, dense):
        bank = Bank(Path("."), {"encoder": dense.identity, "retrieval": {"scoring": "procedure"}}, train, dense,
                    {"static": index})
        row: dict[str, Any] = {"config": name}
        for set_name, queries in sets.items():
            t0 = time.perf_counter()
            rep = (evaluate_retrieval(bank, queries, k=k) if set_name == "templated"
                   else evaluate_text_queries(bank, queries, k=k)).as_dict()
            row[set_name] = {**rep["overall"], "ms_per_query": round(1000 * (time.perf_counter() - t0) / len(queries), 2),
                             "confusion": rep["confusion"]}
        rows.append(row)
        log(f"  {env_name} paraphrases, {name}: " + ", ".join(
            f"{s} {row[s]['top1']}/{row[s]['all_at_k']}" for s in sets))
    return {"env": env_name, "bank_size": len(train), "sizes": {s: len(q) for s, q in sets.items()}, "rows": rows}


def paraphrase_table(results: list[dict], k: int) -> str:
    lines = [f"| env (bank) | configuration | templated top-1 / all@{k} | dev paraphrases top-1 / all@{k} | "
             f"test paraphrases top-1 / all@{k} | ms / query (test) |", "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            cells = [f"{fmt(r[s]['top1'])} / {fmt(r[s]['all_at_k'])}" for s in ("templated", "dev", "test")]
            lines.append(f"| {res['env']} ({res['bank_size']}) | {r['config']} | " + " | ".join(cells)
                         + f" | {r['test']['ms_per_query']} |")
    return "\n".join(lines)


# ---- run ------------------------------------------------------------------------------------------------
def bench_env(env_name: str, k: int, dense: DenseEncoder, refresh: bool, log: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    data = load_env_data(env_name, refresh, log)
    train, test = data["train"], data["test"]
    log(f"{env_name}: bank {len(train)} reset-only records, {len(test)} queries "
        f"(data ready in {time.perf_counter() - t0:.0f} s)")
    rows = []
    for name, what, index in configs(train, dense, log):
        t1 = time.perf_counter()
        bank = Bank(Path("."), {"encoder": dense.identity, "retrieval": {"scoring": "procedure"}}, train, dense,
                    {"static": index})
        rep = evaluate_retrieval(bank, test, k=k, mode="static").as_dict()
        rows.append({"config": name, "what": what, "overall": rep["overall"], "no_twin": rep["no_twin"],
                     "exact_duplicate_rate": rep["exact_duplicate_rate"], "copy_rate": rep["copy_rate"],
                     "confusion": rep["confusion"], "seconds": round(time.perf_counter() - t1, 2)})
        log(f"  {name}: top-1 {rep['overall']['top1']}, all@{k} {rep['overall']['all_at_k']} "
            f"({time.perf_counter() - t1:.1f} s)")
    # ALFWorld is judged on queries without a twin (its bank repeats many task texts); the others on all
    judged = "no_twin" if env_name == "alfworld" else "overall"
    return {"env": env_name, "bank_size": len(train), "queries": len(test), "judged_on": judged,
            "records": "reset-only (task + first observation, no expert actions)", "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def table(results: list[dict], k: int) -> str:
    lines = [f"| env (bank → queries) | configuration | top-1 | all@{k} | any@{k} | no-twin n | no-twin top-1 | "
             f"no-twin all@{k} | copies@{k} | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            j = r[res["judged_on"]]
            ok = (j["top1"] or 0) >= TARGET_TOP1 and (j["all_at_k"] or 0) >= TARGET_ALL
            o, nt = r["overall"], r["no_twin"]
            lines.append(
                f"| {res['env']} ({res['bank_size']} → {res['queries']}) | {r['config']} | {fmt(o['top1'])} | "
                f"{fmt(o['all_at_k'])} | {fmt(o['any_at_k'])} | {nt['n']} | {fmt(nt['top1'])} | "
                f"{fmt(nt['all_at_k'])} | {fmt(r['copy_rate'])} | {'✓' if ok else '✗'} |")
    return "\n".join(lines)


# ---- small banks ----------------------------------------------------------------------------------------
SMALL_SIZES = (30, 60, 120, 300)


def bench_small_banks(k: int, dense: DenseEncoder, refresh: bool, log: Callable[[str], None],
                      sizes: tuple[int, ...] = SMALL_SIZES, splits: int = 20) -> dict:
    """The default with and without the template term on random small ALFWorld banks: mean and worst
    same-type top-1 / all@k over ``splits`` random banks of each size."""
    import random

    data = load_env_data("alfworld", refresh, log)
    recs = data["train"] + data["test"]
    configs = {"default": ScoringConfig(), "no template term": ScoringConfig(template_weight=0.0)}
    rows = []
    for n in sizes:
        got: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
        for split in range(splits):
            chosen = set(random.Random(split).sample(range(len(recs)), n))
            bank = [recs[i] for i in sorted(chosen)]
            keys = {text_key(t.task) for t in bank}
            queries = [t for i, t in enumerate(recs) if i not in chosen and text_key(t.task) not in keys]
            want = np.asarray([t.task_type for t in queries])
            for name, cfg in configs.items():
                index = build_index(cfg, dense, [t.task for t in bank], [t.task_type for t in bank], "static")
                _, ids = index.top([t.task for t in queries], k)
                types = np.asarray([t.task_type for t in bank])[ids]
                got[name].append((float(np.mean(types[:, 0] == want)), float(np.mean((types == want[:, None]).all(1)))))
        for name, vals in got.items():
            a = np.asarray(vals)
            rows.append({"size": n, "config": name, "top1": round(float(a[:, 0].mean()), 3),
                         "top1_worst": round(float(a[:, 0].min()), 3), "all_at_k": round(float(a[:, 1].mean()), 3),
                         "all_at_k_worst": round(float(a[:, 1].min()), 3)})
            log(f"  small banks n={n}, {name}: top-1 {rows[-1]['top1']} (worst {rows[-1]['top1_worst']}), "
                f"all@{k} {rows[-1]['all_at_k']} (worst {rows[-1]['all_at_k_worst']})")
    return {"records": len(recs), "splits": splits, "rows": rows}


def small_banks_table(res: dict, k: int) -> str:
    lines = [f"| bank size n | configuration | top-1 (worst split) | all@{k} (worst split) |", "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['size']} | {r['config']} | {r['top1']:.3f} ({r['top1_worst']:.2f}) | "
                     f"{r['all_at_k']:.3f} ({r['all_at_k_worst']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["twx", "scienceworld", "alfworld"],
                    choices=["twx", "scienceworld", "alfworld"])
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--refresh", action="store_true", help="record the reset-only records (and episodes) again")
    ap.add_argument("--dynamic", action="store_true",
                    help="also ALFWorld expert episodes: static and dynamic retrieval, dense / bm25 / procedure")
    ap.add_argument("--paraphrases", action="store_true",
                    help="also the paraphrase benchmark (alfworld, scienceworld among --envs)")
    ap.add_argument("--no-templated", action="store_true", help="skip the templated before/after table")
    ap.add_argument("--small-banks", action="store_true",
                    help="also random small ALFWorld banks (30-300 keys, 20 splits): the template term's effect")
    ap.add_argument("--encoder", default="minilm", metavar="NAME_OR_PATH",
                    help="the sentence encoder of every configuration (default: the bundled all-MiniLM-L6-v2); "
                         "a local sentence-transformers directory measures your own model on the same sets")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    offline_one_thread()

    t0 = time.perf_counter()
    dense = DenseEncoder(args.encoder)
    results = [] if args.no_templated else [bench_env(e, args.k, dense, args.refresh, log) for e in args.envs]
    out: dict[str, Any] = {"k": args.k, "encoder": args.encoder, "targets": {"top1": TARGET_TOP1, f"all_at_{args.k}": TARGET_ALL},
                           "envs": results}
    if args.paraphrases:
        para = [bench_paraphrases(e, args.k, dense, args.refresh, log) for e in args.envs if e != "twx"]
        print(f"Paraphrases: banks of templated task texts, static retrieval, k={args.k}, no type filter; "
              f"targets top-1 ≥ 0.90 and all@{args.k} ≥ 0.85 on the test paraphrases:\n")
        print(paraphrase_table(para, args.k) + "\n")
        out["paraphrases"] = para
    if args.small_banks:
        small = bench_small_banks(args.k, dense, args.refresh, log)
        print(f"Small ALFWorld banks ({small['splits']} random splits of {small['records']} reset-only records; "
              f"queries: the rest without an exact-text twin), static, k={args.k}:\n")
        print(small_banks_table(small, args.k) + "\n")
        out["small_banks"] = small
    if not results:
        return _finish(out, args, t0)
    print(f"Static retrieval, same task type, k={args.k}, no type filter; banks and queries are reset-only "
          f"records (task description + first observation). Target: top-1 ≥ {TARGET_TOP1} and all@{args.k} ≥ "
          f"{TARGET_ALL} on all queries (TWX, ScienceWorld) / on no-twin queries (ALFWorld).\n")
    print(table(results, args.k))
    if args.dynamic:
        dyn = bench_dynamic(args.k, dense, args.refresh, log)
        print(f"\nALFWorld, expert episodes ({dyn['bank_size']} → {dyn['queries']}), banks from build_bank; "
              f"dynamic queries = task + first two steps:\n")
        print(table([dyn], args.k))
        out["alfworld_episodes"] = dyn
    return _finish(out, args, t0)


def _finish(out: dict, args: argparse.Namespace, t0: float) -> dict:
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["headline"] = retrieval_quality_headline(out)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
