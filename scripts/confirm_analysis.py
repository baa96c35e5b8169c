"""The pre-registered analysis of the confirmatory replication (configs/replication-cpu-confirm-s*.yaml):
H1c and H2c on the pairs of the confirmatory experiments pooled (each on its own games, so the pooled
discordant counts are a valid exact McNemar test, exprag.stats.pool), then, labelled secondary, each
experiment alone, everything pooled with the earlier experiment(s), and the spread across seeds.

    PYTHONPATH=src python scripts/confirm_analysis.py --earlier results/replication-cpu \\
        results/replication-cpu-confirm/s2026 results/replication-cpu-confirm/s2027

Prints markdown; exit status 0. An experiment without the pairs of a hypothesis is named as missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exprag.report import paired_stratum, read_experiment
from exprag.stats import pool, strata_table

# (id, A, B, label of A, label of B): the pre-registered comparisons, on the held-out group
TESTS = (("H1c", "exprag_lora", "lora", "ExpRAG-LoRA", "LoRA"),
         ("H2c", "exprag_lora", "exprag_lora/empty", "ExpRAG-LoRA matched", "ExpRAG-LoRA empty"))


def analyse(confirm: list[Path], earlier: list[Path], *, model: str = "smollm2-135m", group: str = "hard",
            alpha: float = 0.05) -> list[str]:
    exps = [read_experiment(d) for d in confirm]
    olds = [read_experiment(d) for d in earlier]
    lines = []
    for hid, a, b, la, lb in TESTS:
        strata = [paired_stratum(e, a, b, group, model) for e in exps]
        missing = [e.meta["name"] for e, s in zip(exps, strata) if s is None]
        lines += [f"## {hid}: {la} > {lb} ({group}, {model})", ""]
        if missing:
            lines += [f"Not evaluated: no paired episodes in {', '.join(missing)}.", ""]
            continue
        both = pool(strata, "confirmatory, pooled")
        ok = both.b > both.c and both.p < alpha
        lines += [f"**Confirmatory:** {both.n} pairs, b = {both.b}, c = {both.c}, exact two-sided McNemar "
                  f"p = {both.p:.4g}: {'supported' if ok else 'not supported'} at alpha = {alpha:g}.", "",
                  "Secondary (not confirmatory): each seed alone, and the pooled row.", "",
                  *strata_table(strata, la, lb), ""]
        prior = [paired_stratum(e, a, b, group, model) for e in olds]
        prior = [s for s in prior if s is not None]
        if prior:
            lines += [f"Secondary: with {', '.join(s.name for s in prior)} (the data that generated the finding).",
                      "", *strata_table(prior + strata, la, lb), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("confirm", nargs="+", type=Path, help="the confirmatory experiment directories")
    ap.add_argument("--earlier", nargs="*", type=Path, default=[], help="earlier experiments, for the secondary pooling")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args(argv)
    print("\n".join(analyse(args.confirm, args.earlier, model=args.model, alpha=args.alpha)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
