"""Banks of any size: chunked scoring equals scoring the whole bank at once."""

import numpy as np
import pytest

from exprag.bank import build_bank
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
