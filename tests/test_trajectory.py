import json

import pytest

from exprag.errors import DataFormatError
from exprag.trajectory import (SCHEMA_VERSION, Trajectory, export_jsonl, read_jsonl, to_openai,
                               to_sharegpt, write_jsonl)


def make(i: int = 0, **kw) -> Trajectory:
    base = dict(id=f"t{i}", env="twx", env_version="x", split="train", task_type="coin",
                task_id=f"coin/seed{i}", task="find the coin",
                messages=[{"role": "user", "content": "You are in the kitchen."},
                          {"role": "assistant", "content": "move north"},
                          {"role": "user", "content": "You took the coin."}],
                success=True, reward=1.0, num_steps=1, source="expert", meta={"a": 1})
    base.update(kw)
    return Trajectory(**base)


def test_roundtrip(tmp_path):
    p = tmp_path / "t.jsonl"
    trajs = [make(0), make(1, success=False)]
    assert write_jsonl(p, trajs) == 2
    back = read_jsonl(p)
    assert back == trajs
    assert back[0].schema_version == SCHEMA_VERSION
    assert back[0].actions() == ["move north"]
    assert back[0].observations() == ["You are in the kitchen.", "You took the coin."]
    assert "Action: move north" in back[0].text()


def _write_lines(p, lines):
    p.write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.pop("task"), "line 2: missing field 'task'"),
    (lambda d: d.update(success="yes"), "field 'success' must be a boolean"),
    (lambda d: d.update(num_steps=True), "field 'num_steps' must be an integer, got bool"),
    (lambda d: d.update(messages=[{"role": "robot", "content": "x"}]), "field 'messages[0].role'"),
    (lambda d: d.update(messages=[{"role": "user", "content": 3}]), "field 'messages[0].content'"),
    (lambda d: d.update(schema_version=99), "field 'schema_version' is 99, newer"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
])
def test_validation_names_file_line_field(tmp_path, mutate, expect):
    good = make(0).to_dict()
    bad = make(1).to_dict()
    mutate(bad)
    p = tmp_path / "bad.jsonl"
    _write_lines(p, [json.dumps(good) + "\n", json.dumps(bad) + "\n"])
    with pytest.raises(DataFormatError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert f"{p}:2" in msg.replace("line 2", f"{p}:2") and expect.replace("line 2: ", "") in msg


def test_bad_json_and_duplicates(tmp_path):
    p = tmp_path / "bad.jsonl"
    _write_lines(p, [json.dumps(make(0).to_dict()) + "\n", "{not json\n"])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl(p)
    q = tmp_path / "dup.jsonl"
    write_jsonl(q, [make(0), make(0)])
    with pytest.raises(DataFormatError, match="duplicates"):
        read_jsonl(q)
    with pytest.raises(DataFormatError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_converters(tmp_path):
    t = make(0, messages=[{"role": "system", "content": "SYS"}] + make(0).messages)
    sg = to_sharegpt(t)
    assert sg["system"] == "SYS"
    assert [c["from"] for c in sg["conversations"]] == ["human", "gpt", "human"]
    oa = to_openai(t, system="OTHER")
    assert oa["messages"][0] == {"role": "system", "content": "OTHER"}
    assert [m["role"] for m in oa["messages"]] == ["system", "user", "assistant", "user"]
    out = tmp_path / "o.jsonl"
    assert export_jsonl(out, [t], "openai", system=lambda tr: f"S-{tr.env}") == 1
    assert json.loads(out.read_text())["messages"][0]["content"] == "S-twx"
    with pytest.raises(ValueError):
        export_jsonl(out, [t], "alpaca")
