"""Banks of any size: chunked scoring equals scoring the whole bank at once."""

import json

import numpy as np
import pytest

from exprag.bank.encoders import SegmentRows, join_rows
from exprag.bank import build_bank, load_bank
from exprag.bank import topk
from exprag.bank.scoring import ScoringConfig
from exprag.bank.topk import chunked_top, top_from_scores


def test_chunked_top_equals_a_stable_sort_of_the_row():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(7, 50)).astype(np.float32)  # many ties
    for k in (1, 3, 10, 50, 80):
        want = np.argsort(-s, axis=1, kind="stable")[:, :min(k, 50)]
        for chunk in (1, 3, 7, 50):
            sc, ids = chunked_top(lambda a, b: s[:, a:b], 7, 50, k, chunk=chunk)
            assert (ids == want).all()
            assert (sc == np.take_along_axis(s, want, axis=1)).all()
        assert (top_from_scores(s, k)[1] == want).all()


@pytest.mark.parametrize("encoder,scoring", [("minilm", "procedure"), ("bm25", "procedure"),
                                             ("minilm", "dense"), ("bm25", "bm25")])
def test_chunked_scoring_matches_whole_bank(twx_trajs, tmp_path, monkeypatch, encoder, scoring):
    train, test = twx_trajs
    bank = build_bank(train, tmp_path / "b", encoder, retrieval=ScoringConfig(scoring))
    queries = [t.task for t in test] + ["warm up an apple and put it on the table", "zzz"]
    for mode in ("static", "dynamic"):
        index = bank.index(mode)
        for k in (1, 2, 5):
            whole = index.top(queries, k)
            with monkeypatch.context() as m:  # chunks of 3 keys
                m.setattr(topk, "MAX_BLOCK", 1)
                m.setattr(topk, "MIN_CHUNK", 3)
                chunked = index.top(queries, k)
            np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5, atol=1e-6)
            # the same keys in the same order; only keys of equal score (a repeated task text, whose
            # dense dot product the BLAS kernel may round differently in another chunk) may swap
            differ = chunked[1] != whole[1]
            assert np.allclose(chunked[0][differ], whole[0][differ], rtol=0, atol=1e-6)
            # and the same keys as a full sort of the scores the retriever's fallback uses
            if scoring != "procedure":
                full = index.scores(queries)
                assert (whole[1] == np.argsort(-full, axis=1, kind="stable")[:, :k]).all()


@pytest.mark.parametrize("encoder,scoring", [("minilm", "procedure"), ("bm25", "bm25")])
def test_load_reads_the_saved_index_without_rebuilding(twx_trajs, tmp_path, monkeypatch, encoder, scoring):
    import exprag.bank.encoders as encoders
    import exprag.bank.procedure as procedure

    train, test = twx_trajs
    built = build_bank(train, tmp_path / "b", encoder, retrieval=ScoringConfig(scoring))
    queries = [t.task for t in test]
    want = {mode: built.index(mode).top(queries, 3) for mode in ("static", "dynamic")}

    def no_build(*a, **kw):
        raise AssertionError("the load rebuilt the index")

    with monkeypatch.context() as m:
        m.setattr(procedure, "postings_from_terms", no_build)
        m.setattr(encoders, "build_bm25", no_build)
        m.setattr(procedure.TermWeights, "vectors", no_build)  # the keys' term vectors
        bank = load_bank(tmp_path / "b")
        indexes = {mode: bank.index(mode) for mode in ("static", "dynamic")}
    for mode, index in indexes.items():
        if scoring == "procedure":
            assert isinstance(index.dense.emb, np.memmap) and isinstance(index._postings[1], np.memmap)
        got = index.top(queries, 3)
        assert (got[1] == want[mode][1]).all()
        np.testing.assert_allclose(got[0], want[mode][0], rtol=1e-5, atol=1e-6)

    # a bank written before the saved indexes (and so before the checksums of its files): rebuilt in
    # memory, same results
    for mode in ("static", "dynamic"):
        for name in [*procedure.POSTINGS, encoders.BM25_VOCAB]:
            (bank.files / mode / name).unlink(missing_ok=True)
    manifest = json.loads((bank.files / "manifest.json").read_text())
    del manifest["files"]
    (bank.files / "manifest.json").write_text(json.dumps(manifest))
    old = load_bank(tmp_path / "b")
    for mode in ("static", "dynamic"):
        got = old.index(mode).top(queries, 3)
        assert (got[1] == want[mode][1]).all()


