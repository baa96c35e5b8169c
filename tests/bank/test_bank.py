import json
import os

import numpy as np
import pytest

from exprag.bank import Filters, Retriever, append_to_bank, build_bank, load_bank
from exprag.bank.encoders import DenseEncoder
from exprag.bank.topk import top_from_scores
from exprag.bank.quality import evaluate_retrieval
from exprag.bank.store import read_manifest
from exprag.errors import BankError, DataFormatError
from exprag.memory_block import approx_tokens, block_cost, memory_block, render_memory, token_counter


@pytest.fixture(scope="module", params=["minilm", "bm25"])
def bank(request, twx_trajs, tmp_path_factory):
    train, _ = twx_trajs
    return build_bank(train, tmp_path_factory.mktemp(request.param) / "bank", request.param)


def test_build_and_reload(bank, twx_trajs):
    train, _ = twx_trajs
    again = load_bank(bank.path)
    assert len(again) == len(train) and again.trajectories == train
    m = read_manifest(bank.path)
    assert m["count"] == len(train) and m["envs"] == ["twx"]
    assert m["encoder"]["name"] in ("minilm", "bm25")
    (version,) = [e for e in os.listdir(bank.path) if e != "CURRENT"]
    assert (bank.path / "CURRENT").read_text().strip() == version == bank.data_dir.name
    assert set(os.listdir(bank.path / version)) == {"manifest.json", "trajectories.jsonl", "static", "dynamic"}


def test_static_and_dynamic_retrieval(bank, twx_trajs):
    _, test = twx_trajs
    r = Retriever(load_bank(bank.path))
    for q in test:
        hits = r.retrieve(q.task, k=2, mode="static")
        assert len(hits) == 2 and hits[0].score >= hits[1].score
        assert hits[0].trajectory.task_type == q.task_type  # TWX task texts name the game's procedure
        dyn = r.retrieve(q.task, q.episode_messages()[:3], k=3, mode="dynamic")
        assert len(dyn) == 3


def test_dynamic_retrieval_skips_actions_the_env_rejected(bank, twx_trajs, tmp_path, monkeypatch):
    """A weak agent's non-actions ("Unknown action: ..." in TWX) are left out of the dynamic query,
    as they are of the dynamic keys of a written-back episode; the last carried-out actions stay."""
    from dataclasses import replace

    from exprag.bank.retriever import query_text
    from exprag.bank.store import dynamic_key
    from exprag.envs import env_spec

    _, test = twx_trajs
    q = test[0]
    msgs = q.episode_messages()
    reject = env_spec("twx").rejections[0] + " I'm not sure what you mean."
    noise = [{"role": "assistant", "content": "Task Description:"}, {"role": "user", "content": reject}] * 4
    history = msgs[:3] + noise
    assert query_text(q.task, history, "dynamic") == query_text(q.task, msgs[:3], "dynamic")
    assert "Task Description" not in query_text(q.task, noise, "dynamic")
    r = Retriever(bank)
    ids = lambda h: [x.trajectory.id for x in r.retrieve(q.task, h, k=3, mode="dynamic")]  # noqa: E731
    assert ids(history) == ids(msgs[:3])
    # an assistant message with no answer yet, or answered otherwise, is an action like any other
    assert "Action: open door" in query_text(q.task, [{"role": "assistant", "content": "open door"}], "dynamic")
    # keys: a written-back trajectory's rejected actions leave its key, and appending keeps the
    # stored keys of the trajectories already in the bank
    wrote = replace(q, id=q.id + ":agent", messages=list(q.messages[:2]) + noise)
    assert "Task Description" not in dynamic_key(wrote)
    import exprag.bank.store as store

    train, _ = twx_trajs
    small = build_bank(train[:4], tmp_path / "small", "bm25")
    built = list(small.index("dynamic").texts)
    monkeypatch.setattr(store, "dynamic_key", lambda t: f"Task: {t.task} (a changed key rule)")
    grown = append_to_bank(load_bank(small.path), [wrote])
    assert list(grown.index("dynamic").texts) == built + [f"Task: {wrote.task} (a changed key rule)"]


