"""Cells of the replication run in a second process while the experiment trains: the same code (this
worktree), the same EvalConfig the experiment builds for each (_cell_eval_config with the ceiling's kept
games, the experiment's banks, and for an adapter cell the checkpoint its experiment_done.json names),
into the same cell directories. The experiment then finds each cell.json with this very configuration
and reuses it. Usage: python parallel_cells.py CELL_ID... (ids as `exprag experiment --list` prints)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from exprag import experiment as X  # noqa: E402

cfg = X.load_experiment_config("configs/replication-cpu.yaml")
out = cfg.out_dir
want = set(sys.argv[1:])
kept = {g: v["kept"] for g, v in json.loads((out / "data" / "ceiling.json").read_text())["groups"].items()}
spec = X.retrievers(cfg)[None]
banks = {None: {n: X.bank_dir(out, None, spec, n) for n in ("easy", "hard", "all", "oracle-hard")}}
for cell in X.expand(cfg):
    if cell.id not in want:
        continue
    kind, adapter = X.METHODS[cell.method].adapter, None
    if kind:
        run_dir = X.adapter_dir(out, cell.model, kind, cell.seed)
        adapter = run_dir / json.loads((run_dir / "experiment_done.json").read_text())["checkpoint"]
    ecfg = X._cell_eval_config(cfg, out, cell, banks, adapter, kept.get(f"test-{cell.split}"))
    if X._finished_cell(Path(ecfg.out), ecfg) is not None:
        print(f"{cell.id}: finished already", flush=True)
        continue
    print(f"{cell.id}: running into {ecfg.out} ({len(ecfg.task_ids or [])} games, adapter {adapter})", flush=True)
    X._run_cell(ecfg, cell, X._lazy_model(ecfg), False)
    print(f"{cell.id}: done", flush=True)
