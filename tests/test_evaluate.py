"""Resumable evaluation on real TWX episodes with a tiny random model."""

import json

import pytest

from exprag.config import EvalConfig, RetrievalConfig
from exprag.errors import BankError, ExpragError
from exprag.evaluate import compute_metrics, evaluate, read_results, wilson


def test_wilson():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.65 < lo < 0.75
    assert wilson(0, 0) == (0.0, 0.0)


def test_metrics_per_type():
    rows = [{"task_type": "a", "success": True, "steps": 4, "gen_s": 1.0, "prefill_tokens": 10,
             "completion_tokens": 10, "unparsable": 0, "invalid_actions": 1},
            {"task_type": "b", "success": False, "steps": 4, "gen_s": 1.0, "prefill_tokens": 10,
             "completion_tokens": 10, "unparsable": 1, "invalid_actions": 0}]
    m = compute_metrics(rows)
    assert m["n"] == 2 and m["success_rate"] == 0.5 and m["tokens_per_s"] == 20.0
    assert m["per_type"]["a"]["success_rate"] == 1.0 and m["valid_action_rate"] == 0.75


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from exprag.llm.hf import HFChatModel
    from exprag.llm.models import tiny_random_model

    path = tiny_random_model(tmp_path_factory.mktemp("tiny") / "model")
    return str(path), HFChatModel(str(path), max_batch_size=4)


def _cfg(tmp_path, model_path, **kw):
    return EvalConfig(env="twx", split="test", task_types="coin,simonsays", per_type=2, model=model_path,
                      max_steps=2, max_new_tokens=6, batch_size=2, out=str(tmp_path / "run"), **kw)


def test_kill_and_resume(tmp_path, tiny):
    path, model = tiny
    cfg = _cfg(tmp_path, path)
    seen = []

    def crash_after_one(row):
        seen.append(row)
        if len(seen) == 1:
            raise KeyboardInterrupt  # a kill between episodes

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, model=model, on_episode=crash_after_one)
    assert len(read_results(tmp_path / "run" / "results.jsonl")) == 1
    # A torn last line (killed mid-write) is dropped on resume.
    with open(tmp_path / "run" / "results.jsonl", "a") as f:
        f.write('{"task_id": "coin/se')
    res = evaluate(cfg, model=model)
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert res.new_episodes == 3 and res.skipped == 1
    assert len({r["task_id"] for r in rows}) == 4 and res.metrics["n"] == 4
    assert set(res.metrics["per_type"]) == {"coin", "simonsays"}
    again = evaluate(cfg, model=model)
    assert again.new_episodes == 0 and again.metrics["n"] == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["ci95"][0] <= metrics["success_rate"] <= metrics["ci95"][1]
    trajs = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    assert len(trajs) == 4


def test_changed_config_refused_and_bad_bank(tmp_path, tiny, twx_trajs):
    path, model = tiny
    evaluate(_cfg(tmp_path, path, limit=1), model=model)
    with pytest.raises(ExpragError, match="field 'max_new_tokens' is 6 in the existing run but 7 now"):
        evaluate(_cfg(tmp_path, path, limit=1).__class__(**{**_cfg(tmp_path, path).__dict__, "max_new_tokens": 7}),
                 model=model)
    from exprag.bank import build_bank

    other = [t.__class__(**{**t.to_dict(), "env": "scienceworld", "id": t.id + "x"}) for t in twx_trajs[0][:3]]
    build_bank(other, tmp_path / "swbank", "bm25")
    with pytest.raises(BankError, match="not twx"):
        evaluate(_cfg(tmp_path, path, retrieval=RetrievalConfig(bank=str(tmp_path / "swbank"))),
                 model=model, overwrite=True)


def test_write_back_grows_bank(tmp_path, tiny, twx_trajs):
    from exprag.bank import build_bank, load_bank

    path, model = tiny
    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    n0 = len(twx_trajs[0])
    cfg = _cfg(tmp_path, path, retrieval=RetrievalConfig(bank=str(tmp_path / "bank")), write_back=True, limit=3)
    evaluate(cfg, model=model)
    bank = load_bank(tmp_path / "bank")
    assert len(bank) == n0 + 3
    assert sum(t.source != "expert" for t in bank.trajectories) == 3


def _bank_ids(path):
    from exprag.bank import load_bank

    return [t.id for t in load_bank(path).trajectories]


def _run_ids(run):
    from exprag.trajectory import read_jsonl

    return [t.id for t in read_jsonl(run / "trajectories.jsonl")]


