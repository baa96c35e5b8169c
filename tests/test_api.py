"""The public API (``import exprag``): every name in ``exprag.__all__`` has a docstring whose
examples run here, on the committed ALFWorld expert trajectories, a MiniLM bank built from them and
a tiny random model."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import exprag

ROOT = Path(__file__).resolve().parents[1]
TRAJ = ROOT / "results" / "replication-cpu" / "data" / "train-easy.jsonl"
# names whose examples load a model or play episodes (tens of seconds each)
MODEL_EXAMPLES = {"load_chat_model", "run_eval", "run_training", "run_experiment"}


@pytest.fixture(scope="session")
def api_globs(tmp_path_factory):
    from exprag.bank.store import build_bank_from_files

    root = tmp_path_factory.mktemp("api")
    bank = root / "bank"
    build_bank_from_files([TRAJ], bank, "minilm")
    return {"exprag": exprag, "TRAJ": TRAJ, "BANK": bank}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from exprag.llm.models import tiny_random_model

    return tiny_random_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _examples(name: str) -> list[doctest.DocTest]:
    obj = getattr(exprag, name)
    tests = [t for t in doctest.DocTestFinder(recurse=True).find(obj, name) if t.examples]
    return sorted(tests, key=lambda t: t.name)


def test_all_is_the_public_api():
    assert exprag.__all__ == sorted(exprag.__all__)
    for name in exprag.__all__:
        assert name in exprag.__doc__, f"help(exprag) does not list {name}"
        assert getattr(exprag, name).__doc__, name
    with pytest.raises(AttributeError):
        exprag.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", exprag.__all__)
def test_public_name_has_a_running_example(name, api_globs, tmp_path, request):
    tests = _examples(name)
    assert tests, f"exprag.{name} has no example in its docstring"
    globs = {**api_globs, "tmp": tmp_path}
    if name in MODEL_EXAMPLES:
        globs["TINY"] = request.getfixturevalue("tiny")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        t.globs = dict(globs)
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"exprag.{name}: {result.failed} of {result.attempted} examples failed"
    assert result.attempted >= 1


def test_memory_block_is_the_agents(api_globs):
    """Memory renders what the agent's own path renders (MemorySpec.retrieve + memory_block)."""
    from exprag.bank.retriever import Retriever
    from exprag.bank.store import load_bank
    from exprag.memory_block import MemorySpec, memory_block

    task = "Your task is to: put a clean cloth in countertop."
    history = [{"role": "user", "content": "You are in the middle of a room."},
               {"role": "assistant", "content": "go to sinkbasin 1"},
               {"role": "user", "content": "On the sinkbasin 1, you see a cloth 2."}]
    bank = load_bank(api_globs["BANK"])
    for mode, k, budget in (("static", 2, None), ("dynamic", 3, 600)):
        spec = MemorySpec(k, mode, "json", budget)
        (hits,) = spec.retrieve(Retriever(bank), [(task, history if mode == "dynamic" else None)], [None])
        mem = exprag.Memory(bank, k=k, mode=mode, token_budget=budget)
        mem.for_task(task)
        assert mem.update(history) == memory_block(hits, "json") != ""
