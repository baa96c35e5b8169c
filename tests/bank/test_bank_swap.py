"""The bank swap: a `bank build` killed at any point leaves a loadable bank at --out (the old one or the
new one, never neither), and the next build removes what the killed one left."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exprag.bank import append_to_bank, build_bank, load_bank
from exprag.bank.store import CURRENT, bank_files, is_bank_dir
from exprag.errors import DataFormatError, OutputPathError, RunLockedError
from exprag.io import LOCK_FILE
from exprag.trajectory import write_jsonl
from tests.test_io import exprag, refused, snapshot, wait_for


@pytest.fixture()
def inputs(tmp_path, twx_trajs):
    """An old bank (4 trajectories) at BANK and the input of a new one (8 trajectories)."""
    train, _ = twx_trajs
    write_jsonl(tmp_path / "old.jsonl", train[:4])
    write_jsonl(tmp_path / "new.jsonl", train[:8])
    build_bank(train[:4], tmp_path / "bank", "bm25")
    return tmp_path / "bank", tmp_path / "new.jsonl"


def paused_build(bank: Path, trajs: Path, stage: str) -> subprocess.Popen:
    """A real `exprag bank build` process, waiting at ``stage`` (holding the bank's lock) to be signalled."""
    flag = bank.parent / f"paused-{stage}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exprag", "bank", "build", "--trajectories", str(trajs), "--out", str(bank),
         "--encoder", "bm25"],
        env={**os.environ, "EXPRAG_TEST_PAUSE_AT": stage, "EXPRAG_TEST_PAUSE_FILE": str(flag)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(flag, proc)
    return proc


def killed_build(bank: Path, trajs: Path, stage: str) -> None:
    proc = paused_build(bank, trajs, stage)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def layout_is_clean(bank: Path) -> None:
    (version,) = [e for e in os.listdir(bank) if e != CURRENT]
    assert (bank / CURRENT).read_text().strip() == version and bank_files(bank) == bank / version


@pytest.mark.parametrize("stage, count", [("bank-staged", 4), ("bank-renamed", 4), ("bank-switched", 8)])
def test_kill_at_each_step_of_the_swap(inputs, stage, count):
    bank, new = inputs
    killed_build(bank, new, stage)
    assert len(load_bank(bank)) == count  # the old bank until the switch, the new one after it
    assert (bank / LOCK_FILE).is_file()  # the dead builder's; the next build takes it over
    res = exprag("bank", "build", "--trajectories", str(new), "--out", str(bank), "--encoder", "bm25")
    assert res.returncode == 0, res.stderr
    assert len(load_bank(bank)) == 8
    layout_is_clean(bank)  # staging and unused versions of the killed build are gone


def test_old_layout_banks_load_and_are_replaced_in_place(inputs, twx_trajs):
    """A bank written before versions (files directly in BANK_DIR) loads as it is; a rebuild killed
    mid-swap still leaves it loadable; a finished one switches it to versions, keeping foreign files."""
    bank, new = inputs
    files = bank_files(bank)
    for name in os.listdir(files):
        shutil.move(files / name, bank / name)
    files.rmdir()
    (bank / CURRENT).unlink()
    (bank / "README.txt").write_text("built for the March runs")
    assert len(load_bank(bank)) == 4 and load_bank(bank).index("static").size == 4
    killed_build(bank, new, "bank-renamed")
    assert len(load_bank(bank)) == 4
    # What older exprag left beside a bank when killed mid-swap: a moved-away bank and a staging dir
    # are removed; a moved-away plain file was the user's and stays.
    old_bank = bank.parent / f".{bank.name}.old-123"
    build_bank(twx_trajs[0][:2], old_bank, "bm25")
    (bank.parent / f".{bank.name}.build-x1y2").mkdir()
    (bank.parent / f".{bank.name}.old-456").write_text("a user's file")
    res = exprag("bank", "build", "--trajectories", str(new), "--out", str(bank), "--encoder", "bm25")
    assert res.returncode == 0, res.stderr
    assert len(load_bank(bank)) == 8 and (bank / "README.txt").read_text() == "built for the March runs"
    assert sorted(os.listdir(bank)) == sorted([CURRENT, "README.txt", bank_files(bank).name])
    assert not old_bank.exists() and not (bank.parent / f".{bank.name}.build-x1y2").exists()
    assert (bank.parent / f".{bank.name}.old-456").read_text() == "a user's file"


def test_build_refuses_what_is_not_a_bank(tmp_path, twx_trajs):
    write_jsonl(tmp_path / "t.jsonl", twx_trajs[0][:4])
    target = tmp_path / "results"
    target.mkdir()
    (target / "table.csv").write_text("a,b\n")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    for out in (target, tmp_path / "file"):
        refused(exprag("bank", "build", "--trajectories", str(tmp_path / "t.jsonl"), "--out", str(out),
                       "--encoder", "bm25"), out)
    assert snapshot(tmp_path) == before
    assert not is_bank_dir(target)


# ---- write-back beside another writer ---------------------------------------------------------------
def test_append_builds_on_the_version_published_meanwhile(inputs, twx_trajs):
    """A handle loaded before another process rebuilt the bank appends to the rebuilt version: the
    stale version is gone, and extending it would publish a bank without its trajectories."""
    bank_dir, new = inputs
    _, test = twx_trajs
    stale = load_bank(bank_dir)
    res = exprag("bank", "build", "--trajectories", str(new), "--out", str(bank_dir), "--encoder", "bm25")
    assert res.returncode == 0, res.stderr
    assert not stale.files.exists()
    grown = append_to_bank(stale, test[:1])
    assert len(grown) == 9 and len(load_bank(bank_dir)) == 9
    layout_is_clean(bank_dir)
    q = exprag("bank", "query", str(bank_dir), "--task", test[0].task, "-k", "2")
    assert q.returncode == 0, q.stderr
    info = exprag("bank", "info", str(bank_dir))
    assert info.returncode == 0 and '"count": 9' in info.stdout, info.stderr


def test_append_waits_for_a_writer_holding_the_lock(inputs, twx_trajs):
    """A build paused with the lock held (a real second process): the append waits for the lock,
    then extends what is published when it gets it."""
    bank_dir, new = inputs
    _, test = twx_trajs
    proc = paused_build(bank_dir, new, "bank-staged")
    stale = load_bank(bank_dir)
    with pytest.raises(RunLockedError, match=f"in use by exprag process {proc.pid}"):
        append_to_bank(stale, test[:1], wait=0.2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(append_to_bank, stale, test[:1], wait=60)
        time.sleep(0.5)
        assert not fut.done()  # waiting on the build's lock
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert len(fut.result(timeout=60)) == 5
    assert len(load_bank(bank_dir)) == 5
    layout_is_clean(bank_dir)


def test_append_skips_known_ids_or_names_the_clash(inputs, twx_trajs):
    bank_dir, _ = inputs
    train, test = twx_trajs
    bank = load_bank(bank_dir)
    with pytest.raises(DataFormatError, match=f"trajectory id {train[0].id!r} is already in"):
        append_to_bank(bank, [train[0]])
    grown = append_to_bank(bank, [train[0], test[0]], skip_known=True)
    assert [t.id for t in grown.trajectories] == [t.id for t in train[:4]] + [test[0].id]
    assert append_to_bank(grown, [test[0]], skip_known=True) is grown  # nothing new: no new version


def test_a_planted_lock_symlink_is_not_followed(inputs, twx_trajs, tmp_path):
    bank_dir, _ = inputs
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    (bank_dir / LOCK_FILE).unlink(missing_ok=True)
    (bank_dir / LOCK_FILE).symlink_to(victim)
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        append_to_bank(load_bank(bank_dir), twx_trajs[1][:1])
    assert victim.read_text() == "the user's file\n"
    assert len(load_bank(bank_dir)) == 4


def test_info_refuses_a_version_missing_its_files(inputs):
    bank_dir, _ = inputs
    assert exprag("bank", "info", str(bank_dir)).returncode == 0
    (bank_files(bank_dir) / "trajectories.jsonl").unlink()
    res = exprag("bank", "info", str(bank_dir))
    assert res.returncode == 2 and "trajectories.jsonl: missing; the bank is incomplete" in res.stderr, res.stderr


def test_sigterm_during_a_build_cleans_up(inputs):
    """SIGTERM (a scheduler's stop, `kill`) runs the same cleanup as Ctrl-C: no staging directory and
    no lock are left for the next build to find, and the old bank is as it was."""
    bank, new = inputs
    proc = paused_build(bank, new, "bank-staged")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err == "exprag: terminated\n", err
    assert not (bank / LOCK_FILE).exists()
    layout_is_clean(bank)
    assert len(load_bank(bank)) == 4