def test_write_back_survives_a_rebuild_by_another_process(tmp_path, tiny, twx_trajs):
    """Another process rebuilds the bank mid-run: the next append extends the rebuilt version and
    brings back this run's earlier episodes; the bank stays loadable and holds each episode once."""
    from exprag.bank import build_bank
    from exprag.trajectory import write_jsonl
    from tests.test_io import exprag

    path, model = tiny
    train = twx_trajs[0]
    build_bank(train, tmp_path / "bank", "bm25")
    write_jsonl(tmp_path / "train.jsonl", train)
    cfg = _cfg(tmp_path, path, retrieval=RetrievalConfig(bank=str(tmp_path / "bank")), write_back=True, limit=3)

    def rebuild_after_first(row):
        if row is not None and not (tmp_path / "rebuilt").exists():
            res = exprag("bank", "build", "--trajectories", str(tmp_path / "train.jsonl"),
                         "--out", str(tmp_path / "bank"), "--encoder", "bm25")
            assert res.returncode == 0, res.stderr
            (tmp_path / "rebuilt").touch()

    evaluate(cfg, model=model, on_episode=rebuild_after_first)
    ids = _bank_ids(tmp_path / "bank")
    tag = json.loads((tmp_path / "run" / "write-back.json").read_text())["run"]
    episodes = [f"{i}@{tag}" for i in _run_ids(tmp_path / "run")]
    assert len(episodes) == 3 and sorted(ids) == sorted([t.id for t in train] + episodes)


def test_a_failed_write_back_is_redone_on_resume(tmp_path, tiny, twx_trajs, monkeypatch):
    import exprag.bank as bank_api
    from exprag.bank import build_bank

    path, model = tiny
    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    cfg = _cfg(tmp_path, path, retrieval=RetrievalConfig(bank=str(tmp_path / "bank")), write_back=True, limit=2)
    real = bank_api.append_to_bank

    def disk_full(bank, new, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bank_api, "append_to_bank", disk_full)
    with pytest.raises(OSError, match="No space left"):
        evaluate(cfg, model=model)
    assert len(read_results(tmp_path / "run" / "results.jsonl")) == 1  # the row is written, the append not
    assert len(_bank_ids(tmp_path / "bank")) == len(twx_trajs[0])
    monkeypatch.setattr(bank_api, "append_to_bank", real)
    res = evaluate(cfg, model=model)
    assert res.new_episodes == 1 and res.skipped == 1
    tag = json.loads((tmp_path / "run" / "write-back.json").read_text())["run"]
    assert _bank_ids(tmp_path / "bank")[len(twx_trajs[0]):] == [f"{i}@{tag}" for i in _run_ids(tmp_path / "run")]
    again = evaluate(cfg, model=model)  # nothing to do, nothing appended twice
    assert again.new_episodes == 0 and len(_bank_ids(tmp_path / "bank")) == len(twx_trajs[0]) + 2


def test_a_second_run_writes_back_into_the_same_bank(tmp_path, tiny, twx_trajs):
    from exprag.bank import build_bank

    path, model = tiny
    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    n0 = len(twx_trajs[0])
    retrieval = RetrievalConfig(bank=str(tmp_path / "bank"))
    first = _cfg(tmp_path, path, retrieval=retrieval, write_back=True, limit=2)
    evaluate(first, model=model)
    second = EvalConfig(**{**first.__dict__, "out": str(tmp_path / "run2")})
    evaluate(second, model=model)  # the same games and model: the same episode ids, other tags
    evaluate(first, model=model, overwrite=True)  # a run started anew is a new run too
    ids = _bank_ids(tmp_path / "bank")
    assert len(ids) == n0 + 6 and len(set(ids)) == len(ids)
    assert {i.split("@")[0] for i in ids[n0:]} == set(_run_ids(tmp_path / "run"))


def test_write_back_checks_the_bank_before_the_model_runs(tmp_path, tiny, twx_trajs, tmpfs):
    """A bank on a read-only file system is refused before any episode runs, and nothing is left."""
    from exprag.bank import build_bank
    from exprag.errors import OutputPathError

    path, model = tiny
    disk = tmpfs.mount("disk", size="8m")
    build_bank(twx_trajs[0], disk / "bank", "bm25")
    tmpfs.read_only(disk)
    cfg = _cfg(tmp_path, path, retrieval=RetrievalConfig(bank=str(disk / "bank")), write_back=True, limit=1)
    with pytest.raises(OutputPathError, match="--write-back bank is not writable"):
        evaluate(cfg, model=model)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ExpragError, match="--write-back needs a bank"):
        evaluate(_cfg(tmp_path, path, write_back=True, limit=1), model=model)


