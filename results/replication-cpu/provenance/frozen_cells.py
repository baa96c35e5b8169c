"""The replication's two frozen-model cells (no_retrieval, exprag_frozen) run in a second process while
the experiment trains: the same code (this worktree), the same EvalConfig the experiment builds for them
(_cell_eval_config with the ceiling's kept games and the experiment's banks), into the same cell
directories. The experiment then finds each cell.json with this very configuration and reuses it."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from exprag import experiment as X  # noqa: E402

cfg = X.load_experiment_config("configs/replication-cpu.yaml")
out = cfg.out_dir
cells = X.expand(cfg)
kept = {g: v["kept"] for g, v in json.loads((out / "data" / "ceiling.json").read_text())["groups"].items()}
spec = X.retrievers(cfg)[None]
banks = {None: {n: X.bank_dir(out, None, spec, n) for n in ("easy", "hard", "all", "oracle-hard")}}
for cell in cells:
    if X.METHODS[cell.method].adapter:
        continue
    ecfg = X._cell_eval_config(cfg, out, cell, banks, None, kept.get(f"test-{cell.split}"))
    if X._finished_cell(Path(ecfg.out), ecfg) is not None:
        print(f"{cell.id}: finished already", flush=True)
        continue
    print(f"{cell.id}: running into {ecfg.out} ({len(ecfg.task_ids or [])} games)", flush=True)
    X._run_cell(ecfg, cell, X._lazy_model(ecfg), False)
    print(f"{cell.id}: done", flush=True)
