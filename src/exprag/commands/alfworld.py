"""`exprag alfworld generate`: build ALFWorld games offline from the ALFRED scenes in the alfworld wheel."""

from __future__ import annotations

import argparse

from exprag.validate import integer, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alfworld", help="ALFWorld utilities (offline game generation)",
                       description="ALFWorld utilities.")
    cmds = p.add_subparsers(dest="alfworld_command", metavar="SUBCOMMAND")
    g = cmds.add_parser(
        "generate", help="generate solvable ALFWorld games (when the official data is not available)",
        description="Generate ALFWorld games from the ALFRED scenes shipped in the alfworld wheel: "
                    "deterministic for a seed, checked solvable by alfworld's hand-coded expert, test "
                    "games on scenes never used by train games. A rerun reuses the games already built. "
                    "Results on generated games are not comparable with published ALFWorld numbers.")
    g.add_argument("--out", default=None,
                   help="output directory (games go to OUT/json_2.1.1/<split>/...); default: the set the "
                        "alfworld env uses when no data is given ($EXPRAG_CACHE/alfworld/...)")
    g.add_argument("--split", default="train", choices=["train", "dev", "test"])
    g.add_argument("--per-type", type=positive_int, default=None,
                   help="solvable games per task type (default: what the env builds on first use: "
                        "train 50, dev 10, test 22)")
    g.add_argument("--seed", type=integer, default=0)
    g.add_argument("--task-types", default="all", help="easy | hard | all | comma list of task types")
    g.add_argument("--max-expert-steps", type=positive_int, default=50,
                   help="drop games the expert cannot win within this many steps (default 50, the step cap)")
    g.set_defaults(func=run_generate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_generate(args: argparse.Namespace) -> int:
    from exprag.envs import alfworld_gen as gen
    from exprag.envs.alfworld import DEFAULT_GEN_PER_TYPE, default_generated_dir
    from exprag.envs.splits import resolve_task_types
    from exprag.io import LOCK_FILE, check_output_dir
    from exprag.validate import check_output

    types = resolve_task_types("alfworld", args.task_types)
    if args.out:
        check_output(args.out, "dir")
    if args.per_type is None:
        args.per_type = DEFAULT_GEN_PER_TYPE[args.split]
    out = args.out or str(default_generated_dir(args.seed))
    # Games go to OUT/json_2.1.1/...: OUT may hold that and nothing else (another data set stays untouched).
    check_output_dir(out, "ALFWorld games directory",
                     lambda p: {e.name for e in p.iterdir()} <= {gen.DATA_DIR, LOCK_FILE})
    pbar = gen.GenerationBar(args.per_type * len(types), f"alfworld generate {args.split}")
    report = gen.generate(out, split=args.split, per_type=args.per_type, seed=args.seed, task_types=types,
                          max_expert_steps=args.max_expert_steps, progress=pbar)
    pbar.close()
    width = max(len(t) for t in types)
    print(f"{'task type':<{width}}  games  dropped  built  s/game  (dropped: reasons)")
    built = seconds = 0
    for tt, rep in report.types.items():
        per = f"{rep.seconds / rep.built:6.2f}" if rep.built else "     -"
        why = ", ".join(f"{k} {v}" for k, v in sorted(rep.reasons.items())) or "-"
        print(f"{tt:<{width}}  {rep.generated:5d}  {rep.dropped:7d}  {rep.built:5d}  {per}  ({why})")
        built += rep.built
        seconds += rep.seconds
    total = sum(r.generated for r in report.types.values())
    note = "all found already built" if report.cached else f"{built} built in {seconds:.1f}s"
    print(f"{total} games in {report.root / gen.SPLIT_DIRS[args.split]} ({note}); generated games: results "
          f"are not comparable with published ALFWorld numbers")
    if args.out:
        print(f"play them with: exprag collect --env alfworld --split {args.split} --env-arg data_dir={out} ...")
    short = [tt for tt, r in report.types.items() if r.generated < args.per_type]
    if short:
        print(f"only {', '.join(f'{report.types[t].generated} {t}' for t in short)} "
              f"(too many unsolvable candidates); try another --seed")
        return 1
    return 0