def test_large_dense_bank_saves_its_faiss_graph(tmp_path, monkeypatch):
    import exprag.bank.encoders as encoders

    monkeypatch.setattr(encoders, "FAISS_MIN_SIZE", 100)
    enc = encoders.DenseEncoder("minilm")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    enc.from_embeddings(emb).save(tmp_path)
    assert (tmp_path / encoders.FAISS_FILE).is_file()
    monkeypatch.setattr(encoders, "build_faiss", lambda *a: pytest.fail("the load rebuilt the graph"))
    index = enc.load([tmp_path])
    assert index.faiss().ntotal == 300
    _, ids = index.faiss().search(emb[:5], 1)
    assert (ids[:, 0] == np.arange(5)).all()
    # write-back: the graph is copied and extended, not rebuilt; the old index keeps its own
    more = rng.normal(size=(40, 16)).astype(np.float32)
    more /= np.linalg.norm(more, axis=1, keepdims=True)
    grown = index.extended(more)
    assert grown.size == 340 and grown.faiss().ntotal == 340 and index.faiss().ntotal == 300
    _, ids = grown.faiss().search(more[:5], 1)
    assert (ids[:, 0] == np.arange(300, 305)).all()
    grown.save(tmp_path / "seg", start=300)  # the new segment: its own rows, and the whole graph
    np.testing.assert_array_equal(np.load(tmp_path / "seg" / encoders.EMBEDDINGS), more)
    loaded = enc.load([tmp_path, tmp_path / "seg"])  # build_faiss still fails the test if called
    assert loaded.faiss().ntotal == 340 and isinstance(loaded.emb, encoders.SegmentRows)


@pytest.mark.parametrize("encoder,scoring", [("minilm", "procedure"), ("bm25", "bm25"), ("minilm", "dense")])
def test_write_back_appends_a_segment(twx_trajs, tmp_path, encoder, scoring):
    from exprag.bank import Retriever, append_to_bank
    from exprag.bank.store import bank_trajectory_files

    train, test = twx_trajs
    cfg = ScoringConfig(scoring)
    bank = build_bank(train, tmp_path / "b", encoder, retrieval=cfg)

    def files(root):
        return {p.relative_to(root): p.stat() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}

    before = files(bank.files)
    grown = append_to_bank(bank, test[:3])
    grown = append_to_bank(grown, test[3:5])
    assert grown.manifest["segments"] == ["seg-000001", "seg-000002"]
    after = files(grown.files)
    for rel, st in before.items():  # the first segment's files are shared, not rewritten
        assert (after[rel].st_ino, after[rel].st_mtime_ns) == (st.st_ino, st.st_mtime_ns), rel
    assert len(bank_trajectory_files(tmp_path / "b")) == 3

    full = build_bank(train + test[:5], tmp_path / "full", encoder, retrieval=cfg)
    loaded = load_bank(tmp_path / "b")
    assert [t.id for t in loaded.trajectories] == [t.id for t in full.trajectories]
    for mode in ("static", "dynamic"):  # each segment's embeddings stay memory-mapped, never joined
        index = loaded.index(mode)
        dense = index if scoring == "dense" else getattr(index, "dense", None)
        if dense is not None:
            assert isinstance(dense.emb, SegmentRows) and len(dense.emb.parts) == 3
            assert all(isinstance(p, np.memmap) for p in dense.emb.parts)
    queries = [t.task for t in test]
    for mode in ("static", "dynamic"):
        got, want = loaded.index(mode).top(queries, 3), full.index(mode).top(queries, 3)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        differ = got[1] != want[1]  # only keys of equal score may swap
        assert np.allclose(got[0][differ], want[0][differ], atol=1e-5)
    hits = Retriever(loaded).retrieve(test[0].task, k=2)
    assert [h.trajectory.id for h in hits] == [h.trajectory.id for h in Retriever(full).retrieve(test[0].task, k=2)]
    # an appended key whose text the bank held takes that key's stored row, bit for bit: equal texts
    # tie exactly, however the keys were batched when encoded (the tie then falls to key id)
    index = loaded.index("static")
    dense = index if scoring == "dense" else getattr(index, "dense", None)
    if dense is not None:
        texts = [t.task for t in train]
        same = [(texts.index(t.task), len(train) + j) for j, t in enumerate(test[:5]) if t.task in texts]
        assert same, "the fixture should hold test tasks with the text of a train task"
        for i, j in same:
            np.testing.assert_array_equal(np.asarray(dense.emb[i]), np.asarray(dense.emb[j]))


