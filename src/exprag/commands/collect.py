"""`exprag collect`: run an environment's expert and write trajectories + a split manifest."""

from __future__ import annotations

import argparse
import sys

from exprag.validate import integer, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="run the expert / gold policy and write trajectories (JSONL)",
                       description="Run an environment's expert on a split and write trajectories, "
                                   "with a split manifest (task ids + hash) beside the output.")
    p.add_argument("--env", required=True, help="scienceworld | twx | alfworld")
    p.add_argument("--split", default="train", choices=["train", "dev", "test"])
    p.add_argument("--task-types", default="all", help="easy | hard | all | comma list of task types")
    p.add_argument("--per-type", type=positive_int, default=None, help="at most N tasks per task type")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N tasks in all")
    p.add_argument("--sample", action="store_true",
                   help="pick tasks at random (seeded) instead of the first ones of each type")
    p.add_argument("--seed", type=integer, default=2025)
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--keep-failures", action="store_true",
                   help="also write expert episodes that did not reach success")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment option (repeatable), e.g. data_dir=/path")
    p.set_defaults(func=run)


def is_trajectories_file(path) -> bool:
    """A JSONL file of exprag trajectories (its first record has a trajectory's fields): collect's own
    output, which a rerun may replace; any other existing file is refused."""
    from exprag.io import first_json_record

    rec = first_json_record(path)
    return isinstance(rec, dict) and {"schema_version", "id", "messages"} <= rec.keys()


def run(args: argparse.Namespace) -> int:
    from exprag.commands._args import parse_env_args
    from exprag.envs import check_env_args, make_env
    from exprag.envs.splits import check_env, manifest_path, resolve_task_types, select_tasks
    from exprag.expert import collect_to_file
    from exprag.io import check_output_file, read_json_object

    check_env(args.env)
    types = resolve_task_types(args.env, args.task_types)
    env_args = check_env_args(args.env, parse_env_args(args.env_arg))
    # before the expert runs: a failed write would waste the whole collection
    check_output_file(args.out, "trajectories file", is_trajectories_file)
    check_output_file(manifest_path(args.out), "split manifest", lambda p: "tasks" in (read_json_object(p) or {}))
    with make_env(args.env, **env_args) as env:
        tasks = select_tasks(env.tasks(args.split, types), args.per_type, args.limit, args.sample, args.seed)
        done = collect_to_file(env, tasks, args.out, desc=f"collect {args.env}/{args.split}",
                               keep_failures=args.keep_failures)
    steps = sum(t.num_steps for t in done.trajectories)
    print(f"wrote {len(done.trajectories)} trajectories ({steps} steps) to {args.out}; manifest {done.manifest}")
    if done.failures:
        print(f"{len(done.failures)} expert episodes did not reach success:", file=sys.stderr)
        for task, why in done.failures:
            print(f"  {task.task_type} {task.task_id}: {why}", file=sys.stderr)
        return 1
    return 0
