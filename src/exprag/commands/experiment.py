"""`exprag experiment CONFIG.yaml`: the paper's method grid, resumably, into one results table.

Methods (no retrieval, ExpRAG frozen, LoRA, LoRA + retrieval at inference, ExpRAG-LoRA) x task
groups (easy / hard) x memory sources (matched, mismatched, all, empty) x K x static/dynamic x seeds,
as declared in the YAML file's ``grid:`` blocks (docs/method.md#glossary). Expert data, banks and
adapters are made once; rerunning the same command skips finished cells. Render the results with
``exprag report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys

from exprag.validate import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of methods x task groups x memory sources x K (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML (see configs/small-cpu.yaml)")
    p.add_argument("--out", help="experiment directory (default: the config's out, else runs/experiments/<name>)")
    p.add_argument("--list", action="store_true", help="print the grid's cells and exit")
    p.add_argument("--no-report", action="store_true", help="do not render report.md and plots at the end")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="env workers of expert data, checkpoint selection and (without --ray) the cells; "
                        "overrides the config's eval.workers")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the unfinished cells as Ray tasks on the cluster at ADDRESS ('local' starts a head "
                        "here), eval.cell_cpus / eval.cell_gpus each; the experiment directory must be on a "
                        "filesystem every node sees. Overrides the config's eval.ray")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exprag.experiment import expand, load_experiment_config, retrievers, run_experiment
    from exprag.methods import DIAGNOSTIC_SOURCES

    cfg = load_experiment_config(args.config)
    if args.out:
        cfg.out = args.out
    if args.workers is not None:
        cfg.eval.workers = args.workers
    if args.ray is not None:
        cfg.eval.ray = args.ray
    if args.list:
        cells = expand(cfg)
        for c in cells:
            print(c.id + ("  (diagnostic: oracle memory, not a method)" if c.source in DIAGNOSTIC_SOURCES else ""))
        if cfg.data.expert_ceiling is not None:
            print(f"test and dev games: those the expert solves within {cfg.data.expert_ceiling} x the step cap")
        for key, spec in retrievers(cfg).items():  # which retriever the cells (labelled or not) use
            print(f"retriever {key or '(unlabelled cells)'}: {spec.scoring} scoring, encoder {spec.encoder}"
                  + (f", fallback {spec.fallback}" if spec.fallback else ""))
        if cfg.data.disjoint_from:
            print(f"test games: disjoint from those of {', '.join(cfg.data.disjoint_from)} (checked by the data stage)")
        if cfg.hypotheses:
            at = f", written at commit {cfg.preregistered_at}" if cfg.preregistered_at else ""
            print(f"pre-registered hypotheses (alpha {cfg.alpha}, exact two-sided McNemar{at}):")
            for h in cfg.hypotheses:
                test = f" [{h['a']} vs {h['b']}, {h['group']}, {h.get('alternative', 'greater')}]" if "a" in h else ""
                print(f"  {h['id']}: {h['text']}{test}")
        print(f"{len(cells)} cells -> {cfg.out_dir}")
        return 0
    from exprag.validate import check_output

    check_output(cfg.out_dir, "dir")  # before hours of work, not after
    command = " ".join(["exprag", "experiment", *sys.argv[2:]]) if sys.argv[1:2] == ["experiment"] \
        else f"exprag experiment {args.config}" + (f" --out {args.out}" if args.out else "")
    res = run_experiment(cfg, command=command, progress=not args.no_progress,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{len(res.rows)} cells ({res.cells_run} run, {res.cells_reused} reused): {res.out / 'results.md'}")
    if not args.no_report:
        from exprag.report import write_report

        rep = write_report([res.out], res.out)
        print(f"report: {rep.report}")
    return 0