def test_segment_rows_slice_like_the_joined_array():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 4)).astype(np.float32) for n in (5, 1, 7)]
    rows, whole = SegmentRows(parts), np.concatenate(parts)
    assert rows.shape == (13, 4) and len(rows) == 13
    for a in range(14):
        for b in range(a, 14):
            np.testing.assert_array_equal(rows[a:b], whole[a:b])
    np.testing.assert_array_equal(np.asarray(rows), whole)
    np.testing.assert_array_equal(rows.T, whole.T)
    np.testing.assert_array_equal(rows[[0, 12]], whole[[0, 12]])
    # joining again flattens the parts; one part stays a plain array
    assert len(join_rows([rows, whole[:2]]).parts) == 4 and join_rows([whole]) is whole



def test_extending_the_key_terms_equals_a_full_build(twx_trajs):
    """Write-back tokenizes only the new keys: the weights, postings and scores it gets are those of an
    index built over all keys at once (and of the per-text vectors the scores are defined by)."""
    from exprag.bank.procedure import KeyTerms, TermWeights, postings_from_terms
    from exprag.bank.scoring import build_index, extend_index
    from exprag.bank.encoders import BM25Encoder

    train, test = twx_trajs
    texts, labels = [t.task for t in train + test], [t.task_type for t in train + test]
    n = len(train)
    cfg = ScoringConfig("procedure", dense_weight=0.0)
    enc = BM25Encoder()
    full = build_index(cfg, enc, texts, labels, "static")
    grown = extend_index(cfg, enc, build_index(cfg, enc, texts[:n], labels[:n], "static"), texts, labels, "static")
    assert grown.weights.weights == full.weights.weights
    assert grown._terms.n_keys == len(texts)
    # the reference: each text's own weighted, L2-normalised term vector, regrouped by term
    vectors = full.weights.vectors(texts)
    ids = np.concatenate([i for i, _ in vectors])
    order = np.argsort(ids, kind="stable")
    keys = np.repeat(np.arange(len(vectors)), [len(i) for i, _ in vectors])
    reference = (np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=len(full.weights.weights)))]),
                 keys[order], np.concatenate([v for _, v in vectors])[order])
    for got, want in zip(postings_from_terms(grown._terms, grown.weights), reference):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    queries = [t.task for t in test]
    np.testing.assert_allclose(grown.scores(queries), full.scores(queries), rtol=1e-5, atol=1e-6)
    # the old keys' term ids never move
    base = KeyTerms.of(texts[:n])
    assert {w: i for w, i in KeyTerms.of(texts[n:], base=base).vocab.items() if w in base.vocab} == base.vocab
    assert TermWeights.learn(texts, labels, 5.0).weights == TermWeights.from_terms(KeyTerms.of(texts), labels, 5.0).weights
