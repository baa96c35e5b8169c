"""`exprag quickstart`: the main job, offline on the bundled defaults.

1. collect expert trajectories (TextWorldExpress, easy + hard train games) and build a MiniLM bank;
2. retrieve, for held-out test tasks of the hard types, the top-2 trajectories and print them;
3. what retrieval in training does: replay the committed CPU replication (results/replication-cpu,
   ALFWorld with cool and heat held out of training) on its first held-out games: the frozen
   SmolLM2-135M, its LoRA adapter and its ExpRAG-LoRA adapter, each with the evaluation the replication
   ran, printed beside the replication's 50-game result (skipped with ``--no-agent``).

Everything lands in one run directory; a rerun reuses what is already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from exprag.validate import positive_int

_SCORING = "procedure"  # how the bank scores its keys (the bank default)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: expert bank, retrieval, and a small agent evaluation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run directory (reused when it exists)")
    p.add_argument("--per-type", type=positive_int, default=5, help="expert trajectories per train task type")
    p.add_argument("--test-per-type", type=positive_int, default=1, help="held-out test tasks per hard task type")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--replication", default=None, metavar="DIR",
                   help="experiment directory whose adapters step 3 replays (default: results/replication-cpu)")
    p.add_argument("--games-per-type", type=positive_int, default=3,
                   help="held-out games per task type that step 3 replays")
    p.add_argument("--no-contrast", action="store_true",
                   help="step 3 replays only the first games, without the added game on which the "
                        "replication's ExpRAG-LoRA and LoRA differed")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="step cap in step 3 (default: the replication's; a lower one is for quick checks "
                        "and its outcomes are not comparable)")
    p.add_argument("--no-agent", action="store_true", help="stop after retrieval (no model is loaded)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exprag.bank import Retriever, build_bank, load_bank
    from exprag.bank.store import reusable_manifest
    from exprag.envs import make_env
    from exprag.envs.splits import resolve_task_types
    from exprag.replay import find_run_dir, format_replay, replay
    from exprag.expert import collect_to_file
    from exprag.trajectory import read_jsonl
    from exprag.validate import check_output

    t0 = time.perf_counter()
    out = check_output(args.out, "dir")
    run_dir = None if args.no_agent else find_run_dir(args.replication)  # before any work: fail fast
    data = out / "data" / "twx-train-easy-hard.jsonl"
    bank_dir = out / "bank"
    env_name = "twx"
    hard = resolve_task_types(env_name, "hard")
    with make_env(env_name) as env:
        test_tasks = [t for tt in hard for t in env.tasks("test", [tt])[: args.test_per_type]]
        if not data.is_file():
            types = resolve_task_types(env_name, "all")
            tasks = [t for tt in types for t in env.tasks("train", [tt])[: args.per_type]]
            collect_to_file(env, tasks, data, desc="expert trajectories")
    trajs = read_jsonl(data)
    print(f"[1/3] expert bank data: {len(trajs)} trajectories of {len({t.task_type for t in trajs})} "
          f"task types ({env_name}, train split) -> {data}")
    if reusable_manifest(bank_dir, [data], [args.encoder], _SCORING):
        bank = load_bank(bank_dir)
    else:
        bank = build_bank(trajs, bank_dir, args.encoder, sources=[data], retrieval=_SCORING)
    print(f"      bank: {bank_dir} (encoder {bank.manifest['encoder']['name']})")

    print(f"[2/3] static retrieval (k=2) for {len(test_tasks)} held-out test tasks of the hard types:")
    retriever = Retriever(bank)
    with make_env(env_name) as env:
        for task in test_tasks:
            desc = env.reset(task).task
            hits = retriever.retrieve(desc, k=2, mode="static")
            right = sum(h.trajectory.task_type == task.task_type for h in hits)
            print(f"  - [{task.task_type}] {task.task_id}: {desc[:90]}")
            for h in hits:
                t = h.trajectory
                print(f"      {h.score:6.3f}  [{t.task_type}] {t.id}  ({t.num_steps} steps: "
                      f"{' | '.join(t.actions()[:4])}{' | ...' if t.num_steps > 4 else ''})")
            print(f"      {right}/{len(hits)} retrieved trajectories share the task type")

    if args.no_agent:
        print(f"done in {time.perf_counter() - t0:.0f}s (agent step skipped); run directory: {out}")
        return 0
    print(f"[3/3] what retrieval in training does: the adapters of {run_dir} (ALFWorld; no adapter trained on "
          f"its held-out types) on its first {args.games_per_type} held-out games per type, each model with "
          "the evaluation that experiment ran")
    rep = replay(run_dir, out / "replay", per_type=args.games_per_type, with_contrast=not args.no_contrast,
                 max_steps=args.max_steps)
    print(f"      {len(rep.games)} games of {', '.join(rep.task_types)}, {rep.max_steps}-step cap"
          + (f", {rep.contrast} added for contrast" if rep.contrast else ""))
    print(format_replay(rep))
    print(confirmation_status(run_dir))
    print(f"done in {time.perf_counter() - t0:.0f}s; run directory: {out}")
    return 0


def confirmation_status(run_dir: Path) -> str:
    """Where the replayed result stands: one training seed is exploratory; say whether the
    pre-registered confirmatory replication has results yet (its seeds' results.jsonl)."""
    root = Path(run_dir).parent / "replication-cpu-confirm"
    done = sorted(d.name for d in root.glob("s*") if (d / "results.jsonl").is_file())
    head = ("That result is one training seed's, exploratory (not significant at alpha 0.05). The confirmatory "
            f"replication (seeds 2026, 2027; 200 fresh paired games) is pre-registered in "
            f"{root / 'PREREGISTRATION.md'}")
    if not done:
        return head + "; none of its cells has run yet."
    return head + f"; results so far: {', '.join(str(root / d / 'report.md') for d in done)}."
