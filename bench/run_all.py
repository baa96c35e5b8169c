"""`make bench`: run every benchmark, each in its own process, and summarise the ratios.

Each benchmark measures its baseline in the same run, prints its own table and writes JSON
(``--json``) with a uniform ``"headline"`` list (``bench/headlines.py``): ours vs baseline, and their
ratio, oriented so that > 1 means ours is better. This runs them all and writes
``bench/results/<name>.json`` (each benchmark's full result), ``bench/results/summary.json`` (status,
seconds and headlines per benchmark) and ``bench/results/summary.md`` (one ratio table). Ratios are
what compare across machines; absolute numbers depend on the machine and its load. A failed benchmark
is reported as failed, the others are still summarised, and the exit status is 1.

    python bench/run_all.py [--only retrieval rollout ...] [--quick] [--out DIR] [--bank-sizes N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    script: str
    args: list[str] = field(default_factory=list)  # always passed
    quick: list[str] = field(default_factory=list)  # added with --quick


BENCHES: dict[str, Bench] = {
    # ScienceWorld stepping is its own entry (env_step), so retrieval skips its copy of it.
    "retrieval": Bench("bench_retrieval.py", ["--no-env"], ["--sizes", "1000", "10000", "--queries", "50"]),
    # Full: TWX, ScienceWorld (official split) and ALFWorld; the first run records and caches resets.
    "retrieval_quality": Bench("bench_retrieval_quality.py", [], ["--envs", "twx"]),
    # Hand-written paraphrases vs templated banks (ALFWorld in seconds; ScienceWorld reuses the records above).
    "retrieval_paraphrases": Bench("bench_retrieval_quality.py",
                                   ["--paraphrases", "--no-templated", "--envs", "alfworld", "scienceworld"],
                                   ["--envs", "alfworld"]),
    # Cached episodes under $EXPRAG_CACHE/dynamic-retrieval; the first run records them (~25 min on 2 busy cores).
    "dynamic_retrieval": Bench("bench_dynamic_retrieval.py", [], ["--envs", "twx", "--scorings", "procedure"]),
    "label_fallback": Bench("bench_label_fallback.py", [], ["--envs", "twx"]),
    "env_step": Bench("bench_env_step.py", [], ["--steps", "100"]),
    "alfworld": Bench("bench_alfworld.py", [], ["--per-type", "1"]),
    "llm": Bench("bench_llm.py", [], ["--episodes", "2", "--turns", "4", "--batch", "2"]),
    "rollout": Bench("bench_rollout.py", [], ["--episodes", "2", "--steps", "4", "--batch", "2"]),
    "train": Bench("bench_train.py", [], ["--only", "trajectory", "trl"]),
    # Skips (ok, no headline) without vLLM: scripts/serve_vllm.sh --install-only.
    "engines": Bench("bench_engines.py", [], ["--episodes", "4", "--steps", "4"]),
    # 100k keys by default (1M takes ~10 min on one core: --bank-sizes 100000 1000000; docs/bank-scale.md)
    "bank_append": Bench("bench_bank_append.py", [], ["--sizes", "20000"]),
    # 10 variations per ScienceWorld type (300); the full train split (3592) is its default: docs/measured.md row.
    "collect_workers": Bench("bench_collect_workers.py", ["--per-type", "10"], ["--env", "twx", "--per-type", "2"]),
    "bank_scale": Bench("bench_bank_scale.py", [], ["--sizes", "20000", "--queries", "30", "--batch", "64"]),
    "topk": Bench("bench_topk.py", [], ["--sizes", "20000", "100000"]),
}


# ---- summary (pure: no benchmark runs here) --------------------------------------------------------------
def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def build_summary(benchmarks: dict[str, dict], machine: dict | None = None, started: str | None = None,
                  profile: str = "full") -> tuple[dict, str]:
    """(summary.json object, summary.md text) from the per-benchmark dicts.

    ``benchmarks``: name -> ``{"status": "ok" | "failed (...)" | "missing", "seconds": float,
    "result": <the JSON the benchmark wrote, with its "headline" list>, "command": [...]}`` (only
    ``status`` is required). A benchmark whose status is not ``ok`` counts as failed; one that is ok
    but has no headline is listed as such.
    """
    machine = machine or {}
    out: dict[str, Any] = {"machine": machine, "started": started, "profile": profile, "benchmarks": {},
                           "failed": []}
    ratio_rows, run_rows = [], []
    for name, b in benchmarks.items():
        status = b.get("status", "failed")
        ok = status == "ok"
        headline = list((b.get("result") or {}).get("headline") or []) if ok else []
        entry: dict[str, Any] = {"status": status, "seconds": b.get("seconds"), "result_file": f"{name}.json",
                                 "headline": headline}
        if b.get("command"):
            entry["command"] = b["command"]
        out["benchmarks"][name] = entry
        if not ok:
            out["failed"].append(name)
            ratio_rows.append(f"| {_cell(name)} | **{_cell(status)}** | – | – | – |")
        elif not headline:
            ratio_rows.append(f"| {_cell(name)} | (no headline in the result) | – | – | – |")
        for h in headline:
            direction = "higher" if h.get("higher_is_better") else "lower"
            r = h.get("ratio")
            ratio_rows.append(
                f"| {_cell(name)} | {_cell(h['metric'])} ({direction} is better) | "
                f"{_cell(h['baseline'])}: {_num(h.get('baseline_value'))} | "
                f"{_cell(h['ours'])}: {_num(h.get('ours_value'))} | {'–' if r is None else f'{r:.2f}x'} |")
        run_rows.append(f"| {_cell(name)} | {_cell(status)} | {_num(b.get('seconds'))} | "
                        f"{f'{name}.json' if ok else '–'} |")

    m = machine
    lines = ["# Benchmark summary", ""]
    if m:
        lines += [f"Machine: {m.get('platform', '?')}; processor {m.get('processor') or '?'}"
                  + (f" ({m['cpu_model']}; {', '.join(m.get('cpu_vector') or []) or 'no AVX'})"
                     if m.get("cpu_model") else "") + "; "
                  f"{m.get('cpu_count', '?')} CPUs; torch threads {m.get('torch_threads', '?')} (default; "
                  f"benchmarks may set their own); Python {m.get('python', '?')}.", ""]
    lines += [f"Started {started or '?'}; profile: {profile}. Each ratio compares ours with a baseline measured "
              "in the same run, oriented so that > 1 means ours is better: baseline / ours where lower is "
              "better (times, tokens, memory), ours / baseline where higher is better (throughputs, rates).", "",
              "| benchmark | metric | baseline | ours | ratio |", "|---|---|---|---|---|", *ratio_rows, "",
              "## Runs", "", "| benchmark | status | seconds | result file |", "|---|---|---|---|", *run_rows]
    if out["failed"]:
        lines += ["", f"Failed: {', '.join(out['failed'])}."]
    return out, "\n".join(lines) + "\n"


def machine_info() -> dict:
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    try:
        from exprag.experiment import cpu_info

        cpu = cpu_info()
    except ImportError:
        cpu = {}
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            **cpu, "torch_threads": threads}


# ---- run ------------------------------------------------------------------------------------------------
def run_one(name: str, bench: Bench, out: Path, quick: bool) -> dict:
    path = HERE / bench.script
    if not path.is_file():
        return {"status": "missing"}
    js = out / f"{name}.json"
    js.unlink(missing_ok=True)  # never summarise a previous run's result
    cmd = [sys.executable, str(path), "--json", str(js), *bench.args, *(bench.quick if quick else [])]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    entry: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1),
                             "command": [Path(cmd[1]).relative_to(HERE.parent).as_posix(), *cmd[2:]]}
    if rc != 0:
        entry["status"] = f"failed (exit {rc})"
    elif not js.is_file():
        entry["status"] = "failed (no result file)"
    else:
        try:
            entry["result"] = json.loads(js.read_text())
            entry["status"] = "ok"
        except json.JSONDecodeError as e:
            entry["status"] = f"failed (unreadable result: {e})"
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=None)
    ap.add_argument("--quick", action="store_true", help="each benchmark's smaller profile (see BENCHES)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--bank-sizes", type=int, nargs="+", default=None, help="bank_scale's sizes (keys)")
    args = ap.parse_args(argv)
    if args.bank_sizes:
        b = BENCHES["bank_scale"]
        BENCHES["bank_scale"] = Bench(b.script, [*b.args, "--sizes", *map(str, args.bank_sizes)])
    from exprag.io import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    machine = machine_info()
    profile = "quick" if args.quick else "full"
    results: dict[str, dict] = {}
    for name in args.only or list(BENCHES):
        results[name] = run_one(name, BENCHES[name], out, args.quick)
        # rewritten after every benchmark, so an interrupted suite still leaves what it measured
        summary, md = build_summary(results, machine, started, profile)
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "summary.md", md)
    print(md)
    print(f"summary: {out / 'summary.md'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
