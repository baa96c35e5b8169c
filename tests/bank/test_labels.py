"""Banks whose task-type labels do not tell procedures apart: detected at build, label-free fallback."""

import json
import subprocess
import sys
from dataclasses import replace

from exprag.bank import Retriever, append_to_bank, build_bank, load_bank
from exprag.bank.labels import check_labels
from exprag.trajectory import write_jsonl


def _relabel(trajs, labels):
    return [replace(t, task_type=lab) for t, lab in zip(trajs, labels)]


def _unrelated(trajs):
    """Labels a user's own data might carry, unrelated to the procedure: which of three runs (or
    days) a trajectory came from. Every game's tasks are spread over the three evenly."""
    return [f"run-{i % 3}" for i in range(len(trajs))]


def _bank_cli(*args):
    return subprocess.run([sys.executable, "-m", "exprag", "bank", *args], capture_output=True, text=True)


def test_check_labels_tells_real_from_useless(twx_trajs):
    train, _ = twx_trajs
    texts, labels = [t.task for t in train], [t.task_type for t in train]
    real = check_labels(texts, labels)
    assert real.useful and real.distinct_types == 8 and real.z > 3
    noise = check_labels(texts, _unrelated(train))
    assert not noise.useful and noise.z < 3 and "do not follow" in noise.reason
    one = check_labels(texts, ["all"] * len(texts))
    assert not one.useful and one.distinct_types == 1 and "one task type" in one.reason
    # a label per trajectory groups nothing
    assert not check_labels(texts, [t.id for t in train]).useful


def test_single_label_bank_falls_back_and_info_says_so(tmp_path, twx_trajs):
    train, test = twx_trajs
    data = tmp_path / "one-label.jsonl"
    write_jsonl(data, _relabel(train, ["my-task"] * len(train)))
    b = _bank_cli("build", "--trajectories", str(data), "--out", str(tmp_path / "bank"), "--encoder", "bm25")
    assert b.returncode == 0, b.stderr
    assert "labels not used: one task type" in b.stdout and "uniform" in b.stdout
    info = _bank_cli("info", str(tmp_path / "bank"))
    assert info.returncode == 0, info.stderr
    m = json.loads(info.stdout)
    assert m["labels"]["useful"] is False and m["labels"]["fallback"] == "uniform"
    assert "labels not used" in m["retrieval"]["labels_fallback"]
    bank = load_bank(tmp_path / "bank")
    assert bank.index("static").weights.source == "uniform"
    # label-free weights still find the game: TWX task texts name it (true types kept in the ids)
    true_type = {t.id: t.task_type for t in train}
    for q in test:
        hits = Retriever(bank).retrieve(q.task, k=1)
        assert true_type[hits[0].trajectory.id] == q.task_type


def test_unrelated_label_bank_falls_back(tmp_path, twx_trajs):
    train, test = twx_trajs
    bank = build_bank(_relabel(train, _unrelated(train)), tmp_path / "bank", "bm25")
    assert bank.manifest["labels"]["useful"] is False and "do not follow" in bank.manifest["labels"]["reason"]
    assert bank.index("dynamic").weights.source == "uniform"
    true_type = {t.id: t.task_type for t in train}
    assert all(true_type[Retriever(bank).retrieve(q.task, k=1)[0].trajectory.id] == q.task_type for q in test)
    # the real labels are used, and say so; appending re-checks over the whole bank
    real = build_bank(train[:12], tmp_path / "real", "bm25")
    assert real.manifest["labels"]["useful"] is True and "fallback" not in real.manifest["labels"]
    assert real.index("static").weights.source == "task-type"
    grown = append_to_bank(real, test)
    assert grown.manifest["labels"]["useful"] is True and grown.manifest["labels"]["distinct_types"] == 8
    info = _bank_cli("info", str(tmp_path / "real"))
    assert "labels_fallback" not in json.loads(info.stdout)["retrieval"]


def test_plain_scorings_record_no_label_check(tmp_path, twx_trajs):
    train, _ = twx_trajs
    bank = build_bank(train, tmp_path / "bank", "bm25", retrieval="bm25")
    assert "labels" not in bank.manifest
