"""`exprag report`: markdown tables and PNG plots from one or more experiment run directories."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables (report.md) and plots (PNG) from experiment run directories",
                       description="Read experiment.json, results.jsonl and training.json of each RUN_DIR "
                                   "and write report.md with its PNGs; several RUN_DIRs are merged.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write (default: the RUN_DIR; required with several)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exprag.errors import ExpragError
    from exprag.report import write_report

    if args.out is None and len(args.run_dirs) > 1:
        raise ExpragError("--out is required when several RUN_DIRs are given")
    from exprag.validate import check_output

    check_output(args.out or args.run_dirs[0], "dir")
    res = write_report([Path(d) for d in args.run_dirs], Path(args.out or args.run_dirs[0]))
    for path in res.paths:
        print(f"wrote {path}")
    return 0
