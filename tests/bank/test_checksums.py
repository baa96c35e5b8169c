"""Bank files are checked against the size + SHA-256 their manifest recorded at write time: garbled
bytes that numpy and JSON read without complaint (a top hit of the wrong type at score 1e31) are a
one-line error naming the file; banks written before the records load as they did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exprag import checksums
from exprag.bank import append_to_bank, build_bank, load_bank
from exprag.bank.store import bank_files, check_bank_files
from exprag.errors import BankError
from exprag.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[2]
MESSAGE = "does not match the checksum the bank recorded when it was written (size or content changed)"


def traj(i: int) -> Trajectory:
    task_type = ["coin", "sorting", "simonsays"][i % 3]
    return Trajectory(
        id=f"twx-train-{task_type}-{i}", env="twx", env_version="textworld-express==1.0", split="train",
        task_type=task_type, task_id=f"{task_type}-{i}", task=f"Your task is to play {task_type} number {i}.",
        messages=[{"role": "user", "content": f"Your task is to play {task_type}. You are in a room."},
                  {"role": "assistant", "content": f"take {task_type} {i}"},
                  {"role": "user", "content": "You see a door."}],
        success=True, reward=1.0, num_steps=1, source="expert")


def garble(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the file's data (past a .npy header): the file keeps its
    size and still parses."""
    data = bytearray(path.read_bytes())
    at = max(128, len(data) // 2 - n // 2) if path.suffix == ".npy" else len(data) // 2 - n // 2
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file with its size and mtime (directories' mtimes move with a writer's lock and staging)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def cli(*argv: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "exprag", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_refused(res: subprocess.CompletedProcess, path: Path) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    assert res.stderr == f"exprag: error: {path}: {MESSAGE}; the bank is corrupt: restore it, or rebuild it from its " \
                         "sources\n", res.stderr


@pytest.fixture(scope="module")
def trajs() -> list[Trajectory]:
    return [traj(i) for i in range(9)]


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("history") / "history.json"
    p.write_text(json.dumps(traj(1).episode_messages()[:3]))
    return p


def test_garbled_dense_embeddings_are_refused(tmp_path, trajs, history):
    bank = tmp_path / "bank"
    build_bank(trajs, bank, "minilm", retrieval="dense")
    emb = bank_files(bank) / "dynamic" / "embeddings.npy"
    garble(emb)
    before = snapshot(tmp_path)
    assert_refused(cli("bank", "query", bank, "--task", "play coin", "--mode", "dynamic", "--history", history),
                   emb)
    assert_refused(cli("bank", "info", bank), emb)  # info never vouches for a bank a query fails on
    assert snapshot(tmp_path) == before


def test_garbled_postings_are_refused(tmp_path, trajs):
    bank = tmp_path / "bank"
    build_bank(trajs, bank, "bm25")  # procedure scoring, lexical: postings_*.npy, weights.json, keys.json
    postings = bank_files(bank) / "static" / "postings_vals.npy"
    garble(postings)
    before = snapshot(tmp_path)
    assert_refused(cli("bank", "query", bank, "--task", "play coin"), postings)
    assert snapshot(tmp_path) == before
    with pytest.raises(BankError, match=MESSAGE.replace("(", r"\(").replace(")", r"\)")):
        load_bank(bank).index("static")


def test_garbled_written_back_segment_is_refused(tmp_path, trajs):
    bank = tmp_path / "bank"
    build_bank(trajs[:6], bank, "bm25")
    append_to_bank(load_bank(bank), trajs[6:])
    files = bank_files(bank)
    manifest = json.loads((files / "manifest.json").read_text())
    # the linked first segment keeps its records; the new segment's files are recorded too
    assert {"static/keys.json", "seg-000001/static/keys.json",
            "seg-000001/trajectories.jsonl"} <= set(manifest["files"])
    load_bank(bank).index("static")  # intact: loads
    seg = files / "seg-000001" / "static" / "postings_vals.npy"
    garble(seg)
    before = snapshot(tmp_path)
    assert_refused(cli("bank", "query", bank, "--task", "play coin"), seg)
    assert snapshot(tmp_path) == before
    with pytest.raises(BankError, match="seg-000001/static/postings_vals.npy: does not match the checksum"):
        append_to_bank(load_bank(bank), [traj(20)])  # a write-back does not extend a corrupt bank
    assert snapshot(tmp_path) == before


def test_verify_hashes_what_the_cheap_check_samples(tmp_path, trajs, monkeypatch):
    """A load hashes large files in sampled blocks only; ``bank info --verify`` hashes every byte."""
    monkeypatch.setattr(checksums, "FULL_HASH_LIMIT", 256)  # every index file here counts as large
    monkeypatch.setattr(checksums, "SAMPLE_BLOCK", 16)
    bank = tmp_path / "bank"
    build_bank(trajs, bank, "minilm", retrieval="dense")
    emb = bank_files(bank) / "static" / "embeddings.npy"
    record = json.loads((bank_files(bank) / "manifest.json").read_text())["files"]["static/embeddings.npy"]
    assert "sampled" in record and record["size"] == emb.stat().st_size
    data = bytearray(emb.read_bytes())
    size = len(data)
    sampled = {o + j for i in range(checksums.SAMPLE_BLOCKS)
               for o in [(size - 16) * i // (checksums.SAMPLE_BLOCKS - 1)] for j in range(16)}
    at = next(i for i in range(size // 3, size) if i not in sampled)
    data[at] ^= 0x01
    emb.write_bytes(bytes(data))
    load_bank(bank).index("static")  # the byte lies between the sampled blocks
    check_bank_files(bank)
    with pytest.raises(BankError, match=f"{emb}: does not match the checksum"):
        check_bank_files(bank, verify=True)
    res = cli("bank", "info", bank, "--verify")  # real limits: the small file is hashed in full
    assert_refused(res, emb)


def test_intact_bank_verifies(tmp_path, trajs):
    bank = tmp_path / "bank"
    build_bank(trajs, bank, "bm25")
    res = cli("bank", "info", bank, "--verify")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["checksums"] == {"files": 11, "verified": "every byte"} and "files" not in info


def test_banks_written_before_the_records_load_unchecked(tmp_path, trajs):
    bank = tmp_path / "bank"
    build_bank(trajs, bank, "bm25")
    mf = bank_files(bank) / "manifest.json"
    manifest = json.loads(mf.read_text())
    del manifest["files"]
    mf.write_text(json.dumps(manifest))
    garble(bank_files(bank) / "static" / "postings_vals.npy")
    old = load_bank(bank)
    old.index("static")  # no records: no check, as before
    assert check_bank_files(bank, verify=True)["count"] == len(trajs)
    # an append to such a bank records what it writes, and leaves the old segment unrecorded
    grown = append_to_bank(old, [traj(20)])
    recorded = json.loads((bank_files(bank) / "manifest.json").read_text())["files"]
    assert recorded and all(k.startswith("seg-000001/") for k in recorded)
    assert len(load_bank(bank)) == len(grown) == len(trajs) + 1
    keys = bank_files(bank) / "dynamic" / "keys.json"  # in the unrecorded segment
    keys.write_bytes(keys.read_bytes()[:20])  # cut short: the reader's own error, as before the records
    with pytest.raises(BankError, match="dynamic: invalid JSON"):
        load_bank(bank).index("dynamic")


def test_committed_banks_still_load():
    banks = sorted(p.parent.parent if p.parent.name.startswith("v-") else p.parent
                   for p in (REPO / "results" / "replication-cpu" / "banks").rglob("manifest.json"))
    if not banks:
        pytest.skip("no committed banks in this checkout")
    for b in banks:
        bank = load_bank(b)
        assert "files" not in bank.manifest and len(bank) == bank.manifest["count"]
        check_bank_files(b, verify=True)
