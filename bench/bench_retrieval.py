"""Retrieval latency on banks of 1k / 10k / 100k synthetic trajectories: exact vs FAISS, and BM25.

Prints p50 / p95 query latency (ms) through ``Retriever.retrieve`` (query encoding included), and
the ratio exact / FAISS measured in the same run. Then the ScienceWorld fast-stepping ratio from
``bench_env_step`` (skipped with --no-env).

    python bench/bench_retrieval.py [--sizes 1000 10000 100000] [--queries 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exprag.bank import encoders as enc_mod  # noqa: E402
from exprag.bank.encoders import BM25Encoder, DenseEncoder  # noqa: E402
from exprag.bank.retriever import Filters, Retriever  # noqa: E402
from exprag.bank.store import Bank  # noqa: E402
from exprag.trajectory import Trajectory  # noqa: E402
from headlines import retrieval_headline  # noqa: E402
from runtime import write_json  # noqa: E402

VERBS = ["heat", "cool", "clean", "put", "examine", "find", "take", "boil", "melt", "sort"]
OBJS = ["egg", "apple", "mug", "knife", "potato", "book", "lamp", "coin", "bowl", "plate", "tomato", "key"]
PLACES = ["fridge", "countertop", "sink", "desk", "shelf", "cabinet", "drawer", "table", "box", "garbagecan"]


def synthetic(n: int, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v, o, p = rng.choice(VERBS), rng.choice(OBJS), rng.choice(PLACES)
        task = f"{v} some {o} and put it in {p} {i % 97}"
        msgs = [{"role": "user", "content": f"You are in a room. Your task is to: {task}."},
                {"role": "assistant", "content": f"go to {p} 1"}]
        out.append(Trajectory(f"s{i}", "synthetic", "0", "train", v, f"g{i}", task, msgs, True, 1.0, 1,
                              "synthetic", {}))
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def time_queries(retriever: Retriever, queries: list[str], filters: Filters | None) -> list[float]:
    retriever.retrieve(queries[0], k=2, filters=filters)  # warm-up (model load, FAISS build)
    lat = []
    for q in queries:
        t = time.perf_counter()
        retriever.retrieve(q, k=2, filters=filters)
        lat.append(time.perf_counter() - t)
    return lat


def bench_size(n: int, n_queries: int, dense: DenseEncoder) -> dict:
    trajs = synthetic(n)
    queries = [t.task for t in synthetic(n_queries, seed=1)]
    # Embeddings of synthetic keys: real MiniLM for the first 2k, the rest are random unit vectors
    # (encoding 100k texts on 2 cores would dominate the run; search cost does not depend on content).
    rng = np.random.default_rng(0)
    real = min(n, 2000)
    emb = np.concatenate([dense.encode([t.task for t in trajs[:real]]),
                          rng.normal(size=(n - real, dense.dim)).astype(np.float32)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    row: dict = {"size": n}
    for name, threshold in (("exact", 10**12), ("faiss", 0)):
        enc_mod.FAISS_MIN_SIZE = threshold
        index = dense.from_embeddings(emb)
        bank = Bank(Path("."), {"encoder": dense.identity}, trajs, dense, {"static": index})
        t0 = time.perf_counter()
        if name == "faiss":
            index.faiss()
        row[f"{name}_build_s"] = round(time.perf_counter() - t0, 3)
        lat = time_queries(Retriever(bank), queries, None)
        row[f"{name}_p50_ms"], row[f"{name}_p95_ms"] = round(pct(lat, 50), 3), round(pct(lat, 95), 3)
    enc_mod.FAISS_MIN_SIZE = 50_000
    bm25 = BM25Encoder()
    t0 = time.perf_counter()
    bidx = bm25.build([t.task for t in trajs])
    row["bm25_build_s"] = round(time.perf_counter() - t0, 3)
    bank = Bank(Path("."), {"encoder": bm25.identity}, trajs, bm25, {"static": bidx})
    lat = time_queries(Retriever(bank), queries, None)
    row["bm25_p50_ms"], row["bm25_p95_ms"] = round(pct(lat, 50), 3), round(pct(lat, 95), 3)
    # Leakage-free training queries always carry an exclusion: measure that path too (exact).
    index = dense.from_embeddings(emb)
    bank = Bank(Path("."), {"encoder": dense.identity}, trajs, dense, {"static": index})
    lat = time_queries(Retriever(bank), queries, Filters(exclude_task_ids={"g1"}))
    row["exact_filtered_p50_ms"] = round(pct(lat, 50), 3)
    row["exact_over_faiss_p50"] = round(row["exact_p50_ms"] / row["faiss_p50_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-env", action="store_true", help="skip the ScienceWorld stepping ratio")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    dense = DenseEncoder("minilm")
    rows = [bench_size(n, args.queries, dense) for n in args.sizes]
    print("| bank size | exact p50 / p95 ms | FAISS-HNSW p50 / p95 ms | exact / FAISS (p50) | "
          "FAISS build s | BM25 p50 / p95 ms | exact + exclusion p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['exact_p50_ms']:.2f} / {r['exact_p95_ms']:.2f} | "
              f"{r['faiss_p50_ms']:.2f} / {r['faiss_p95_ms']:.2f} | {r['exact_over_faiss_p50']:.2f}x | "
              f"{r['faiss_build_s']:.1f} | {r['bm25_p50_ms']:.2f} / {r['bm25_p95_ms']:.2f} | "
              f"{r['exact_filtered_p50_ms']:.2f} |")
    result = {"retrieval": rows}
    if not args.no_env:
        try:
            from bench_env_step import bench_scienceworld
        except ImportError as e:
            print(f"(ScienceWorld stepping benchmark unavailable: {e})")
        else:
            sw = bench_scienceworld()
            result["scienceworld_stepping"] = sw
            print(f"ScienceWorld stepping: {json.dumps(sw)}")
    result["headline"] = retrieval_headline(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
