"""Expert collection in worker processes: `exprag collect` serially vs `--workers N`, same tasks, same run.

Runs the real command twice as subprocesses (as a user runs it), on the full train split of the env by
default (ScienceWorld: 3592 variations), and reports wall time, trajectories per second, CPU time and
peak RSS of each, the speedup, and that both runs collected the same tasks with the same success. The
CPU model and vector extensions are recorded with the timings.

    python bench/bench_collect_workers.py [--env scienceworld] [--split train] [--per-type N [--sample]]
        [--limit N] [--workers 2] [--only serial|workers] [--json OUT]

``--sample`` takes a seeded random ``--per-type`` of each type instead of the first ones (the first
variations of a type can be easier than the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import log, write_json


def collect(args: argparse.Namespace, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "exprag", "collect", "--env", args.env, "--split", args.split, "--task-types",
           args.task_types, "--out", str(out), "--keep-failures"]
    if args.per_type:
        cmd += ["--per-type", str(args.per_type)]
    if args.sample:
        cmd += ["--sample"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    log(f"running: {' '.join(cmd[2:])}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # exit 1 with the file written: some expert episodes did not reach success (kept, and counted below)
    if proc.returncode != 0 and not (proc.returncode == 1 and out.is_file() and "did not reach success" in proc.stderr):
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {
        "workers": workers,
        "command": " ".join(["exprag", *cmd[3:]]),
        "trajectories": len(rows),
        "successes": sum(bool(r.get("success")) for r in rows),
        "steps": sum(int(r.get("num_steps") or 0) for r in rows),
        "wall_s": round(wall, 1),
        "trajectories_per_s": round(len(rows) / wall, 3) if wall else None,
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        # the largest single process among the children waited for (the main process or one JVM / worker)
        "peak_rss_gb": round(after.ru_maxrss / 1e6, 2),
        "task_ids": sorted(r["task_id"] for r in rows),
        "failed_task_ids": sorted(r["task_id"] for r in rows if not r.get("success")),
    }


def _reported(run: dict) -> dict:
    """A run as the result file keeps it: without the full task list (compared, not stored)."""
    return {k: v for k, v in run.items() if k != "task_ids"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="scienceworld")
    ap.add_argument("--split", default="train")
    ap.add_argument("--task-types", default="all")
    ap.add_argument("--per-type", type=int, default=None, help="at most N tasks per type (default: all)")
    ap.add_argument("--sample", action="store_true", help="a seeded random --per-type of each type, not the first")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=("serial", "workers"), default=None,
                    help="one of the two runs (a split too long to time both in one sitting); no speedup is computed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from exprag.experiment import cpu_info

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        for name, workers in (("serial", 1), ("workers", args.workers)):
            if args.only in (None, name):
                runs[name] = collect(args, Path(tmp) / f"{name}.jsonl", workers)
                log(f"{name}: {runs[name]['trajectories']} trajectories in {runs[name]['wall_s']} s")
    base = {"env": args.env, "split": args.split, "task_types": args.task_types, "per_type": args.per_type,
            "sample": args.sample, "limit": args.limit, "cpus": os.cpu_count(), **cpu_info(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    if args.only:
        run = runs[args.only]
        result = {**base, "only": args.only, args.only: _reported(run)}
        print(f"{args.env} {args.split}: {args.only} only, {run['trajectories']} trajectories in {run['wall_s']} s "
              f"({run['successes']} successes); CPU {result['cpu_model']} ({', '.join(result['cpu_vector'])})")
        write_json(args.json, result)
        return result
    serial, parallel = runs["serial"], runs["workers"]
    same_tasks = serial["task_ids"] == parallel["task_ids"]
    result = {
        **base,
        "serial": _reported(serial),
        "workers": _reported(parallel),
        "speedup": round(serial["wall_s"] / parallel["wall_s"], 3) if parallel["wall_s"] else None,
        "same_tasks": same_tasks,
    }
    from headlines import collect_workers_headline

    result["headline"] = collect_workers_headline(result)
    print(f"{args.env} {args.split}: {serial['trajectories']} trajectories; serial {serial['wall_s']} s, "
          f"--workers {args.workers} {parallel['wall_s']} s: {result['speedup']}x; successes "
          f"{serial['successes']} vs {parallel['successes']}; same tasks: {same_tasks}; CPU {result['cpu_model']} "
          f"({', '.join(result['cpu_vector'])})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
