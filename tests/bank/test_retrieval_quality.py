"""Retrieval quality (issue 7): procedure-weighted scoring, diversity, manifest compatibility, and
`exprag bank eval-retrieval` on small banks of all three environments."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from exprag.bank import Retriever, append_to_bank, build_bank, load_bank
from exprag.bank.procedure import ProcedureIndex, TermWeights, default_alpha, diverse_order
from exprag.bank.quality import evaluate_retrieval
from exprag.bank.scoring import ScoringConfig
from exprag.bank.store import Bank
from exprag.cli import main
from exprag.errors import BankError
from exprag.trajectory import Trajectory, write_jsonl


def rec(i: int, task: str, task_type: str, split: str = "train", env: str = "synthetic") -> Trajectory:
    return Trajectory(f"{split}-{i}", env, "0", split, task_type, f"{split}/g{i}", task,
                      [{"role": "user", "content": f"You are in a room. Your task is to: {task}"},
                       {"role": "assistant", "content": "look"}], True, 1.0, 1, "test", {})


# ALFWorld-style templates: the procedure word is one word among object and receptacle names.
TEMPLATES = {"heat": "put a hot {o} in {r}.", "cool": "cool some {o} and put it in {r}.",
             "clean": "put a clean {o} in {r}.", "simple": "put some {o} on {r}."}
OBJS = ["apple", "tomato", "egg", "mug", "potato", "bread", "cup", "plate", "knife", "lettuce"]
RECEPS = ["diningtable", "countertop", "fridge", "cabinet", "shelf", "sidetable", "desk", "garbagecan"]


def alfworld_like(n_per_type: int, split: str, offset: int = 0) -> list[Trajectory]:
    out = []
    for t, tpl in TEMPLATES.items():
        for j in range(n_per_type):
            o, r = OBJS[(j + offset) % len(OBJS)], RECEPS[(3 * j + offset + len(t)) % len(RECEPS)]
            out.append(rec(len(out) + 1000 * offset, tpl.format(o=o, r=r), t, split))
    return out


def test_term_weights_learn_procedure_words_not_entities():
    bank = alfworld_like(12, "train")
    w = TermWeights.learn([t.task for t in bank], [t.task_type for t in bank], default_alpha(len(bank)))
    assert w.source == "task-type" and w.n_types == 4
    for proc in ("hot", "cool", "clean"):
        for entity in ("apple", "tomato", "diningtable", "countertop"):
            assert w.weights[proc] > 3 * w.weights[entity], (proc, entity, w.weights)
    assert "the" not in w.weights and "a" not in w.weights  # stop words are never learned
    assert w.mask("put a hot apple in fridge.") == "something a hot something in something"
    one = TermWeights.learn(["heat an egg", "heat a mug"], ["t", "t"], 5.0)  # one type: label-free
    assert one.source == "uniform" and one.weights["egg"] == one.weights["heat"] == 1.0


def test_procedure_beats_entity_overlap_without_query_metadata(tmp_path):
    bank, queries = alfworld_like(12, "train"), alfworld_like(6, "test", offset=5)
    built = build_bank(bank, tmp_path / "b", "bm25")
    rep = evaluate_retrieval(built, queries, k=2).as_dict()
    assert rep["retrieval"]["scoring"] == "procedure"
    assert rep["overall"]["top1"] == 1.0 and rep["overall"]["all_at_k"] == 1.0
    # the failure mode of the issue: same object and receptacle, other procedure
    hits = Retriever(built).retrieve("cool some tomato and put it in diningtable.", k=2)
    assert [h.trajectory.task_type for h in hits] == ["cool", "cool"]


def test_diverse_order_swaps_copies_within_a_template_only():
    texts = ["put a hot apple in desk", "put a hot apple in desk", "put a cool apple in desk",
             "put a hot egg in shelf"]
    templates = ["put a hot X in X", "put a hot X in X", "put a cool X in X", "put a hot X in X"]
    assert diverse_order([0, 1, 2, 3], texts, templates) == [0, 3, 1, 2]
    assert diverse_order([0, 1, 2], texts, templates) == [0, 1, 2]  # no same-template alternative
    assert diverse_order([1, 2, 0], texts, templates) == [1, 2, 0]


def _diverse_order_reference(ids, keys, templates):
    """The rule written as stated (quadratic): a copy in front pulls the best pending key of its
    template with a new text ahead of itself, until its template has none."""
    pending, out, seen = list(ids), [], set()
    while pending:
        i = pending.pop(0)
        if keys[i] in seen:
            j = next((j for j in pending if templates[j] == templates[i] and keys[j] not in seen), None)
            if j is not None:
                pending.remove(j)
                pending.insert(0, i)
                i = j
        out.append(i)
        seen.add(keys[i])
    return out


def test_diverse_order_matches_the_rule_on_random_windows():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        templates = [f"t{int(x)}" for x in rng.integers(0, 4, n)]
        keys = [f"{templates[i]}-{int(rng.integers(0, 3))}" for i in range(n)]  # many copies per template
        ids = rng.permutation(n)[: int(rng.integers(1, n + 1))].tolist()
        want = _diverse_order_reference(ids, keys, templates)
        assert diverse_order(ids, keys, templates) == want
        limit = int(rng.integers(0, len(ids) + 2))
        assert diverse_order(ids, keys, templates, limit) == want[:limit]


def test_diversity_never_costs_a_same_type_slot(tmp_path):
    # three exact copies of the query's best match, and other heat keys further down
    bank = [rec(i, "put a hot apple in desk.", "heat") for i in range(3)]
    bank += [rec(10 + i, f"put a hot {o} in desk.", "heat") for i, o in enumerate(["egg", "mug"])]
    bank += [rec(20 + i, f"put a cool apple in {r}.", "cool") for i, r in enumerate(["desk", "shelf", "sofa"])]
    bank += [rec(30 + i, f"cool some {o} and put it in desk.", "cool") for i, o in enumerate(["egg", "cup"])]
    div = build_bank(bank, tmp_path / "div", "bm25")
    flat = build_bank(bank, tmp_path / "flat", "bm25", retrieval=ScoringConfig(diversity=False))
    q = "put a hot apple in desk."
    with_div = Retriever(div).retrieve(q, k=3)
    without = Retriever(flat).retrieve(q, k=3)
    assert [h.trajectory.task for h in without].count(q) == 3
    assert all(h.trajectory.task_type == "heat" for h in with_div)
    assert len({h.trajectory.task for h in with_div}) == 3
    assert with_div[0].trajectory.task == q and with_div[0].score >= with_div[1].score


def test_manifest_records_scoring_and_old_banks_load_plain(tmp_path, twx_trajs):
    train, test = twx_trajs[0][::2], twx_trajs[1]  # 12 keys of 8 games: enough, and quick to encode
    new = build_bank(train, tmp_path / "new", "minilm")
    m = json.loads((new.files / "manifest.json").read_text())
    assert m["retrieval"] == {"scoring": "procedure", "dense_weight": 0.5, "diversity": True, "alpha": None,
                              "expand": True, "lexicon": "wordnet-3.0", "template_weight": 0.5}
    assert m["bank_version"] == 2  # an exprag that predates procedure scoring refuses it, not misreads it
    assert sorted(p.name for p in (new.files / "static").iterdir()) == \
        ["embeddings.npy", "keys.json", "postings_keys.npy", "postings_start.npy", "postings_vals.npy",
         "term_embeddings.npy", "weights.json"]
    again = load_bank(tmp_path / "new")
    assert isinstance(again.index("static"), ProcedureIndex) and again.index("static").dense is not None
    q = test[0].task
    assert [h.trajectory.id for h in Retriever(again).retrieve(q, k=3)] == \
        [h.trajectory.id for h in Retriever(new).retrieve(q, k=3)]
    # banks written before the field: plain dot product (dense) or plain BM25, as they were built
    for scoring, enc in (("dense", "minilm"), ("bm25", "bm25")):
        path = tmp_path / f"old-{scoring}"
        plain = build_bank(train, path, enc, retrieval=scoring)
        want = [h.trajectory.id for h in Retriever(plain).retrieve(q, k=3)]
        mf = plain.files / "manifest.json"
        old = json.loads(mf.read_text())
        assert old["bank_version"] == 1  # plain banks stay readable by older exprag
        del old["retrieval"]
        mf.write_text(json.dumps(old))
        legacy = load_bank(path)
        assert legacy.retrieval.scoring == scoring
        assert [h.trajectory.id for h in Retriever(legacy).retrieve(q, k=3)] == want
        assert not isinstance(legacy.index("static"), ProcedureIndex)
    with pytest.raises(BankError, match="scoring 'dense' needs a dense encoder"):
        build_bank(train, tmp_path / "x", "bm25", retrieval="dense")
    bad = dict(m, retrieval={"scoring": "magic"})
    (tmp_path / "bad").mkdir()
    shutil.copy(new.files / "trajectories.jsonl", tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BankError, match="field 'retrieval': unknown scoring 'magic'"):
        load_bank(tmp_path / "bad")


def test_append_relearns_weights_and_keeps_embeddings(tmp_path):
    bank = build_bank(alfworld_like(4, "train"), tmp_path / "b", "minilm")
    emb = bank.index("static").dense.emb.copy()
    new = [rec(900 + i, f"put two {o} in desk.", "two") for i, o in enumerate(["apple", "egg", "mug"])]
    grown = append_to_bank(bank, new)
    idx = load_bank(tmp_path / "b").index("static")
    assert idx.size == 19 and np.allclose(idx.dense.emb[:16], emb)
    assert "two" in idx.weights.weights and idx.weights.n_types == 5
    assert Retriever(grown).retrieve("put two tomato in shelf.", k=1)[0].trajectory.task_type == "two"
    assert json.loads((grown.files / "manifest.json").read_text())["retrieval"]["scoring"] == "procedure"


def test_filters_and_fallback_with_procedure_scoring(tmp_path):
    from exprag.bank import Filters

    bank = build_bank(alfworld_like(30, "train"), tmp_path / "b", "bm25")
    r = Retriever(bank)
    q = "put a hot apple in desk."
    heat_ids = {t.id for t in bank.trajectories if t.task_type == "heat"}
    # excluding every heat key forces the retriever past its over-fetch window, to rank_all
    hits = r.retrieve(q, k=2, filters=Filters(exclude_ids=heat_ids))
    assert len(hits) == 2 and not heat_ids & {h.trajectory.id for h in hits}
    hits = r.retrieve(q, k=2, filters=Filters(task_types={"simple"}))
    assert [h.trajectory.task_type for h in hits] == ["simple", "simple"]


# ---- the command on small banks of the three environments --------------------------------------------
def _eval_cli(tmp_path, capsys, bank_trajs, queries, name, *build_args) -> dict:
    data, qfile, bank, out = (tmp_path / f"{name}-bank.jsonl", tmp_path / f"{name}-q.jsonl",
                              tmp_path / f"{name}-bank", tmp_path / f"{name}-quality")
    write_jsonl(data, bank_trajs)
    write_jsonl(qfile, queries)
    assert main(["bank", "build", "--trajectories", str(data), "--out", str(bank), *build_args]) == 0
    assert main(["bank", "eval-retrieval", str(bank), "--queries", str(qfile), "-k", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads((tmp_path / f"{name}-quality.json").read_text())
    md = (tmp_path / f"{name}-quality.md").read_text()
    for key in ("overall", "no_twin", "per_type", "confusion", "no_twin_per_type", "no_twin_confusion",
                "exact_duplicate_rate", "copy_rate", "retrieval"):
        assert key in d, key
    assert d["overall"]["n"] == len(queries) and set(d["per_type"]) == {q.task_type for q in queries}
    assert "| no exact-text twin in bank |" in md and "Confusion, queries with no twin" in md and md in printed
    return d


def test_eval_retrieval_twx(tmp_path, capsys, twx_trajs):
    train, test = twx_trajs
    d = _eval_cli(tmp_path, capsys, train, test, "twx")
    assert d["overall"]["top1"] == 1.0 and d["overall"]["all_at_k"] == 1.0
    assert d["retrieval"]["scoring"] == "procedure"
    dense = _eval_cli(tmp_path, capsys, train, test, "twx-dense", "--scoring", "dense")
    assert dense["retrieval"] == {"scoring": "dense"} and dense["encoder"]["name"] == "minilm"
    assert main(["bank", "info", str(tmp_path / "twx-dense-bank")]) == 0
    assert '"scoring": "dense"' in capsys.readouterr().out


@pytest.fixture(scope="module")
def sw_records():
    """Reset-only records (task + first observation) of a few ScienceWorld variations of the task
    types that dense retrieval confuses (issue 7): known vs unknown substances."""
    pytest.importorskip("scienceworld")
    from exprag.envs import make_env

    types = ["test-conductivity", "test-conductivity-of-unknown-substances",
             "measure-melting-point-known-substance", "measure-melting-point-unknown-substance"]
    out: dict[str, list[Trajectory]] = {"train": [], "test": []}
    with make_env("scienceworld", gold=False) as env:
        for split, n in (("train", 4), ("test", 2)):
            for tt in types:
                for task in env.tasks(split, [tt])[:n]:
                    r = env.reset(task)
                    out[split].append(Trajectory(
                        f"sw:{split}:{task.task_id}", "scienceworld", env.version, split, tt, task.task_id, r.task,
                        [{"role": "user", "content": r.observation}], True, 0.0, 0, "reset-only", {}))
    return out


def test_eval_retrieval_scienceworld(tmp_path, capsys, sw_records):
    d = _eval_cli(tmp_path, capsys, sw_records["train"], sw_records["test"], "sw", "--encoder", "bm25")
    assert d["overall"]["top1"] == 1.0 and d["overall"]["all_at_k"] == 1.0, d["confusion"]


@pytest.fixture(scope="module")
def alfworld_trajs(tmp_path_factory):
    """Expert trajectories of freshly generated ALFWorld games: 2 train / 1 test per task type."""
    pytest.importorskip("alfworld")
    from exprag.envs import alfworld_gen as gen
    from exprag.envs.alfworld import ALFWorldEnv
    from exprag.expert import collect

    out = tmp_path_factory.mktemp("alfworld") / "gen"
    for split, n in (("train", 2), ("test", 1)):
        gen.generate(out, split=split, per_type=n, seed=0)
    with ALFWorldEnv(data_dir=out) as env:
        types = list(env.task_types())
        return {split: list(collect(env, env.tasks(split, types))) for split in ("train", "test")}


def test_eval_retrieval_alfworld(tmp_path, capsys, alfworld_trajs):
    train, test = alfworld_trajs["train"], alfworld_trajs["test"]
    assert len(train) == 12 and len(test) == 6 and all(t.success for t in train)
    d = _eval_cli(tmp_path, capsys, train, test, "alf")
    # 2 keys per type: the bank is too small to promise the target, but the procedure must show
    assert d["overall"]["top1"] >= 0.8, d["confusion"]
    bank = load_bank(tmp_path / "alf-bank")
    dyn = evaluate_retrieval(bank, test, k=2, mode="dynamic").as_dict()
    assert dyn["overall"]["n"] == 6 and dyn["mode"] == "dynamic"


# ---- paraphrases: hand-written free-form tasks against templated banks ------------------------------
def _bench_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_retrieval_quality as bq

    return bq


def test_paraphrase_sets_are_shipped_and_dev_is_separate_from_test():
    import yaml

    from exprag.bank.quality import paraphrase_file, read_text_queries
    from exprag.envs.alfworld_gen import TASK_TYPES

    splits = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "src/exprag/data/splits.yaml"))
    want = {"alfworld": set(TASK_TYPES), "scienceworld": set(splits["scienceworld"]["easy"] + splits["scienceworld"]["hard"])}
    assert len(want["alfworld"]) == 6 and len(want["scienceworld"]) == 30
    for env, types in want.items():
        sets = {s: read_text_queries(paraphrase_file(env, s)) for s in ("dev", "test")}
        for split, least in (("test", 10), ("dev", 5)):
            per = Counter(q.task_type for q in sets[split])
            assert set(per) == types and min(per.values()) >= least, (env, split, per)
        assert not {q.text for q in sets["dev"]} & {q.text for q in sets["test"]}  # tuning never sees test
        assert all(q.source for q in sets["test"])


def test_unknown_words_borrow_the_weight_of_their_nearest_bank_terms(tmp_path):
    bank = build_bank(alfworld_like(12, "train"), tmp_path / "b", "minilm")
    old = build_bank(alfworld_like(12, "train"), tmp_path / "old", "minilm",
                     retrieval=ScoringConfig(dense_weight=0.05, expand=False, template_weight=0.0))
    new_r, old_r = Retriever(bank), Retriever(old)
    queries = {"warm up an egg and set it on the desk": "heat", "rinse the mug, then leave it on the shelf": "clean",
               "I need a heated potato on the countertop": "heat", "wash a knife and store it in the cabinet": "clean"}
    got = {q: [h.trajectory.task_type for h in new_r.retrieve(q, k=2)] for q in queries}
    assert all(types == [queries[q]] * 2 for q, types in got.items()), got
    before = sum(old_r.retrieve(q, k=1)[0].trajectory.task_type == t for q, t in queries.items())
    assert before < len(queries)  # the words the bank lacks weighed 0 before
    # the templated queries keep their exact-word scores
    rep = evaluate_retrieval(bank, alfworld_like(6, "test", offset=5), k=2).as_dict()
    assert rep["overall"]["top1"] == 1.0 and rep["overall"]["all_at_k"] == 1.0
    # the manifest says how it scores; a bank of the earlier default reloads as it was built
    idx = load_bank(tmp_path / "b").index("static")
    assert idx.expand and idx._term_emb is not None and idx._term_emb.shape[0] == len(idx.weights.weights)
    cfg = ScoringConfig.from_manifest({"retrieval": {"scoring": "procedure", "dense_weight": 0.05,
                                                       "diversity": True, "alpha": None}})
    assert cfg.expand is False and cfg.dense_weight == 0.05


def test_template_term_reranks_the_window_by_masked_query_and_key_templates(tmp_path):
    bank = build_bank(alfworld_like(6, "train"), tmp_path / "b", "minilm")
    idx = bank.index("static")
    assert idx.reranks and idx.template_weight == 0.5
    q = "get the tomato nice and cold, then leave it on the shelf"
    scores, ids = idx.top([q], 3)
    # the query's entity-like known words are masked, the words the bank lacks are kept
    masked = idx.weights.mask(q, keep_unknown=True)
    assert "tomato" not in masked and "shelf" not in masked and "cold" in masked and "nice" in masked
    enc = idx.dense.encoder
    qv = enc.encode([masked])[0]
    base = idx.scores([q])[0]
    for s, i in zip(scores[0], ids[0]):
        tpl = idx.weights.mask(idx.texts[i])  # the key's template: "cool some something and ..."
        assert s == pytest.approx(base[i] + 0.5 * float(enc.encode([tpl])[0] @ qv), abs=1e-4)
    assert list(scores[0]) == sorted(scores[0], reverse=True)
    # the retriever's full-scan fallback puts the same keys first, with the same scores
    all_s, all_i = idx.rank_all(q)
    assert list(all_i[:3]) == list(ids[0]) and np.allclose(all_s[:3], scores[0])
    assert sorted(all_i.tolist()) == list(range(idx.size))
    assert idx.top([], 3)[1].shape == (0, 3)
    # templated queries keep their results
    rep = evaluate_retrieval(bank, alfworld_like(3, "test", offset=5), k=2).as_dict()
    assert rep["overall"]["top1"] == 1.0 and rep["overall"]["all_at_k"] == 1.0
    # off: dynamic keys, weights without labels (nothing is masked), and banks built before the term
    assert bank.index("dynamic").template_weight == 0.0
    one = build_bank([rec(i, f"heat some {o} and put it in desk.", "heat") for i, o in enumerate(OBJS[:4])],
                     tmp_path / "one", "minilm")
    assert not one.index("static").reranks
    old = {"scoring": "procedure", "dense_weight": 0.5, "diversity": True, "alpha": None, "expand": True,
           "lexicon": "wordnet-3.0"}
    assert ScoringConfig.from_manifest({"retrieval": old}).template_weight == 0.0
    with pytest.raises(BankError, match="template_weight must be >= 0"):
        ScoringConfig(template_weight=-1)


def test_template_cache_overflow_keeps_the_scores(tmp_path, monkeypatch):
    """Past its cap, the template-embedding cache starts again from the heads' templates, and the
    heads are scored in blocks of queries: scores stay the same (a bank of mostly distinct templates)."""
    import exprag.bank.procedure as procedure

    idx = build_bank(alfworld_like(6, "train"), tmp_path / "b", "minilm").index("static")
    queries = ["get the tomato nice and cold, then leave it on the shelf", "put a hot apple in desk."]
    want_s, want_i = idx.top(queries, 3)
    stale = next(iter(idx._template_emb.values()))
    idx._template_emb = {"an old template": stale, "another one": stale}
    monkeypatch.setattr(procedure, "_TEMPLATE_CACHE", 3)
    monkeypatch.setattr(procedure, "_RERANK_BLOCK", 1)  # one query's head at a time: the same scores
    got_s, got_i = idx.top(queries, 3)
    assert (got_i == want_i).all() and np.allclose(got_s, want_s)
    assert "an old template" not in idx._template_emb


def test_first_hits_do_not_depend_on_k(tmp_path):
    """The second stage and diversity reorder a head of fixed size: asking for more hits appends to
    the list, it does not change the first ones (a k-sweep compares the same first memories)."""
    from exprag.bank.procedure import HEAD, HEAD_MARGIN

    # 300 keys; 100 copies of one text: a head of k + 64 would hold nothing but copies of it for
    # small k, and diversity would find another text of its template only for larger k
    trajs = alfworld_like(50, "train") + [rec(5000 + i, "put a hot apple in desk.", "heat") for i in range(100)]
    bank = build_bank(trajs, tmp_path / "b", "minilm")
    idx = bank.index("static")
    assert idx.size > HEAD and idx.reranks and idx.diversity
    queries = ["get the tomato nice and cold, then leave it on the shelf", "put a hot apple in desk.",
               "rinse a mug and set it on the countertop"]
    s8, i8 = idx.top(queries, 8)
    assert len({idx.texts[i] for i in i8[1, :2]}) == 2  # the copy's slot went to another hot-something key
    for k in (1, 2, 5):
        s, i = idx.top(queries, k)
        assert (i == i8[:, :k]).all() and np.allclose(s, s8[:, :k])
    big = HEAD - HEAD_MARGIN
    assert (idx.top(queries, big)[1][:, :8] == i8).all()
    # the full-scan fallback orders and scores the head as top(q, k) does, for any k
    for k in (2, big, HEAD + 10):
        want_s, want_i = idx.top(queries[:1], k)
        all_s, all_i = idx.rank_all(queries[0], k)
        assert (all_i[:k] == want_i[0]).all() and np.allclose(all_s[:k], want_s[0])
    # the filtered path (over-fetch, then the full-scan fallback) keeps the unfiltered order
    from exprag.bank import Filters

    r = Retriever(bank)
    hits = r.retrieve(queries[1], k=8, filters=Filters(exclude_ids={trajs[i].id for i in i8[1, :2]}))
    assert [h.position for h in hits][:6] == i8[1, 2:].tolist()


def test_alfworld_paraphrases_reduced_size():
    """The ALFWorld paraphrase benchmark at a reduced bank (20 templated games per type, seconds): the
    default keeps every templated query and lifts the paraphrases well above the earlier default."""
    bq = _bench_module()
    from exprag.bank.encoders import DenseEncoder
    from exprag.bank.quality import evaluate_text_queries, paraphrase_file, read_text_queries

    dense = DenseEncoder("minilm")
    train, templated = bq.alfworld_templated("train", 20), bq.alfworld_templated("test", 3)
    queries = read_text_queries(paraphrase_file("alfworld", "test"))
    got = {}
    for name, index in bq.paraphrase_configs(train, dense):
        bank = Bank(Path("."), {"encoder": dense.identity, "retrieval": {"scoring": "procedure"}}, train, dense,
                    {"static": index})
        got[name] = (evaluate_retrieval(bank, templated, k=2).as_dict()["overall"],
                     evaluate_text_queries(bank, queries, k=2).as_dict()["overall"])
    before, ours = got[bq.PARAPHRASE_BEFORE], got[bq.PARAPHRASE_OURS]
    assert ours[0]["top1"] == 1.0 and ours[0]["all_at_k"] == 1.0, got
    assert ours[1]["n"] == 72 and ours[1]["top1"] >= 0.75 and ours[1]["all_at_k"] >= 0.7, got
    assert ours[1]["top1"] >= before[1]["top1"] + 0.15, got
    # WordNet's relations on top of the word space (measured 0.81 / 0.79 vs 0.71 / 0.69)
    space = got[bq.PARAPHRASE_WORD_SPACE]
    assert ours[1]["top1"] >= space[1]["top1"] + 0.05 and ours[1]["all_at_k"] >= space[1]["all_at_k"] + 0.05, got
    assert ours[1]["top1"] > got["dense (paper)"][1]["top1"] and ours[1]["top1"] > got["bm25"][1]["top1"], got


def test_eval_retrieval_reads_text_queries(tmp_path, capsys):
    from exprag.bank.quality import paraphrase_file

    data, bank, out = tmp_path / "bank.jsonl", tmp_path / "bank", tmp_path / "q"
    write_jsonl(data, alfworld_like(6, "train"))
    assert main(["bank", "build", "--trajectories", str(data), "--out", str(bank), "--encoder", "bm25",
                 "--template-weight", "0"]) == 0
    assert load_bank(bank).describe()["retrieval"]["template_weight"] == 0.0
    qfile = paraphrase_file("alfworld", "dev")
    assert main(["bank", "eval-retrieval", str(bank), "--queries", str(qfile), "--out", str(out)]) == 0
    d = json.loads((tmp_path / "q.json").read_text())
    assert d["overall"]["n"] == 72 and d["mode"] == "static" and "pick_heat_then_place_in_recep" in d["per_type"]
    capsys.readouterr()
    assert main(["bank", "eval-retrieval", str(bank), "--queries", str(qfile), "--mode", "dynamic"]) == 2
    assert "use --mode static" in capsys.readouterr().err


# ---- full sizes (minutes): the targets -------------------------------------------------------
@pytest.mark.slow
def test_targets_at_full_size(tmp_path):
    """The benchmark's data (reset-only records, cached) and the default configuration, through
    build_bank, hit the issue's targets on all three envs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_retrieval_quality as bq

    from exprag.bank.encoders import DenseEncoder

    dense = DenseEncoder("minilm")
    for env in ("twx", "scienceworld", "alfworld"):
        data = bq.load_env_data(env, refresh=False, log=lambda m: None)
        bank = build_bank(data["train"], tmp_path / env, dense)
        rep = evaluate_retrieval(bank, data["test"], k=2).as_dict()
        judged = rep["no_twin"] if env == "alfworld" else rep["overall"]
        assert judged["top1"] >= 0.95 and judged["all_at_k"] >= 0.90, (env, judged, rep["confusion"])
