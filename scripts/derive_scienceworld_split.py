"""Derive the ScienceWorld easy / hard task-type split from the installed simulator's variation counts.

    PYTHONPATH=src python scripts/derive_scienceworld_split.py [--all]

The paper gives only the sizes of its split (17 easy / 13 hard types; easy train 2335 / test 1183,
hard train 1254 / test 636 variations) and a few example types per side. This script reads every task
type's official train / dev / test variation counts from the simulator (one JVM start, a few seconds),
enumerates every 17 / 13 split that keeps the examples on their sides and matches the sizes, breaks
the tie by keeping each ScienceWorld task family (task ids "N-*") on one side, and compares the result
with src/exprag/data/splits.yaml. docs/scienceworld-split.md explains the output. ``--all`` lists every
fitting split. Exit status 1 when splits.yaml is not the derived split.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from exprag.envs.scienceworld import ScienceWorldEnv
from exprag.envs.splits import (PAPER_SCIENCEWORLD_EASY_EXAMPLES, PAPER_SCIENCEWORLD_HARD_EXAMPLES,
                                PAPER_SCIENCEWORLD_SIZES, fitting_splits, scienceworld_families,
                                split_families, split_sizes, split_types)

N_EASY = 17
PAPER_TRAIN_TOTAL = PAPER_SCIENCEWORLD_SIZES.easy_train + PAPER_SCIENCEWORLD_SIZES.hard_train  # 3589


def hard_readings(types: list[str]) -> dict[str, list[str]]:
    """The fixed hard types under each reading of the paper's hard examples: an example that is not
    a task type name ("mendelian-genetics") names one of the types it prefixes."""
    fixed = [e for e in PAPER_SCIENCEWORLD_HARD_EXAMPLES if e in types]
    readings = {}
    for e in PAPER_SCIENCEWORLD_HARD_EXAMPLES:
        if e not in types:
            for t in (t for t in types if t.startswith(e + "-")):
                readings[f"{e} = {t}"] = fixed + [t]
    return readings or {"as named": fixed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="list every fitting split")
    args = ap.parse_args()

    with ScienceWorldEnv() as env:
        types = env.task_types()
        per_split = {t: tuple(len(env.variations(t, s)) for s in ("train", "dev", "test")) for t in types}
        version = env.version
    counts = {t: (c[0], c[2]) for t, c in per_split.items()}
    families = scienceworld_families()
    current = set(split_types("scienceworld", "easy"))

    print(f"# {version}: variations per task type (train / dev / test) and the side in splits.yaml\n")
    print("| family | task type | train | dev | test | splits.yaml |")
    print("|---|---|---:|---:|---:|---|")
    for t in types:
        tr, dv, te = per_split[t]
        print(f"| {families[t]} | {t} | {tr} | {dv} | {te} | {'easy' if t in current else 'hard'} |")
    tot = [sum(c[i] for c in per_split.values()) for i in range(3)]
    print(f"| | **all** | **{tot[0]}** | **{tot[1]}** | **{tot[2]}** | |")
    p = PAPER_SCIENCEWORLD_SIZES
    surplus = tot[0] - PAPER_TRAIN_TOTAL
    print(f"\nPaper: train {PAPER_TRAIN_TOTAL}, test {p.easy_test + p.hard_test};"
          f" simulator: train {tot[0]} ({surplus:+d}), test {tot[2]}.")
    odd = [t for t, (tr, _) in counts.items() if tr % 2]
    print(f"Types with an odd train count: {len(odd)} {odd if odd else ''}")

    easy_fixed = [e for e in PAPER_SCIENCEWORLD_EASY_EXAMPLES if e in types]
    exact: set[frozenset[str]] = set()
    fitting: set[frozenset[str]] = set()
    print(f"\nEasy examples (fixed easy): {', '.join(easy_fixed)}")
    for name, hard_fixed in hard_readings(types).items():
        ex = fitting_splits(counts, N_EASY, (p.easy_train, p.easy_train), p.easy_test, easy_fixed, hard_fixed)
        fit = fitting_splits(counts, N_EASY, (p.easy_train, p.easy_train + max(surplus, 0)), p.easy_test,
                             easy_fixed, hard_fixed)
        print(f"Reading {name} (fixed hard: {', '.join(hard_fixed)}): {len(ex)} exact fits, "
              f"{len(fit)} fits with the train surplus on either side")
        exact |= set(ex)
        fitting |= set(fit)
    print(f"\nSplits with all four sizes exact: {len(exact)}")
    print(f"Splits with both test sizes exact and train sizes within the surplus of {surplus}: {len(fitting)}")
    by_train = Counter(split_sizes(counts, s).easy_train for s in fitting)
    for tr in sorted(by_train):
        print(f"  easy train {tr} / hard train {tot[0] - tr}: {by_train[tr]} splits")
    by_split = Counter(len(split_families(s, families)) for s in fitting)
    print("Families cut across the two sides: "
          + ", ".join(f"{k} families: {v} splits" for k, v in sorted(by_split.items())))

    ranked = sorted(fitting, key=lambda s: (len(split_families(s, families)), sorted(set(types) - s)))
    whole = [s for s in ranked if not split_families(s, families)]
    for s in ranked if args.all else ranked[:6]:
        sz = split_sizes(counts, s)
        cut = split_families(s, families)
        print(f"  easy {sz.easy_train}/{sz.easy_test} hard {sz.hard_train}/{sz.hard_test};"
              f" families cut {cut or '-'}; hard: {', '.join(t for t in types if t not in s)}")
    if len(whole) != 1:
        print(f"\n{len(whole)} fitting splits keep every family on one side; no unique choice.")
        return 1
    chosen = whole[0]
    sz = split_sizes(counts, chosen)
    print(f"\nChosen (the only fitting split that keeps every family on one side): easy train {sz.easy_train} /"
          f" test {sz.easy_test}, hard train {sz.hard_train} / test {sz.hard_test}")
    print("  easy: [" + ", ".join(t for t in types if t in chosen) + "]")
    print("  hard: [" + ", ".join(t for t in types if t not in chosen) + "]")
    same = chosen == current and len(current) == N_EASY
    print(f"splits.yaml {'matches the chosen split' if same else 'DIFFERS from the chosen split'}.")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
