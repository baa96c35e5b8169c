"""Output guards and run-directory locks (exprag.io), and the rule applied to every --out through the
CLI: exprag writes only where nothing of someone else's can be lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exprag.errors import OutputPathError, RunLockedError
from exprag.io import LOCK_FILE, check_output_dir, check_output_file, run_lock

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def exprag(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exprag", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)


def refused(res: subprocess.CompletedProcess, path: Path) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"exprag: error: {path}"), res.stderr


# ---- the rule ---------------------------------------------------------------------------------------
def test_check_output_dir(tmp_path):
    mine = lambda p: (p / "mine.json").is_file()  # noqa: E731
    check_output_dir(tmp_path / "absent" / "deeper", "run", mine)
    assert not (tmp_path / "absent").exists()  # a check creates nothing
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "run", mine)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK_FILE).write_text("123 host\n")  # a killed run's lock is not content
    check_output_dir(tmp_path / "stale", "run", mine)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "mine.json").write_text("{}")
    check_output_dir(tmp_path / "own", "run", mine)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match=r"user: not empty and not an exprag run \(it holds 'thesis.tex'\)"):
        check_output_dir(tmp_path / "user", "run", mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="file: exists and is not a directory"):
        check_output_dir(tmp_path / "file", "run", mine)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
            with pytest.raises(OutputPathError, match="not writable"):
                check_output_dir(tmp_path / "ro" / "run", "run", mine)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_check_output_file(tmp_path):
    mine = lambda p: p.read_text().startswith("{")  # noqa: E731
    check_output_file(tmp_path / "new.jsonl", "file", mine)
    (tmp_path / "empty.jsonl").write_text("")
    check_output_file(tmp_path / "empty.jsonl", "file", mine)
    (tmp_path / "own.jsonl").write_text("{}\n")
    check_output_file(tmp_path / "own.jsonl", "file", mine)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="notes.txt: exists and is not an exprag file"):
        check_output_file(tmp_path / "notes.txt", "file", mine)
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_file(tmp_path, "file", mine)


# ---- locks ------------------------------------------------------------------------------------------
def test_lock_is_reentrant_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        pid = int((run / LOCK_FILE).read_text().split()[0])
        assert pid == os.getpid()
        with run_lock(run):  # an experiment evaluating inside its own directory: no self-deadlock
            assert (run / LOCK_FILE).is_file()
        assert (run / LOCK_FILE).is_file()  # still held by the outer block
    assert not run.exists()  # the lock created the directory and nothing else was written
    run.mkdir()
    (run / "kept").write_text("x")
    with run_lock(run):
        pass
    assert sorted(os.listdir(run)) == ["kept"]


HOLD = """
import sys, time
from exprag.io import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_process_refused_then_takeover_after_kill(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"run: run directory in use by exprag process {holder.pid} "):
            with run_lock(run):
                pass
        # A run's half-written files are not judged as someone else's: the check names the holder.
        (run / ".config.json.tmp").write_text("{")
        with pytest.raises(RunLockedError, match=f"process {holder.pid} "):
            check_output_dir(run, "run directory", lambda p: False)
        (run / ".config.json.tmp").unlink()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The dead holder's lock file is still there, naming it; the kernel released its flock.
    assert (run / LOCK_FILE).read_text().split()[0] == str(holder.pid)
    with run_lock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (run / LOCK_FILE).exists()


