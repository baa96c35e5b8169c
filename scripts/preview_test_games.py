"""The test games an experiment's data stage will keep, found before any cell runs: the games generated from
its settings, played by the expert and filtered by its expert ceiling, exactly as ``exprag experiment``'s data
stage does (``exprag.experiment._ensure_test_experts``, its ``data.disjoint_from`` check included), into a
scratch directory; the kept task ids and what was dropped go to a small JSON file.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/preview_test_games.py \\
        configs/replication-cpu-confirm-s2026.yaml results/replication-cpu-confirm/test-games-s2026.json

The experiment's own data stage recomputes the same games (generation and the expert are deterministic);
tests/test_experiment.py checks a preview against the config's candidates and the other experiments' games.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from exprag.envs.alfworld import _gen_per_type, _gen_seed
from exprag.experiment import _ensure_test_experts, expand, load_experiment_config
from exprag.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("out", help="the JSON file to write")
    args = ap.parse_args(argv)
    cfg = load_experiment_config(args.config)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kept = _ensure_test_experts(cfg, Path(tmp), expand(cfg), [], False, lambda s: print(s, file=sys.stderr))
        record = json.loads((Path(tmp) / "data" / "ceiling.json").read_text(encoding="utf-8"))
    groups = {}
    for g, v in record["groups"].items():
        looked = Counter(x["task_type"] for x in v["games"])
        # "the expert needs 18 steps > 0.667 x cap 25" -> one reason whatever the length
        dropped = Counter(re.sub(r"needs \d+ steps", "needs more steps", x["dropped"]) for x in v["games"] if "dropped" in x)
        groups[g] = {"split": v["split"], "per_type": v["per_type"], "max_steps": v["max_steps"],
                     "looked_at": dict(looked), "kept_per_type": {t: sum(k.startswith(t + "-") for k in v["kept"]) for t in looked},
                     "dropped": dict(dropped), "kept": v["kept"]}
    split = cfg.data.test_split
    out = {"config": args.config, "split": split, "gen_seed": _gen_seed(cfg.env_args.get("gen_seed"))[split],
           "gen_per_type": _gen_per_type(cfg.env_args.get("gen_per_type"))[split],
           "expert_ceiling": cfg.data.expert_ceiling, "disjoint_from": cfg.data.disjoint_from,
           "seconds": round(time.perf_counter() - t0, 1), "groups": groups}
    atomic_write_json(Path(args.out), out)
    for g, v in groups.items():
        print(f"{g}: kept {v['kept_per_type']} of {v['looked_at']} looked at; dropped {v['dropped']}")
    print(f"{args.out} ({out['seconds']} s)")
    return 0 if all(n >= (v["per_type"] or 0) for v in groups.values() for n in v["kept_per_type"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