def test_task_ids_run_in_full_and_unknown_ids_are_named(tmp_path, tiny):
    from exprag.envs import make_env

    path, model = tiny
    with make_env("twx") as env:
        ids = [t.task_id for t in env.tasks("test", ["coin"])[:3]]
    res = evaluate(_cfg(tmp_path, path, task_ids=ids), model=model)  # per_type is 2: the 3 ids run
    assert sorted(r["task_id"] for r in read_results(tmp_path / "run" / "results.jsonl")) == sorted(ids)
    assert res.metrics["n"] == 3
    with pytest.raises(ExpragError, match="field 'task_ids': 'coin/nope' is not a test task of the types coin, "
                                          "simonsays of twx"):
        evaluate(_cfg(tmp_path / "b", path, task_ids=ids[:1] + ["coin/nope"]), model=model)
    assert not (tmp_path / "b" / "run").exists()  # a failed start leaves nothing


def test_a_garbled_adapter_is_refused(tmp_path, tiny):
    """Weights garbled past a valid safetensors header load without complaint from safetensors: the
    checksum exprag recorded beside an adapter it wrote names the file; without the record (an
    adapter trained elsewhere) the adapter loads as before."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from exprag.checksums import ADAPTER_SIDECAR
    from exprag.llm.hf import HFChatModel
    from exprag.train.checkpoint import load_checkpoint, save_checkpoint

    path, served = tiny
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt = save_checkpoint(net, opt, tmp_path / "train", "epoch-001", {"global_step": 1}, None, set())
    HFChatModel(path, adapter=ckpt)  # intact: loads
    weights = ckpt / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors follow the length and the JSON header
    at = start + (len(data) - start) // 2
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    weights.write_bytes(bytes(data))
    message = f"{weights}: does not match the checksum the adapter recorded when it was written"
    with pytest.raises(ExpragError, match=message):
        evaluate(_cfg(tmp_path, path, adapter=str(ckpt), limit=1))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ExpragError, match=message):  # nor serves it (exprag serve --lora-modules)
        served.load_adapter("garbled", ckpt)
    assert served.adapters == {}
    with pytest.raises(ExpragError, match=message):  # a resume does not train on from it either
        load_checkpoint(ckpt, net, opt)
    (ckpt / ADAPTER_SIDECAR).unlink()
    HFChatModel(path, adapter=ckpt)


def test_a_failed_start_leaves_nothing(tmp_path, tiny):
    """An adapter that does not load fails at the first step; the corrected command then runs."""
    path, model = tiny
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": path, "r": 8, "target_modules": ["q_proj"]}))
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExpragError, match=f"{bad / 'adapter_model.safetensors'}: unreadable adapter weights"):
        evaluate(_cfg(tmp_path, path, adapter=str(bad), limit=1))
    assert not (tmp_path / "run").exists()
    assert evaluate(_cfg(tmp_path, path, limit=1), model=model).metrics["n"] == 1


@pytest.mark.parametrize("stage", ["eval-episode", pytest.param("bank-staged", marks=pytest.mark.slow),
                                   pytest.param("bank-renamed", marks=pytest.mark.slow), "bank-switched"])
def test_kill_at_each_point_of_a_write_back(tmp_path, tiny, twx_trajs, stage):
    """`exprag eval --write-back` killed (-9) between the result row and the append, or at each step
    of the append's swap: the bank stays loadable, and the resumed run leaves each episode in it once."""
    import os
    import signal
    import subprocess
    import sys

    from exprag.bank import build_bank
    from tests.test_io import exprag, wait_for

    path, _ = tiny
    build_bank(twx_trajs[0], tmp_path / "bank", "bm25")
    argv = ["eval", "--env", "twx", "--split", "test", "--task-types", "coin,simonsays", "--per-type", "2",
            "--limit", "3", "--model", path, "--max-steps", "2", "--max-new-tokens", "6", "--batch-size", "2",
            "--bank", str(tmp_path / "bank"), "-k", "1", "--write-back", "--out", str(tmp_path / "run")]
    flag = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "exprag", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "EXPRAG_TEST_PAUSE_AT": stage, "EXPRAG_TEST_PAUSE_FILE": str(flag)})
    wait_for(flag, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_bank_ids(tmp_path / "bank")) in (len(twx_trajs[0]), len(twx_trajs[0]) + 1)  # loadable
    res = exprag(*argv)
    assert res.returncode == 0, res.stderr
    tag = json.loads((tmp_path / "run" / "write-back.json").read_text())["run"]
    ids = _bank_ids(tmp_path / "bank")
    assert sorted(ids) == sorted([t.id for t in twx_trajs[0]] + [f"{i}@{tag}" for i in _run_ids(tmp_path / "run")])
    assert len(_run_ids(tmp_path / "run")) == 3