# ---- every --out, through the CLI -------------------------------------------------------------------
@pytest.fixture()
def user_files(tmp_path):
    """A user's directory and file that exprag must never touch."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data").mkdir()
    (d / "data" / "x.csv").write_text("1,2\n")
    f = tmp_path / "notes.jsonl"
    f.write_text('{"note": "not a trajectory"}\n')
    return d, f


def test_every_out_refuses_user_files(tmp_path, user_files, twx_trajs):
    from exprag.trajectory import write_jsonl

    d, f = user_files
    trajs = tmp_path / "in" / "t.jsonl"
    write_jsonl(trajs, twx_trajs[0][:4])
    from exprag.bank import build_bank

    build_bank(twx_trajs[0][:4], tmp_path / "in" / "bank", "bm25")
    (tmp_path / "summary.json").write_text('{"mine": 1}\n')
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.json").write_text(json.dumps(
        {"name": "x", "env": "twx", "models": ["m"], "command": "", "config": {"main_k": 2}}))
    (tmp_path / "exp" / "results.jsonl").write_text("")
    (tmp_path / "exp.yaml").write_text("name: x\nenv: twx\nmodels: [smollm2-135m]\n"
                                       "grid: [{methods: [no_retrieval], splits: [easy]}]\n")
    before = snapshot(tmp_path)
    cases = [
        (d, ["bank", "build", "--trajectories", str(trajs), "--out", str(d), "--encoder", "bm25"]),
        (f, ["bank", "build", "--trajectories", str(trajs), "--out", str(f), "--encoder", "bm25"]),
        (d, ["eval", "--env", "twx", "--no-bank", "--out", str(d)]),
        (f, ["eval", "--env", "twx", "--no-bank", "--out", str(f)]),
        (d, ["train", "--trajectories", str(trajs), "--model", "smollm2-135m", "--out", str(d), "--overwrite"]),
        (f, ["collect", "--env", "twx", "--per-type", "1", "--out", str(f)]),
        (f, ["export", "--trajectories", str(trajs), "--format", "sharegpt", "--out", str(f)]),
        (d, ["alfworld", "generate", "--out", str(d), "--per-type", "1"]),
        (d, ["experiment", str(tmp_path / "exp.yaml"), "--out", str(d)]),
        (d, ["report", str(tmp_path / "exp"), "--out", str(d)]),
        (tmp_path / "summary.json", ["bank", "eval-retrieval", str(tmp_path / "in" / "bank"), "--queries",
                                     str(trajs), "-k", "1", "--out", str(tmp_path / "summary")]),
    ]
    for path, argv in cases:
        refused(exprag(*argv), path)
    assert snapshot(tmp_path) == before  # nothing moved, removed, created or changed
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_rerun_replaces_own_outputs(tmp_path):
    out = tmp_path / "twx.jsonl"
    args = ["collect", "--env", "twx", "--task-types", "coin", "--per-type", "1", "--out", str(out)]
    assert exprag(*args).returncode == 0
    os.utime(out, (0, 0))
    assert exprag(*args).returncode == 0  # collect's own output: a rerun replaces it
    first = out.read_bytes()
    assert out.stat().st_mtime > 0 and len(first.splitlines()) == 1
    exp = tmp_path / "twx-sharegpt.jsonl"
    for _ in range(2):
        res = exprag("export", "--trajectories", str(out), "--format", "sharegpt", "--out", str(exp))
        assert res.returncode == 0, res.stderr
    refused(exprag("export", "--trajectories", str(out), "--format", "openai", "--out", str(out)), out)
    assert out.read_bytes() == first  # a trajectories file is not an export: never overwritten by one


def test_collect_killed_before_writing_keeps_the_old_output(tmp_path):
    out = tmp_path / "twx.jsonl"
    args = ["collect", "--env", "twx", "--task-types", "coin", "--per-type", "1", "--out", str(out)]
    assert exprag(*args).returncode == 0
    before = snapshot(tmp_path)
    flag = tmp_path.parent / f"{tmp_path.name}.paused"
    more = ["collect", "--env", "twx", "--task-types", "coin", "--per-type", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "exprag", *more],
                            env={**os.environ, "EXPRAG_TEST_PAUSE_AT": "collect-done",
                                 "EXPRAG_TEST_PAUSE_FILE": str(flag)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(flag, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot(tmp_path) == before


def wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not flag.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before pausing"
        assert time.time() < end, "never paused"
        time.sleep(0.1)


FORK_AND_HOLD = """
import os, sys, time
from exprag.io import run_lock
with run_lock(sys.argv[1]):
    if os.fork() == 0:  # the child shares the locked file description
        time.sleep(600)
    print("held", flush=True)
    time.sleep(600)
"""


def test_message_when_the_named_holder_is_dead(tmp_path):
    """A child of the killed holder still holds the flock: the message says the PID is gone."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with pytest.raises(RunLockedError, match=rf"process {holder.pid} \(no longer running: a process it "):
            with run_lock(run):
                pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_exprag_files_are_never_written_through_a_planted_symlink(tmp_path):
    """exprag runs as root here: a link planted where it keeps its own file must not get the
    link's target truncated or appended to."""
    from exprag.errors import OutputPathError
    from exprag.io import LOCK_FILE, append_jsonl, run_lock, truncate_torn_tail

    victim = tmp_path / "victim.txt"
    victim.write_text("line 1\nno newline at the end")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("trajectories.jsonl", "results.jsonl"):
        (run / name).symlink_to(victim)
    with pytest.raises(OutputPathError, match="trajectories.jsonl: is a symbolic link"):
        truncate_torn_tail(run / "trajectories.jsonl")
    with pytest.raises(OutputPathError, match="results.jsonl: is a symbolic link"):
        append_jsonl(run / "results.jsonl", {"a": 1})
    (run / LOCK_FILE).symlink_to(victim)
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        with run_lock(run):
            pass
    assert victim.read_text() == "line 1\nno newline at the end"
