"""Top-k selection over one query's score row: what every exact search (dense, procedure, BM25) runs
once per query, over the whole bank.

baseline: the selection as it was (``-partition(-row)``, then a cumulative count of the tied scores
over the whole row, 8 bytes a key, to keep the lowest tied ids); ours: ``exprag.bank.topk`` (one
partitioned copy and two masks; the tied ids listed only from the tied positions). Both return the
same ids (checked on every row); rows are fresh arrays, as a scorer makes them, of random float32
scores. Rounds alternate the two; the best round of each is kept (machines here are noisy).

    python bench/bench_topk.py [--sizes 20000 100000 1000000] [--queries 20] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from runtime import log, offline_one_thread, write_json


def baseline_chunk_top(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The previous ``exprag.bank.topk._chunk_top``, kept here as the baseline."""
    n = s.shape[1]
    if k >= n:
        return s, np.broadcast_to(np.arange(n, dtype=np.int64), s.shape)
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1:k]
    above = s > kth
    ties = s == kth
    need = k - above.sum(1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= need))
    rows, cols = np.nonzero(keep)
    cols = cols.reshape(s.shape[0], k)
    return np.take_along_axis(s, cols, axis=1), cols.astype(np.int64)


def measure(size: int, n_queries: int, rounds: int, k: int) -> dict:
    from exprag.bank import topk

    rng = np.random.default_rng(size)
    rows = [rng.standard_normal((1, size)).astype(np.float32) for _ in range(n_queries)]
    rows[0][0, :: max(size // 7, 1)] = rows[0].max()  # ties at the top: the tie rule is exercised too
    ours_fn = topk._chunk_top
    best = {"baseline": float("inf"), "ours": float("inf")}
    try:
        for _ in range(rounds):
            for name, fn in (("baseline", baseline_chunk_top), ("ours", ours_fn)):
                topk._chunk_top = fn
                t = time.perf_counter()
                for r in rows:
                    topk.top_from_scores(r * 1.0, k)  # a fresh row, as a scorer returns one
                best[name] = min(best[name], (time.perf_counter() - t) / n_queries * 1000)
        for r in rows:
            topk._chunk_top = baseline_chunk_top
            want = topk.top_from_scores(r, k)[1]
            topk._chunk_top = ours_fn
            if not (topk.top_from_scores(r, k)[1] == want).all():
                raise SystemExit(f"{size:,} keys: ours and the baseline pick different ids")
    finally:
        topk._chunk_top = ours_fn
    log(f"{size:,} keys: top-{k} per query {best['baseline']:.3f} ms (baseline), {best['ours']:.3f} ms (ours)")
    return {"size": size, "k": k, "queries": n_queries, "rounds": rounds,
            "baseline_ms": round(best["baseline"], 3), "ours_ms": round(best["ours"], 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    offline_one_thread()
    from exprag.experiment import cpu_info

    result = {**cpu_info(), "runs": [measure(n, args.queries, args.rounds, args.k) for n in args.sizes]}
    from headlines import topk_headline

    result["headline"] = topk_headline(result)
    print("| keys | baseline ms / query | ours ms / query | ratio |")
    print("|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['size']:,} | {r['baseline_ms']} | {r['ours_ms']} | {r['baseline_ms'] / max(r['ours_ms'], 1e-9):.2f}x |")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
