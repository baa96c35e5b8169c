"""Write-back cost of the procedure index: appending one trajectory to a bank of N keys.

baseline: the index rebuilt over the whole bank (term weights learned again and the postings made again:
every key tokenized again), as write-back did before the keys' terms were kept;
ours: ``extend_index`` (only the new key tokenized; weights and postings recomputed with numpy from the
kept term ids). Both give the same weights and scores (tests/bank/test_bank_scale.py). Synthetic
templated keys as in bench_bank_scale.py, lexical part only (no encoder time).

    python bench/bench_bank_append.py [--sizes 100000 1000000] [--json OUT]
"""

from __future__ import annotations

import argparse
import time

from runtime import log, offline_one_thread, write_json


def measure(size: int) -> dict:
    from bench_bank_scale import synthetic_keys
    from exprag.bank.encoders import BM25Encoder
    from exprag.bank.procedure import ProcedureIndex, TermWeights, default_alpha
    from exprag.bank.scoring import ScoringConfig, build_index, extend_index

    texts, labels = synthetic_keys(size + 1)
    cfg = ScoringConfig("procedure", dense_weight=0.0)
    enc = BM25Encoder()  # no dense model: the lexical index alone
    t = time.perf_counter()
    index = build_index(cfg, enc, texts[:size], labels[:size], "static")
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    weights = TermWeights.learn(texts, labels, default_alpha(len(texts), "static"))
    rebuilt = ProcedureIndex(list(texts), weights, None, 0.0, cfg.diversity)  # postings over every key
    rebuild_s = time.perf_counter() - t

    t = time.perf_counter()
    grown = extend_index(cfg, enc, index, texts, labels, "static")
    extend_s = time.perf_counter() - t
    assert grown.weights.weights == rebuilt.weights.weights and grown.size == rebuilt.size == size + 1
    log(f"{size:,} keys: build {build_s:.2f} s, append one key: rebuild {rebuild_s:.2f} s, extend {extend_s:.3f} s")
    return {"size": size, "build_s": round(build_s, 3), "rebuild_s": round(rebuild_s, 3),
            "extend_s": round(extend_s, 3), "nnz": int(len(grown._terms.ids))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    offline_one_thread()
    from exprag.experiment import cpu_info

    result = {**cpu_info(), "runs": [measure(n) for n in args.sizes]}
    from headlines import bank_append_headline

    result["headline"] = bank_append_headline(result)
    print("| keys | build s | append: rebuild s | append: extend s | ratio |")
    print("|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['size']:,} | {r['build_s']} | {r['rebuild_s']} | {r['extend_s']} | "
              f"{r['rebuild_s'] / max(r['extend_s'], 1e-9):.1f}x |")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