def test_filters_exclusions_budget(bank, twx_trajs):
    train, test = twx_trajs
    r = Retriever(bank)
    q = next(t for t in test if t.task_type == "coin")
    same = [t for t in train if t.task_type == "coin"]
    hits = r.retrieve(q.task, k=5, filters=Filters(exclude_task_ids={same[0].task_id},
                                                     exclude_ids={same[1].id}))
    ids = {h.trajectory.id for h in hits}
    assert same[0].id not in ids and same[1].id not in ids
    hits = r.retrieve(q.task, k=4, filters=Filters(task_types={"twc"}))
    assert hits and all(h.trajectory.task_type == "twc" for h in hits)
    assert r.retrieve(q.task, k=3, filters=Filters(success=False)) == []
    big = r.retrieve(q.task, k=3)
    budget = r.retrieve(q.task, k=3, token_budget=1, cost=block_cost())
    assert budget == [] and len(big) == 3
    assert r.retrieve(q.task, k=0) == []


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer (the tiny test model carries it)."""
    from transformers import AutoTokenizer

    from exprag.llm.models import tiny_random_model

    return AutoTokenizer.from_pretrained(tiny_random_model(tmp_path_factory.mktemp("tok") / "tiny"))


def test_token_budget_shortens_never_swaps(twx_trajs, tmp_path, smollm2_tokenizer):
    train, test = twx_trajs
    r = Retriever(build_bank(train, tmp_path / "bank", "bm25"))
    count = token_counter(smollm2_tokenizer)
    cut_seen = 0
    for q in test[::4]:  # one query of every other game: seconds
        whole = r.retrieve(q.task, k=3)
        full = count(memory_block(whole))
        floor = count(render_memory([h.trajectory for h in whole], steps=[0] * 3))  # first observations only
        for budget in sorted({full, floor, (full + floor) // 2, floor + (full - floor) // 4}):
            hits = r.retrieve(q.task, k=3, token_budget=budget, cost=block_cost("json", count))
            # The same trajectories in the same order as without a budget: shortened, never swapped.
            assert [(h.trajectory.id, h.score) for h in hits] == [(h.trajectory.id, h.score) for h in whole]
            block = memory_block(hits)
            assert count(block) <= budget  # exact: SmolLM2's tokenizer, not an estimate
            for i, h in enumerate(hits):
                t, n = h.trajectory, len(h.trajectory.actions())
                if h.steps is None:
                    continue
                cut_seen += 1
                assert 0 <= h.steps < n
                shown = render_memory([x.trajectory for x in hits], steps=[x.steps for x in hits])
                assert shown == block
                assert f"... ({n - h.steps} more step{'s' if n - h.steps != 1 else ''} omitted)" in block
                assert f"Task: {t.task}\n" in block
                # the kept steps are the first ones, and the budget is used: one more step would not fit
                longer = [x.steps if j != i else h.steps + 1 for j, x in enumerate(hits)]
                longer = [None if s is not None and s >= len(x.trajectory.actions()) else s
                          for s, x in zip(longer, hits)]
                assert count(render_memory([x.trajectory for x in hits], steps=longer)) > budget
            assert all(h.steps is None for h in hits) == (budget >= full)
        # Below the first observations' size the lowest-ranked trajectories go: a prefix, never another.
        short = r.retrieve(q.task, k=3, token_budget=floor - 1, cost=block_cost("json", count))
        assert [h.trajectory.id for h in short] == [h.trajectory.id for h in whole][: len(short)]
        assert len(short) < 3 and count(memory_block(short)) <= floor - 1
    assert cut_seen
    # The chars/4 estimate undercounts SmolLM2's tokens of a memory block: a tokenizer is needed.
    block = memory_block(r.retrieve(test[0].task, k=3))
    assert approx_tokens(block) < count(block)


def test_memory_block(twx_trajs):
    train, _ = twx_trajs
    fail = train[1].__class__(**{**train[1].to_dict(), "id": "f", "success": False})
    block = render_memory([train[0], fail], "json")
    assert block.index("## Successful") < block.index("## Unsuccessful")
    body = block.split("### Trajectory 1\n")[1].split("\n", 1)[1].split("\n\n")[0]
    assert json.loads(body)[1] == {"role": "assistant", "content": train[0].actions()[0]}
    text = render_memory([train[0]], "text")
    assert f"Action: {train[0].actions()[0]}" in text and "Unsuccessful" not in text
    assert render_memory([]) == ""


def test_bad_banks(tmp_path, twx_trajs, bank):
    with pytest.raises(BankError, match="no bank directory"):
        load_bank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="manifest.json: missing"):
        load_bank(tmp_path / "empty")
    other = "bm25" if bank.manifest["encoder"]["name"] == "minilm" else "minilm"
    with pytest.raises(BankError, match=f"'{other}' was asked for"):
        load_bank(bank.path, encoder=other)
    newer = tmp_path / "newer"
    newer.mkdir()
    m = dict(bank.manifest, bank_version=99)
    (newer / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="'bank_version' is 99, newer"):
        load_bank(newer)
    with pytest.raises(DataFormatError, match="appears 2 times"):
        build_bank([twx_trajs[0][0]] * 2, tmp_path / "dup", "bm25")
    assert not (tmp_path / "dup").exists()


def test_interrupted_build_keeps_previous_bank(tmp_path, twx_trajs, monkeypatch):
    train, test = twx_trajs
    path = tmp_path / "bank"
    build_bank(train[:5], path, "bm25")

    import exprag.bank.store as store

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        build_bank(train, path, "bm25")
    assert len(load_bank(path)) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]  # no staging left behind


def test_append_write_back(tmp_path, twx_trajs):
    train, test = twx_trajs
    for enc in ("bm25", "minilm"):
        b = build_bank(train[:6], tmp_path / enc, enc)
        b2 = append_to_bank(b, test[:2])
        assert len(load_bank(tmp_path / enc)) == 8
        hits = Retriever(b2).retrieve(test[0].task, k=1, mode="dynamic")
        assert hits[0].trajectory.task_type == test[0].task_type
        with pytest.raises(DataFormatError, match="already in"):
            append_to_bank(b2, test[:1])


def test_exact_top_and_faiss_agree():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[:20] + 0.01
    s, ids = top_from_scores(q @ emb.T, 5)
    assert (ids[:, 0] == np.arange(20)).all() and (np.diff(s, axis=1) <= 0).all()
    from exprag.bank.encoders import build_faiss

    _, fids = build_faiss(emb).search(q.astype(np.float32), 5)
    assert (fids[:, 0] == np.arange(20)).all()


def test_retrieval_quality_report(bank, twx_trajs):
    _, test = twx_trajs
    rep = evaluate_retrieval(bank, test, k=2)
    d = rep.as_dict()
    assert d["overall"]["n"] == len(test) and d["overall"]["top1"] == 1.0
    assert set(d["per_type"]) == {t.task_type for t in test}
    assert "| all |" in rep.markdown()


def test_dense_encoder_is_normalised():
    enc = DenseEncoder("minilm")
    e = enc.encode(["heat some egg", "cool some egg"])
    assert e.shape == (2, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
