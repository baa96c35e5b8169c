"""Does this commit rebuild the first replication's contexts? (results/replication-cpu, run at 9508a98)

1. Inference: the memory ids each committed retrieval cell recorded, against what this commit's
   retrieval returns for the same tasks from the same committed banks.
2. Training: the ExpRAG-LoRA examples built from the committed training data and bank, decoded to
   text (``--dump FILE``); run it once under this commit and once with PYTHONPATH pointing at a
   checkout of 9508a98 (whose API it also speaks), then ``--compare OLD.json NEW.json``.

    python scripts/confirm_recipe_check.py --dump /tmp/new.json
    git worktree add /tmp/old 9508a98 && PYTHONPATH=/tmp/old/src python scripts/confirm_recipe_check.py --dump /tmp/old.json
    python scripts/confirm_recipe_check.py --compare /tmp/old.json /tmp/new.json
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

RUN = Path("results/replication-cpu")
CELLS = ("exprag_lora-hard-matched-k2-static-s2025", "exprag_frozen-hard-matched-k2-static")


def inference() -> None:
    from exprag.bank import Retriever, load_bank
    from exprag.memory_block import MemorySpec
    from exprag.trajectory import read_jsonl

    for cell in CELLS:
        d = RUN / "cells" / "smollm2-135m" / cell
        r = json.loads((d / "config.json").read_text())["retrieval"]
        spec = MemorySpec(r["k"], r["mode"], r["memory_format"], None)  # a budget shortens, never reselects
        tasks = {t.task_id: t.task for t in read_jsonl(d / "trajectories.jsonl")}
        rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
        hits = spec.retrieve(Retriever(load_bank(r["bank"])), [(tasks[row["task_id"]], None) for row in rows])
        same = sum([h.trajectory.id for h in hs] == row["memory_ids"] for hs, row in zip(hits, rows))
        print(f"inference, {cell}: {same}/{len(rows)} episodes retrieve the memory ids the cell recorded")


def training(out: Path) -> None:
    from transformers import AutoTokenizer

    from exprag.bank import load_bank
    from exprag.llm.models import resolve_model
    from exprag.train.data import build_examples, load_trajectories

    try:  # this commit
        from exprag.memory_block import MemorySpec as memory
    except ImportError:  # 9508a98
        from exprag.train.data import MemorySettings as memory
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    trajs, _ = load_trajectories([RUN / "data" / "train-easy.jsonl"])
    examples, report = build_examples(trajs, tok, bank=load_bank(RUN / "banks" / "dense-minilm" / "easy"),
                                      memory=memory(2, "static", "json", 2000), max_length=4096)
    recorded = json.loads((RUN / "adapters/smollm2-135m/exprag_lora-s2025/data_report.json").read_text())
    print(f"training: {report.tokens} tokens in {report.examples} examples (seed 2025's data_report: "
          f"{recorded['train']['tokens']})")
    out.write_text(json.dumps([tok.decode(e.input_ids) for e in examples]))


def compare(old: Path, new: Path) -> None:
    a, b = json.loads(old.read_text()), json.loads(new.read_text())
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    print(f"training examples that differ: {len(differ)} of {len(a)}")
    for i in differ:
        for line in difflib.unified_diff(a[i].splitlines(), b[i].splitlines(), lineterm="", n=0):
            print(f"  example {i}: {line[:300]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dump", type=Path, help="write the decoded training examples here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    try:
        inference()
    except ImportError:
        print("inference: skipped (this checkout has no exprag.memory_block)")
    if args.dump:
        training(args.dump)


if __name__ == "__main__":
    main()
