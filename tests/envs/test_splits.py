import pytest

from exprag.envs.base import TaskSpec
from exprag.envs.splits import (PAPER_SCIENCEWORLD_EASY_EXAMPLES, PAPER_SCIENCEWORLD_HARD_EXAMPLES,
                                PAPER_SCIENCEWORLD_SIZES, all_types, fitting_splits, load_manifest, manifest,
                                resolve_task_types, split_families, split_sizes, split_types, type_split,
                                write_manifest)
from exprag.errors import UnknownEnvError, UnknownTaskTypeError


def test_paper_splits():
    assert split_types("alfworld", "easy") == [
        "look_at_obj_in_light", "pick_clean_then_place_in_recep", "pick_and_place_simple"]
    assert split_types("alfworld", "hard") == [
        "pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep", "pick_two_obj_and_place"]
    assert len(split_types("scienceworld", "easy")) == 17
    assert len(split_types("scienceworld", "hard")) == 13
    assert len(set(all_types("scienceworld"))) == 30
    assert len(all_types("twx")) == 8
    for t in PAPER_SCIENCEWORLD_EASY_EXAMPLES:
        assert type_split("scienceworld", t) == "easy"
    for t in ("chemistry-mix", "grow-plant", "test-conductivity", "mendelian-genetics-known-plant",
              "mendelian-genetics-unknown-plant"):
        assert type_split("scienceworld", t) == "hard"


def test_resolve():
    assert resolve_task_types("twx", "easy") == split_types("twx", "easy")
    assert resolve_task_types("twx", "all") == all_types("twx")
    assert resolve_task_types("twx", "coin, twc,coin") == ["coin", "twc"]
    with pytest.raises(UnknownTaskTypeError, match="unknown task type 'cooking'"):
        resolve_task_types("twx", "cooking")
    with pytest.raises(UnknownEnvError, match="unknown env 'minigrid'"):
        resolve_task_types("minigrid", "easy")


def test_manifest_hash_is_order_free(tmp_path):
    a = [TaskSpec("twx", "train", "coin", "coin/seed1"), TaskSpec("twx", "train", "twc", "twc/seed2")]
    assert manifest(a)["sha256"] == manifest(a[::-1])["sha256"]
    assert manifest(a)["sha256"] != manifest(a[:1])["sha256"]
    p = write_manifest(tmp_path / "x.jsonl", a, collected=2)
    m = load_manifest(p)
    assert p.name == "x.jsonl.manifest.json" and m["count"] == 2 and m["collected"] == 2


def test_fitting_splits_on_a_small_table():
    counts = {"a": (4, 2), "b": (2, 1), "c": (6, 3), "d": (2, 2), "e": (8, 4)}
    # two types on the easy side with 8 train / 4 test tasks: {a, b} has 6, {b, c} 8/4, {c, d} 8/5
    assert fitting_splits(counts, 2, (8, 8), 4) == [frozenset({"b", "c"})]
    assert sorted(map(sorted, fitting_splits(counts, 2, (6, 8), 3))) == [["a", "b"]]
    assert fitting_splits(counts, 2, (8, 8), 4, hard_fixed=["b"]) == []
    assert fitting_splits(counts, 2, (10, 10), 5, easy_fixed=["e"]) == [frozenset({"b", "e"})]
    assert fitting_splits(counts, 2, (10, 10), 5, easy_fixed=["e"], hard_fixed=["b"]) == []
    assert fitting_splits(counts, 3, (12, 12), 6, easy_fixed=["a"]) == [frozenset({"a", "b", "c"})]
    assert split_sizes(counts, ["b", "c"]).hard_train == 14
    fams = {"a": "1", "b": "1", "c": "2", "d": "2", "e": "10"}
    assert split_families(["a", "c", "d"], fams) == ["1"]
    assert split_families(["a", "b", "e"], fams) == []
    assert split_families(["b", "c", "e"], fams) == ["1", "2"]


@pytest.fixture(scope="module")
def sw_counts():
    """{task type: (train, test)} variation counts from the installed simulator (one JVM)."""
    pytest.importorskip("scienceworld")
    from exprag.envs.scienceworld import ScienceWorldEnv
    from exprag.envs.splits import task_counts

    with ScienceWorldEnv() as env:
        return task_counts(env, env.task_types())


def test_scienceworld_split_sizes_from_the_simulator(sw_counts):
    p = PAPER_SCIENCEWORLD_SIZES
    train, test = (sum(c[i] for c in sw_counts.values()) for i in (0, 1))
    # ScienceWorld's standard test split; the simulator lists 3 train variations more than the
    # 3589 the paper's sizes add up to, and every type's train count is even (2335 is out of reach).
    assert (train, test) == (p.easy_train + p.hard_train + 3, p.easy_test + p.hard_test) == (3592, 1819)
    assert all(tr % 2 == 0 for tr, _ in sw_counts.values())
    sizes = split_sizes(sw_counts, split_types("scienceworld", "easy"))
    assert (sizes.easy_test, sizes.hard_test) == (1183, 636)
    assert (sizes.easy_train, sizes.hard_train) == (2335 + 1, 1254 + 2)
    assert set(all_types("scienceworld")) == set(sw_counts)


def test_scienceworld_split_is_the_one_that_keeps_families_whole(sw_counts):
    from exprag.envs.splits import scienceworld_families

    p = PAPER_SCIENCEWORLD_SIZES
    easy_fixed = list(PAPER_SCIENCEWORLD_EASY_EXAMPLES)
    hard_named = [t for t in PAPER_SCIENCEWORLD_HARD_EXAMPLES if t in sw_counts]
    assert hard_named == ["chemistry-mix", "grow-plant", "test-conductivity"]
    fits: set[frozenset[str]] = set()
    for mendel in ("mendelian-genetics-known-plant", "mendelian-genetics-unknown-plant"):
        exact = fitting_splits(sw_counts, 17, (p.easy_train, p.easy_train), p.easy_test, easy_fixed,
                               hard_named + [mendel])
        assert exact == []
        fits |= set(fitting_splits(sw_counts, 17, (p.easy_train, p.easy_train + 3), p.easy_test, easy_fixed,
                                   hard_named + [mendel]))
    assert len(fits) == 242  # the alternatives docs/scienceworld-split.md counts
    families = scienceworld_families()
    whole = [s for s in fits if not split_families(s, families)]
    assert whole == [frozenset(split_types("scienceworld", "easy"))]
