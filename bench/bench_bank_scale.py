"""Banks of 100k / 1M synthetic keys: build, load, query latency and peak memory per scorer, against
exact brute-force search measured in the same run.

Ours: the bank's scoring as shipped (chunked top-k, indexes saved at build and loaded, embeddings
memory-mapped). Baseline ("exact"): the same scores as one queries x bank matrix and a top-k over it,
on an index rebuilt at load (what a bank without saved indexes does). Dense embeddings are random unit
vectors (no encoder time in build or query); the encode time of the bundled MiniLM is measured apart
on a small sample and added per query for the "encode included" latency. Dense search is exact here
(the FAISS graph, built at build for banks of ``FAISS_MIN_SIZE`` keys or more, is left out: its build
takes tens of minutes on one core at 1M). Each (scorer, size, variant) runs in its own process, so
that its peak RSS is its own.

    python bench/bench_bank_scale.py [--sizes 100000 1000000] [--scorings procedure dense bm25]
                                     [--queries 100] [--batch 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from headlines import entry  # noqa: E402
from runtime import log, offline_one_thread, write_json  # noqa: E402

VERBS = ["heat", "cool", "clean", "put", "examine", "find", "take", "boil", "melt", "slice", "two", "look"]
OBJS = ["egg", "apple", "mug", "knife", "potato", "book", "lamp", "coin", "bowl", "plate", "tomato", "key",
        "pan", "vase", "cd", "pencil", "watch", "towel", "spoon", "bread"]
PLACES = ["fridge", "countertop", "sink", "desk", "shelf", "cabinet", "drawer", "table", "box", "garbagecan",
          "microwave", "stoveburner", "sofa", "bed", "safe", "dresser"]
TEMPLATES = ["{v} some {o} and put it in {p}", "put a {v} {o} in {p}", "{v} the {o} then place it on the {p}",
             "find a {o}, {v} it, and put it in {p} {n}"]
DIM = 384  # MiniLM's


def synthetic_keys(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Templated task texts and their task types (the verb)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        v, o, p = rng.choice(VERBS), rng.choice(OBJS), rng.choice(PLACES)
        texts.append(rng.choice(TEMPLATES).format(v=v, o=o, p=p, n=i % 97))
        labels.append(v)
    return texts, labels


def random_dense_encoder():
    """A DenseEncoder whose embeddings are random unit vectors: scoring cost without model cost."""
    from exprag.bank.encoders import DenseEncoder

    class RandomDense(DenseEncoder):
        def __init__(self) -> None:
            super().__init__("random-unit")
            self._rng = np.random.default_rng(0)

        @property
        def dim(self) -> int:
            return DIM

        def encode(self, texts, progress=False):
            out = np.empty((len(texts), DIM), np.float32)
            for a in range(0, len(texts), 65536):  # in blocks: no float64 copy of a 1M x 384 matrix
                block = self._rng.standard_normal((min(65536, len(texts) - a), DIM), dtype=np.float32)
                out[a:a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            return out

    return RandomDense()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(scoring: str, size: int, variant: str, n_queries: int, batch: int, k: int, tmp: Path) -> dict:
    """One measurement in this process: ``build`` (build and save into ``tmp``), or ``ours`` / ``exact``
    (load that bank, ``exact`` without its saved indexes; per-query and batched latency; peak RSS)."""
    from exprag.bank import encoders
    from exprag.bank.encoders import BM25Encoder
    from exprag.bank.procedure import POSTINGS
    from exprag.bank.scoring import ScoringConfig, build_index, load_index
    from exprag.bank.topk import top_from_scores

    encoders.FAISS_MIN_SIZE = 10 ** 12  # exact dense search (module docstring)
    texts, labels = synthetic_keys(size)
    queries, _ = synthetic_keys(max(n_queries, batch), seed=1)
    cfg = ScoringConfig(scoring)
    enc = BM25Encoder() if scoring == "bm25" else random_dense_encoder()
    rss_keys = peak_rss_mb()
    if variant == "build":  # its own process: the build's peak memory is not the queries'
        t = time.perf_counter()
        build_index(cfg, enc, texts, labels, "static").save(tmp / "static")
        return {"scoring": scoring, "size": size, "build_s": round(time.perf_counter() - t, 2),
                "build_peak_rss_mb": round(peak_rss_mb(), 1)}
    if variant == "exact":  # a bank without saved indexes: the load rebuilds them
        for name in [*POSTINGS, encoders.BM25_VOCAB]:
            (tmp / "static" / name).unlink(missing_ok=True)
        shutil.rmtree(tmp / "static" / encoders.BM25_DIR, ignore_errors=True)
    t = time.perf_counter()
    index = load_index(cfg, enc, [tmp / "static"])
    if variant == "exact" and hasattr(getattr(index, "dense", index), "emb"):
        d = getattr(index, "dense", None) or index
        d.emb = np.array(d.emb)  # read into memory, as before memory-mapping
    load_s = time.perf_counter() - t

    def top(qs: list[str]):
        if variant == "exact":
            return top_from_scores(index.scores(qs), k)
        return index.top(qs, k)

    top(queries[:1])  # warm-up
    lat = []
    for q in queries[:n_queries]:
        t = time.perf_counter()
        top([q])
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    top(queries[:batch])
    batch_s = time.perf_counter() - t
    # the template term (procedure, static keys) encodes the masked query a second time; the exact baseline
    # scores only (no second stage, no diversity)
    encodes = 0 if scoring == "bm25" else 1 + int(variant == "ours" and bool(getattr(index, "reranks", False)))
    return {"scoring": scoring, "size": size, "variant": variant, "encodes_per_query": encodes,
            "load_s": round(load_s, 3), "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
            "batch_queries": batch, "batch_s": round(batch_s, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_keys_mb": round(rss_keys, 1)}


def minilm_encode_ms(sample: int) -> list[float]:
    """Per-query encode time of the bundled MiniLM (one query at a time, as the agent asks)."""
    offline_one_thread()
    from exprag.bank.encoders import DenseEncoder

    enc = DenseEncoder("minilm")
    queries, _ = synthetic_keys(sample, seed=2)
    enc.encode(queries[:1])
    out = []
    for q in queries:
        t = time.perf_counter()
        enc.encode([q + " now"])
        out.append((time.perf_counter() - t) * 1000)
    return out


def headline(result: dict) -> list[dict]:
    rows = {(r["scoring"], r["size"], r["variant"]): r for r in result["runs"] if "error" not in r}
    out = []
    for (scoring, size, variant), ours in sorted(rows.items()):
        base = rows.get((scoring, size, "exact"))
        if variant != "ours" or base is None:
            continue
        what = f"{scoring}, {size:,} keys"
        out += [entry(f"load s, {what}", "rebuild at load", base["load_s"], "saved index", ours["load_s"], False),
                entry(f"batch of {ours['batch_queries']} queries, peak RSS MB, {what}", "queries x bank matrix",
                      base["peak_rss_mb"], "chunked top-k", ours["peak_rss_mb"], False),
                entry(f"query p50 ms, {what}", "exact brute force", base["p50_ms"], "chunked top-k",
                      ours["p50_ms"], False)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--scorings", nargs="+", default=["procedure", "dense", "bm25"])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256, help="queries scored at once (training's batches)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--encode-sample", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=4, metavar=("SCORING", "SIZE", "VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        scoring, size, variant, tmp = args.worker
        print(json.dumps(worker(scoring, int(size), variant, args.queries, args.batch, args.k, Path(tmp))))
        return
    enc_ms = minilm_encode_ms(args.encode_sample)
    enc_p50 = float(np.percentile(enc_ms, 50))
    runs = []
    for size in args.sizes:
        for scoring in args.scorings:
            tmp = tempfile.mkdtemp(prefix="bank-scale-")
            build: dict = {}
            for variant in ("build", "ours", "exact"):  # one build, read by both
                log(f"{scoring} {size:,} {variant} ...")
                cmd = [sys.executable, __file__, "--worker", scoring, str(size), variant, tmp, "--queries",
                       str(args.queries), "--batch", str(args.batch), "--k", str(args.k)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    runs.append({"scoring": scoring, "size": size, "variant": variant,
                                 "error": p.stderr.strip().splitlines()[-1:]})
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                if variant == "build":
                    build = r
                    continue
                if variant == "ours":
                    r.update(build_s=build.get("build_s"), build_peak_rss_mb=build.get("build_peak_rss_mb"))
                n_enc = r.get("encodes_per_query", 0)
                if n_enc:  # by the dense model: once, or twice with the template term
                    r["p50_with_encode_ms"] = round(r["p50_ms"] + n_enc * enc_p50, 2)
                    r["p99_with_encode_ms"] = round(r["p99_ms"] + n_enc * float(np.percentile(enc_ms, 99)), 2)
                runs.append(r)
                log(json.dumps(r))
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"encode_minilm_ms": {"p50": round(enc_p50, 2), "p99": round(float(np.percentile(enc_ms, 99)), 2),
                                   "sample": len(enc_ms)},
              "runs": runs}
    result["headline"] = headline(result)
    cols = ["scoring", "size", "variant", "build_s", "build_peak_rss_mb", "load_s", "p50_ms", "p99_ms",
            "p50_with_encode_ms", "p99_with_encode_ms", "batch_s", "peak_rss_mb"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in runs:
        print("| " + " | ".join(str(r.get(c, r.get("error", "–") if c == "build_s" else "–")) for c in cols) + " |")
    print(f"MiniLM encode per query: p50 {result['encode_minilm_ms']['p50']} ms, "
          f"p99 {result['encode_minilm_ms']['p99']} ms ({len(enc_ms)} queries)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
