"""Banks whose labels do not help: which label-free scorer to fall back to, and where the check draws the line.

``procedure`` scoring learns term weights from the stored task types. Here the bank's labels are
replaced — all one label, shuffled, or partly shuffled (a share ``noise`` of the keys get a random
label) — and static retrieval is judged against the **true** task types, for: procedure weights
learned from the given labels (no check), the label-free fallback (uniform term weights, what a bank gets when
``exprag.bank.labels.check_labels`` rejects its labels), plain BM25 and the paper's dense dot product.
Each labelling also shows the check's verdict (z: standard deviations above shuffled labels, and whether the labels are kept).

Data: the reset-only records of ``bench_retrieval_quality.py`` (cached there; the first run records
them), the same banks and queries as its table.

    python bench/bench_label_fallback.py [--envs twx alfworld scienceworld] [-k 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from exprag.bank.encoders import BM25Encoder, DenseEncoder
from exprag.bank.labels import check_labels
from exprag.bank.quality import evaluate_retrieval
from exprag.bank.scoring import ScoringConfig, build_index
from exprag.bank.store import Bank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dynamic_retrieval import MemoEncoder  # noqa: E402
from bench_retrieval_quality import load_env_data  # noqa: E402
from headlines import label_fallback_headline  # noqa: E402
from runtime import log, offline_one_thread, write_json  # noqa: E402


def labellings(true: list[str], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    shuffled = true[:]
    rng.shuffle(shuffled)
    types = sorted(set(true))
    out = {"true labels": true, "one label": ["all"] * len(true), "shuffled labels": shuffled}
    for noise in (0.25, 0.5):
        out[f"{int(noise * 100)}% random labels"] = [rng.choice(types) if rng.random() < noise else t for t in true]
    return out


def bench_env(name: str, k: int, dense: DenseEncoder, seed: int, log) -> dict:
    data = load_env_data(name, False, log)
    train, test = data["train"], data["test"]
    texts, true = [t.task for t in train], [t.task_type for t in train]
    judged = "no_twin" if name == "alfworld" else "overall"

    def judge(index) -> dict:
        bank = Bank(Path("."), {"encoder": dense.identity}, train, dense, {"static": index})
        rep = evaluate_retrieval(bank, test, k=k, mode="static").as_dict()[judged]
        return {"top1": rep["top1"], "all_at_k": rep["all_at_k"], "n": rep["n"]}

    t0 = time.perf_counter()
    rows = [{"labels": "–", "config": "dense (paper)",
             **judge(build_index(ScoringConfig("dense"), dense, texts, true, "static"))},
            {"labels": "–", "config": "bm25", **judge(build_index(ScoringConfig("bm25"), BM25Encoder(), texts,
                                                                    true, "static"))},
            {"labels": "–", "config": "procedure, label-free fallback (uniform weights)",
             **judge(build_index(ScoringConfig(), dense, texts, [""] * len(texts), "static"))}]
    checks = {}
    for lab_name, labels in labellings(true, seed).items():
        c = check_labels(texts, labels)
        checks[lab_name] = {"useful": c.useful, "z": c.z, "score": c.score, "chance": c.chance}
        rows.append({"labels": lab_name, "config": "procedure, weights from these labels (no check)",
                     **judge(build_index(ScoringConfig(), dense, texts, labels, "static"))})
        log(f"  {name}, {lab_name}: check {checks[lab_name]}")
    return {"env": name, "bank_size": len(train), "queries": len(test), "judged_on": judged, "checks": checks,
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["twx", "alfworld", "scienceworld"],
                    choices=["twx", "alfworld", "scienceworld"])
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    offline_one_thread()

    t0 = time.perf_counter()
    dense = MemoEncoder()  # each text encoded once across the configurations
    results = [bench_env(e, args.k, dense, args.seed, log) for e in args.envs]
    for res in results:
        print(f"\n{res['env']} ({res['bank_size']} → {res['queries']}, judged on {res['judged_on']} queries, "
              f"against the true task types)\n")
        print(f"| bank labels | check: kept? (z) | scoring | top-1 | all@{args.k} |\n|---|---|---|---|---|")
        for r in res["rows"]:
            c = res["checks"].get(r["labels"])
            verdict = "–" if c is None else f"{'kept' if c['useful'] else 'fallback'} ({c['z']})"
            print(f"| {r['labels']} | {verdict} | {r['config']} | {r['top1']:.3f} | {r['all_at_k']:.3f} |")
    out = {"k": args.k, "envs": results, "seconds": round(time.perf_counter() - t0, 1)}
    out["headline"] = label_fallback_headline(out)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
