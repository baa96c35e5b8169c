"""One process per run directory, through the CLI: a second `exprag eval` / `exprag train` on the same
--out exits 2 naming the first one's PID and writes nothing; after the first is killed (kill -9) in the
middle of its run, the same command takes its lock over and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exprag.io import LOCK_FILE
from tests.test_io import exprag, refused, snapshot, wait_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from exprag.llm.models import tiny_random_model

    return str(tiny_random_model(tmp_path_factory.mktemp("tiny") / "model"))


def paused(args: list[str], flag: Path, stage: str) -> subprocess.Popen:
    """An exprag process stopped at ``stage`` of its run (holding its run directory's lock)."""
    proc = subprocess.Popen([sys.executable, "-m", "exprag", *args],
                            env={**os.environ, "EXPRAG_TEST_PAUSE_AT": stage, "EXPRAG_TEST_PAUSE_FILE": str(flag)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(flag, proc)
    return proc


def killed_then_taken_over(args: list[str], run: Path, flag: Path, stage: str) -> subprocess.CompletedProcess:
    holder = paused(args, flag, stage)
    try:
        before = snapshot(run)
        res = exprag(*args)
        refused(res, run)
        assert f"in use by exprag process {holder.pid} " in res.stderr
        assert snapshot(run) == before  # the refused process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).read_text().split()[0] == str(holder.pid)  # left by the dead holder
    res = exprag(*args)
    assert res.returncode == 0, res.stderr
    assert not (run / LOCK_FILE).exists()
    return res


def eval_args(tiny: str, run: Path) -> list[str]:
    return ["eval", "--env", "twx", "--split", "test", "--task-types", "coin", "--per-type", "2",
            "--model", tiny, "--no-bank", "--max-steps", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--out", str(run)]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_eval_lock_and_takeover(tmp_path, tiny):
    run = tmp_path / "run"
    killed_then_taken_over(eval_args(tiny, run), run, tmp_path / "paused", "eval-episode")
    assert sorted(r["task_id"] for r in rows(run)) == sorted({r["task_id"] for r in rows(run)})
    assert len(rows(run)) == 2 and len((run / "trajectories.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "metrics.json").read_text())["n"] == 2


@pytest.mark.slow  # two model loads at once; the lock itself is covered by the test above
def test_two_evals_started_together(tmp_path, tiny):
    """The reported race: two evals on one --out wrote 4 rows for 2 tasks. Now one runs, the other is
    refused at once (or, if it starts after the first finished, resumes a finished run)."""
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "exprag", *eval_args(tiny, run)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    assert sorted(p.returncode for p, _, _ in results) in ([0, 0], [0, 2])
    for p, _, err in results:
        if p.returncode == 2:
            other = next(q for q, _, _ in results if q is not p)
            assert f"in use by exprag process {other.pid} " in err
    assert sorted(r["task_id"] for r in rows(run)) == sorted({r["task_id"] for r in rows(run)})
    assert len(rows(run)) == 2


def test_train_lock_and_takeover(tmp_path, tiny, twx_trajs):
    from exprag.trajectory import write_jsonl

    data = tmp_path / "train.jsonl"
    write_jsonl(data, [t for t in twx_trajs[0] if t.task_type == "simonsays"][:2])
    run = tmp_path / "run"
    args = ["train", "--trajectories", str(data), "--model", tiny, "--out", str(run), "--epochs", "2",
            "--lr", "1e-3", "--no-progress", "--resume"]  # --resume on an absent run starts it
    killed_then_taken_over(args, run, tmp_path / "paused", "train-epoch")  # killed after epoch 1
    assert (run / "checkpoints" / "epoch-002").is_dir()
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]
