"""`make bench`: run every benchmark, each in its own process, and write a summary.

Each benchmark prints its own table and writes JSON (``--json``); this collects them into
``bench/results/summary.json`` and ``bench/results/summary.md``. Every number is a ratio against a
baseline measured in the same run, so summaries from different machines compare.

    python bench/run_all.py [--only retrieval rollout ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, extra args for --quick)
BENCHES = {
    "retrieval": ("bench_retrieval.py", ["--sizes", "1000", "10000", "--queries", "50"]),
    "env_step": ("bench_env_step.py", []),
    "alfworld": ("bench_alfworld.py", []),
    "llm": ("bench_llm.py", []),
    "rollout": ("bench_rollout.py", ["--episodes", "2", "--steps", "4"]),
    "train": ("bench_train.py", []),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=None)
    ap.add_argument("--quick", action="store_true", help="smaller sizes where a benchmark offers them")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                                 "processor": platform.processor()},
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmarks": {}}
    failed = []
    for name in args.only or list(BENCHES):
        script, quick = BENCHES[name]
        path = HERE / script
        if not path.is_file():
            summary["benchmarks"][name] = {"status": "missing"}
            continue
        js = out / f"{name}.json"
        cmd = [sys.executable, str(path), "--json", str(js)] + (quick if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        entry = {"status": "ok" if rc == 0 else f"failed (exit {rc})", "seconds": round(time.perf_counter() - t0, 1)}
        if rc == 0 and js.is_file():
            entry["result"] = json.loads(js.read_text())
        else:
            failed.append(name)
        summary["benchmarks"][name] = entry
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Benchmark summary", "", f"Machine: {summary['machine']['platform']}, Python "
             f"{summary['machine']['python']}; started {summary['started']}.", "",
             "| benchmark | status | seconds | result file |", "|---|---|---|---|"]
    for name, e in summary["benchmarks"].items():
        lines.append(f"| {name} | {e['status']} | {e.get('seconds', '')} | {name}.json |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"summary: {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
