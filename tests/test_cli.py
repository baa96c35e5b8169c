"""The CLI on real data: commands chain, bad input gets one clear line, exit 2, nothing written."""

import json
import subprocess
import sys

import pytest

from exprag.cli import main
from exprag.trajectory import read_jsonl, write_jsonl


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "exprag", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("collect", "bank", "export", "quickstart"):
        assert cmd in out.stdout
    # Heavy libraries stay unimported for --help.
    probe = subprocess.run([sys.executable, "-c", "import sys; from exprag.cli import build_parser; "
                            "build_parser(); print(sorted(m for m in ('torch','transformers','sentence_transformers','scienceworld') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_collect_build_query_chain(tmp_path, capsys):
    data = tmp_path / "twx-easy.jsonl"
    rc, out, _ = run(capsys, "collect", "--env", "twx", "--split", "train", "--task-types", "easy",
                     "--per-type", "2", "--out", str(data))
    assert rc == 0 and "wrote 8 trajectories" in out
    assert (tmp_path / "twx-easy.jsonl.manifest.json").is_file()
    assert {t.task_type for t in read_jsonl(data)} == {"twc", "arithmetic", "sorting", "simonsays"}
    bank = tmp_path / "bank"
    rc, out, _ = run(capsys, "bank", "build", "--trajectories", str(data), "--out", str(bank),
                     "--encoder", "bm25")
    assert rc == 0 and "8 trajectories" in out
    rc, out, _ = run(capsys, "bank", "query", str(bank), "--task", "Your task is to do exactly what Simon says.",
                     "-k", "2", "--json")
    hits = json.loads(out)
    assert rc == 0 and [h["task_type"] for h in hits] == ["simonsays", "simonsays"]
    hist = tmp_path / "hist.json"
    hist.write_text(json.dumps(read_jsonl(data)[0].messages[:3]))
    rc, out, _ = run(capsys, "bank", "query", str(bank), "--task", "sort objects", "--mode", "dynamic",
                     "--history", str(hist), "--memory")
    assert rc == 0 and "# Memory" in out
    rc, out, _ = run(capsys, "bank", "eval-retrieval", str(bank), "--queries", str(data),
                     "--out", str(tmp_path / "q"))
    assert rc == 0 and (tmp_path / "q.json").is_file()


@pytest.mark.parametrize("argv, expect", [
    (["collect", "--env", "minigrid", "--out", "X"], "unknown env 'minigrid'"),
    (["collect", "--env", "twx", "--task-types", "cooking", "--out", "X"], "unknown task type 'cooking'"),
    (["bank", "query", "NOPE", "--task", "x"], "nope: no bank directory"),
])
def test_bad_input_exit_2(tmp_path, capsys, argv, expect):
    argv = [a.replace("X", str(tmp_path / "x.jsonl")).replace("NOPE", str(tmp_path / "nope")) for a in argv]
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and expect in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_malformed_jsonl_writes_nothing(tmp_path, capsys, twx_trajs):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, twx_trajs[0][:2])
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, twx_trajs[0][2:4])
    lines = bad.read_text().splitlines()
    obj = json.loads(lines[1])
    obj["success"] = "yes"
    bad.write_text(lines[0] + "\n" + json.dumps(obj) + "\n")
    bank = tmp_path / "bank"
    rc, _, err = run(capsys, "bank", "build", "--trajectories", str(good), str(bad), "--out", str(bank))
    assert rc == 2 and f"{bad}:2: field 'success' must be a boolean" in err
    assert not bank.exists()
    run(capsys, "bank", "build", "--trajectories", str(good), "--out", str(bank), "--encoder", "bm25")
    rc, _, err = run(capsys, "bank", "query", str(bank), "--task", "x", "--encoder", "minilm")
    assert rc == 2 and "built with" not in err and "'bm25' but 'minilm' was asked for" in err
    rc, _, err = run(capsys, "export", "--trajectories", str(bad), "--format", "sharegpt",
                     "--out", str(tmp_path / "sg.jsonl"))
    assert rc == 2 and not (tmp_path / "sg.jsonl").exists()


def test_query_prints_stored_escape_sequences_as_text(tmp_path, capsys, twx_trajs):
    """A trajectory may carry terminal escapes (a hostile or garbled file): shown, never executed."""
    t = twx_trajs[0][0]
    hostile = t.__class__(**{**t.to_dict(), "task": t.task + " \x1b]0;owned\x07\x1b[2J",
                             "messages": [*t.messages[:-1], {**t.messages[-1], "content": "look\x1b[31m"}]})
    write_jsonl(tmp_path / "t.jsonl", [hostile])
    run(capsys, "bank", "build", "--trajectories", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "b"),
        "--encoder", "bm25")
    code, out, _ = run(capsys, "bank", "query", str(tmp_path / "b"), "--task", t.task, "-k", "1", "--memory")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out  # the listing; the JSON memory block escapes its own
    code, out, _ = run(capsys, "bank", "query", str(tmp_path / "b"), "--task", t.task, "-k", "1", "--memory",
                       "--format", "text")
    assert code == 0 and "\x1b" not in out and "look\\x1b[31m" in out
