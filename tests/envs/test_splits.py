import pytest

from exprag.envs.base import TaskSpec
from exprag.envs.splits import (all_types, load_manifest, manifest, resolve_task_types, split_types,
                                type_split, write_manifest)
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
    assert type_split("scienceworld", "boil") == "easy"
    assert type_split("scienceworld", "grow-plant") == "hard"


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
