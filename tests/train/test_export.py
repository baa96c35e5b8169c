"""`exprag export --bank`: the records are the chats the trainer tokenizes, memory included, and no
example's memory holds its own task."""

from __future__ import annotations

import json

import pytest

from exprag.cli import main
from exprag.envs import leakage_group
from exprag.train.config import load_train_config
from exprag.train.data import render
from exprag.train.export import training_chats
from exprag.train.prepare import prepare_data
from exprag.trajectory import read_jsonl


def _cfg(short_files, **overrides):
    return load_train_config(None, {"trajectories": [short_files["trajectories"]],
                                    "retrieval.bank": short_files["bank"], **overrides})


def _ids(tok, messages) -> list[int]:
    return list(tok(render(tok, list(messages)), add_special_tokens=False)["input_ids"])


def _export(tmp_path, capsys, fmt, *extra) -> list[dict]:
    out = tmp_path / f"{fmt}.jsonl"
    assert main(["export", "--format", fmt, "--out", str(out), *extra]) == 0
    assert "training examples" in capsys.readouterr().out
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_exported_chats_are_what_the_trainer_tokenizes(short_files, chatml_tok, tmp_path, capsys):
    recs = _export(tmp_path, capsys, "openai", "--trajectories", short_files["trajectories"],
                   "--bank", short_files["bank"], "-k", "2")
    train_ex, _, _ = prepare_data(_cfg(short_files, **{"retrieval.k": 2}), chatml_tok)
    assert len(recs) == len(train_ex) > 0
    for rec, ex in zip(recs, train_ex):
        msgs = rec["messages"]
        assert msgs[0]["role"] == "system" and "memory" in msgs[0]["content"].lower()
        assert _ids(chatml_tok, msgs) == ex.input_ids, ex.id  # system prompt and memory block included
    sg = _export(tmp_path, capsys, "sharegpt", "--trajectories", short_files["trajectories"],
                 "--bank", short_files["bank"])
    for rec, orec in zip(sg, recs):
        turns = rec["conversations"]
        assert [t["from"] for t in turns][:3] == ["system", "human", "gpt"]
        assert [t["value"] for t in turns] == [m["content"] for m in orec["messages"]]
        assert {t["from"] for t in turns[1:]} == {"human", "gpt"}


def test_no_memory_of_the_examples_own_task(short_files):
    """The bank holds the training trajectories themselves: unfiltered, each example's top memory
    would be its own episode."""
    by_id = {t.id: t for t in read_jsonl(short_files["trajectories"])}
    chats, counts = training_chats(_cfg(short_files, **{"retrieval.k": 3}))
    assert counts.examples == len(by_id) and not counts.checked_length
    for c in chats:
        t = by_id[c.trajectory_id]
        assert len(c.memory_ids) == 3
        mems = [by_id[m] for m in c.memory_ids]
        assert t.id not in c.memory_ids
        assert all(m.task_id != t.task_id for m in mems)
        assert all(leakage_group(m.env, m.task_id) != leakage_group(t.env, t.task_id) for m in mems)


def test_length_rules_follow_the_trainer(short_files, chatml_tok):
    """With the model's tokenizer, over-long examples lose memory, trailing turns or themselves
    exactly as in training."""
    cfg = _cfg(short_files, **{"retrieval.k": 2})
    full, _, _ = prepare_data(cfg, chatml_tok)
    lengths = sorted(len(e) for e in full)
    for overlong in ("trim", "drop"):
        tight = _cfg(short_files, **{"retrieval.k": 2, "max_length": lengths[len(lengths) // 2] - 1,
                                     "overlong": overlong})
        train_ex, _, report = prepare_data(tight, chatml_tok)
        chats, counts = training_chats(tight, chatml_tok)
        assert counts.checked_length and counts.dropped_overlong == len(report["dropped_overlong"])
        assert [c.trajectory_id for c in chats] == [e.trajectory_id for e in train_ex]
        for c, ex in zip(chats, train_ex):
            assert c.memory_ids == ex.memory_ids
            assert _ids(chatml_tok, c.messages) == ex.input_ids, ex.id
        if overlong == "trim":
            assert report["trimmed_memory"] or report["truncated"]


def test_token_budget_needs_the_model(short_files, tmp_path, capsys):
    rc = main(["export", "--format", "openai", "--out", str(tmp_path / "o.jsonl"), "--trajectories",
               short_files["trajectories"], "--bank", short_files["bank"], "--token-budget", "100"])
    assert rc == 2 and "--model" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("fmt", ["openai", "sharegpt"])
def test_plain_export_unchanged_without_bank(short_files, tmp_path, capsys, fmt):
    """Without --bank / --config, export converts trajectories as before (all turns, no memory)."""
    out = tmp_path / "plain.jsonl"
    assert main(["export", "--trajectories", short_files["trajectories"], "--format", fmt, "--out", str(out)]) == 0
    assert "records" in capsys.readouterr().out
    first = json.loads(out.read_text().splitlines()[0])
    assert ("messages" if fmt == "openai" else "conversations") in first
