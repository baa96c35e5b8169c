"""The trainer on a tiny random model and real TWX trajectories: learning, checkpoints, resume,
selection by rollout success, reload and merge."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exprag.cli import main
from exprag.config import RetrievalConfig
from exprag.memory_block import MemorySpec
from exprag.train.config import LoraSettings, SelectionConfig, TrainConfig, TrainConfigError, load_train_config
from exprag.train.data import build_examples
import exprag.train.loop as loop
from exprag.train.lora import train
from exprag.train.loss import validation_loss
from exprag.train.model import attention_targets, merge_adapter
from exprag.train.prepare import prepare_data
from exprag.train.rundir import RunDirError
from exprag.train.select import Selection

# peft's adapter loading touches a transformers property deprecated in v5 (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def make_cfg(files, model, out, **kw) -> TrainConfig:
    base = dict(trajectories=[files["trajectories"]], model=str(model), out=str(out), epochs=2, lr=5e-3,
                batch_size=2, max_length=4096, log_every_steps=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def adapter_state(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def load_tiny(model_dir, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        m = PeftModel.from_pretrained(m, str(adapter))
    return m.eval()


def train_killed_at_step(monkeypatch, step: int, cfg: TrainConfig) -> None:
    """``train(cfg)`` interrupted during optimizer step ``step`` (its loss raises KeyboardInterrupt),
    as a kill there would; the real loss is restored afterwards."""
    real, calls = loop.lm_loss, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "lm_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "lm_loss", real)


def test_lora_steps_lower_the_training_loss(short_files, tiny_model, chatml_tok, short_trajs, tmp_path):
    cfg = make_cfg(short_files, tiny_model, tmp_path / "run", epochs=3)
    res = train(cfg)
    examples, _ = build_examples(short_trajs, chatml_tok)
    pad = chatml_tok.pad_token_id
    before = validation_loss(load_tiny(tiny_model), examples, 2, pad, "cpu")
    after = validation_loss(load_tiny(tiny_model, res.last_checkpoint), examples, 2, pad, "cpu")
    assert after < before - 0.5, (before, after)
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in epochs if e["event"] == "epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    steps = [e for e in epochs if e["event"] == "step"]
    assert steps and all(e["tokens_per_s"] > 0 for e in steps)
    # The run directory: resolved config, data report, one adapter per epoch, optimizer in the last only.
    run = tmp_path / "run"
    assert load_train_config(run / "train_config.yaml").epochs == 3
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["examples"] == len(short_trajs) and report["warnings"] == []
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch-001", "epoch-002", "epoch-003"]
    assert [(run / "checkpoints" / c / "optimizer.pt").is_file() for c in ckpts] == [False, False, True]
    assert json.loads((run / "state.json").read_text())["last"] == "checkpoints/epoch-003"


def test_adapter_reloads_changes_output_and_merges(short_files, tiny_model, tmp_path):
    from exprag.llm.hf import HFChatModel

    res = train(make_cfg(short_files, tiny_model, tmp_path / "run", epochs=1, lr=1e-2))
    ids = torch.tensor([[1, 9690, 198, 67, 2, 198, 1, 4093, 198, 69, 2]])
    with torch.no_grad():
        base = load_tiny(tiny_model)(ids).logits
        adapted = load_tiny(tiny_model, res.last_checkpoint)(ids).logits
        assert (base - adapted).abs().max() > 1e-3  # the adapter changes the model's output
        # The inference backend loads it too (and checks the adapter's base model).
        chat = HFChatModel(str(tiny_model), adapter=res.last_checkpoint, device="cpu")
        assert torch.allclose(chat.model(ids).logits, adapted, atol=1e-4)
        merged_dir = merge_adapter(res.last_checkpoint, tmp_path / "merged")
        merged = load_tiny(merged_dir)(ids).logits
        assert torch.allclose(merged, adapted, atol=1e-4)
    with pytest.raises(RunDirError, match="exists"):
        merge_adapter(res.last_checkpoint, tmp_path / "merged")


def test_exprag_lora_trains_with_memory(short_files, tiny_model, tmp_path):
    cfg = make_cfg(short_files, tiny_model, tmp_path / "run", epochs=1,
                   retrieval=RetrievalConfig(bank=short_files["bank"], memory=MemorySpec(k=2)))
    res = train(cfg)
    rep = res.data["train"]
    plain = train(make_cfg(short_files, tiny_model, tmp_path / "plain", epochs=1)).data["train"]
    assert rep["trained_tokens"] == plain["trained_tokens"]  # memory is context, never a target
    assert rep["tokens"] > 2 * plain["tokens"]


def test_resume_continues_exactly(short_files, tiny_model, tmp_path):
    straight = train(make_cfg(short_files, tiny_model, tmp_path / "a", epochs=2))
    train(make_cfg(short_files, tiny_model, tmp_path / "b", epochs=1))
    with pytest.raises(RunDirError, match="--resume"):
        train(make_cfg(short_files, tiny_model, tmp_path / "b", epochs=2))
    resumed = train(make_cfg(short_files, tiny_model, tmp_path / "b", epochs=2), resume=True)
    a, b = adapter_state(straight.last_checkpoint), adapter_state(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == straight.steps
    # A resumed run keeps its recipe.
    with pytest.raises(RunDirError, match="field 'lr'"):
        train(make_cfg(short_files, tiny_model, tmp_path / "b", epochs=3, lr=1e-3), resume=True)
    # --overwrite starts over.
    again = train(make_cfg(short_files, tiny_model, tmp_path / "b", epochs=1), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["epoch-001"]
    assert again.steps == straight.steps // 2


def test_resume_mid_epoch_after_a_crash(short_files, tiny_model, tmp_path, monkeypatch):
    cfg = dict(epochs=1, batch_size=1, save_every_steps=2)
    straight = train(make_cfg(short_files, tiny_model, tmp_path / "a", **cfg))
    # during step 4: steps 1-3 done, step-000002 saved
    train_killed_at_step(monkeypatch, 4, make_cfg(short_files, tiny_model, tmp_path / "b", **cfg))
    assert json.loads((tmp_path / "b" / "state.json").read_text())["last"] == "checkpoints/step-000002"
    resumed = train(make_cfg(short_files, tiny_model, tmp_path / "b", **cfg), resume=True)
    a, b = adapter_state(straight.last_checkpoint), adapter_state(resumed.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Step 3 was logged before the crash and redone after it: logged once.
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "step"] == list(range(1, straight.steps + 1))
    # The resumed epoch's record counts the batches before the crash too: the same loss and tokens
    # as the uninterrupted run (and the same per-step losses).
    ref = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    (ep_a,), (ep_b,) = ([r for r in rs if r["event"] == "epoch"] for rs in (ref, rows))
    assert ep_b["tokens"] == ep_a["tokens"] > 0 and ep_b["train_loss"] == ep_a["train_loss"]
    assert [r["loss"] for r in rows if r["event"] == "step"] == [r["loss"] for r in ref if r["event"] == "step"]


def test_resume_sums_a_partial_logging_window(short_files, tiny_model, tmp_path, monkeypatch):
    """A checkpoint in the middle of a logging window (3 steps per line, saved every 2): the line
    after the resume still averages all 3 steps."""
    cfg = dict(epochs=1, batch_size=1, save_every_steps=2, log_every_steps=3)
    train(make_cfg(short_files, tiny_model, tmp_path / "a", **cfg))
    # during step 3: step-000002 saved, the first window not yet logged
    train_killed_at_step(monkeypatch, 3, make_cfg(short_files, tiny_model, tmp_path / "b", **cfg))
    train(make_cfg(short_files, tiny_model, tmp_path / "b", **cfg), resume=True)
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [(r["event"], r["step"], r.get("loss"), r.get("train_loss"), r.get("tokens")) for r in b] == \
        [(r["event"], r["step"], r.get("loss"), r.get("train_loss"), r.get("tokens")) for r in a]


def test_resume_refuses_a_checkpoint_that_would_run_code(short_files, tiny_model, tmp_path):
    """optimizer.pt / rng.pt are read with weights_only=True: a crafted pickle is refused, unrun."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(make_cfg(short_files, tiny_model, run, epochs=1))
    ckpt = run / "checkpoints" / "epoch-001"
    good = (ckpt / "optimizer.pt").read_bytes()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("optimizer.pt", "rng.pt"):
        saved = (ckpt / name).read_bytes()
        torch.save({"state": Payload()}, ckpt / name)
        with pytest.raises(RunDirError, match=rf"{name}: refused.*posix.system.*weights_only=True"):
            train(make_cfg(short_files, tiny_model, run, epochs=2), resume=True)
        assert not marker.exists()
        (ckpt / name).write_bytes(saved)
    assert (ckpt / "optimizer.pt").read_bytes() == good
    assert train(make_cfg(short_files, tiny_model, run, epochs=2), resume=True).epochs_done == 2


def _action_accuracy(examples, model_dir):
    """A real rollout proxy: greedy next-token accuracy on the action tokens (teacher forced)."""

    def score(adapter_dir: Path) -> float:
        m = load_tiny(model_dir, adapter_dir)
        hit = total = 0
        with torch.no_grad():
            for ex in examples:
                pred = m(torch.tensor([ex.input_ids])).logits[0, :-1].argmax(-1)
                lab = torch.tensor(ex.labels[1:])
                mask = lab != -100
                hit += int((pred[mask] == lab[mask]).sum())
                total += int(mask.sum())
        return hit / total

    return score


def test_selection_keeps_the_best_checkpoint_by_rollout_success(short_files, tiny_model, chatml_tok,
                                                                 short_trajs, tmp_path):
    examples, _ = build_examples(short_trajs, chatml_tok)
    scored: list[tuple[str, float]] = []
    accuracy = _action_accuracy(examples, tiny_model)

    def rollout_eval(adapter_dir: Path) -> float:
        s = accuracy(adapter_dir)
        scored.append((adapter_dir.name, s))
        return s

    val = short_files["trajectories"]
    cfg = make_cfg(short_files, tiny_model, tmp_path / "run", epochs=3, val_trajectories=[val],
                   selection=SelectionConfig(every=2))
    res = train(cfg, rollout_eval=rollout_eval)
    assert [n for n, _ in scored] == ["epoch-002", "epoch-003"]  # every 2 epochs, and the last
    run = tmp_path / "run"
    hist = json.loads((run / "selection.json").read_text())
    assert [h["epoch"] for h in hist["history"]] == [2, 3]
    assert all(h["val_loss"] is not None for h in hist["history"])
    best_name = max(reversed(scored), key=lambda x: x[1])[0]  # ties: the later one
    assert os.path.realpath(run / "best") == str((run / "checkpoints" / best_name).resolve())
    assert res.best_checkpoint == run / "best"
    assert (run / "selection.png").stat().st_size > 1000
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals if e["event"] == "eval"] == [2, 3]
    # Old checkpoints may be pruned, never the best one.
    train(replace(cfg, epochs=4, keep_checkpoints=1), resume=True, rollout_eval=lambda d: 0.0)
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "epoch-004" in left and best_name in left and len(left) == 2


def test_selection_ties_go_to_the_later_checkpoint(tmp_path):
    for e in (1, 2, 3, 4):
        (tmp_path / "checkpoints" / f"epoch-{e:03d}").mkdir(parents=True)
    sel = Selection(tmp_path)
    for epoch, s in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.4)):
        sel.add(epoch, tmp_path / "checkpoints" / f"epoch-{epoch:03d}", s, val_loss=1.0 / epoch)
    assert sel.best() == tmp_path / "checkpoints" / "epoch-003"
    assert os.readlink(tmp_path / "best") == "checkpoints/epoch-003"
    assert Selection(tmp_path).has(4) and not Selection(tmp_path).has(5)  # history reloads


def test_selection_in_a_run_dir_given_relative_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/a")
    (run / "checkpoints" / "epoch-001").mkdir(parents=True)
    best = Selection(run).add(1, run / "checkpoints" / "epoch-001", 0.5)
    assert best == run / "checkpoints" / "epoch-001"
    assert os.readlink(run / "best") == "checkpoints/epoch-001" and (run / "best").resolve().is_dir()


def test_leakage_warning_for_a_test_split_bank(short_trajs, tmp_path, chatml_tok, tiny_model):
    from exprag.bank import build_bank
    from exprag.trajectory import write_jsonl

    leaky = [replace(t, id=t.id + ":test", split="test") for t in short_trajs[:2]]
    build_bank(short_trajs + leaky, tmp_path / "bank", "bm25")
    write_jsonl(tmp_path / "train.jsonl", short_trajs)
    cfg = make_cfg({"trajectories": str(tmp_path / "train.jsonl")}, tiny_model, tmp_path / "run",
                   retrieval=RetrievalConfig(bank=str(tmp_path / "bank")))
    said: list[str] = []
    _, _, report = prepare_data(cfg, chatml_tok, log=said.append)
    assert any("LEAKAGE" in s and "2 trajectories of the 'test' split" in s for s in said)
    assert report["warnings"] == [s for s in said if "LEAKAGE" in s]


def test_config_validation_names_the_field():
    with pytest.raises(TrainConfigError, match="'serialization'"):
        TrainConfig(serialization="turn").validate()
    with pytest.raises(TrainConfigError, match="needs serialization: step"):
        TrainConfig(retrieval=RetrievalConfig(bank="b", memory=MemorySpec(mode="dynamic"))).validate()
    cfg = TrainConfig()
    assert (cfg.lora, cfg.lr, cfg.weight_decay, cfg.seed) == (LoraSettings(8, 16, 0.1, None), 5e-5, 0.0, 2025)
    memory = cfg.retrieval.memory
    assert memory.k == 2 and memory.mode == "static" and memory.format == "json"


def test_attention_targets(tiny_model):
    from torch import nn

    assert attention_targets(load_tiny(tiny_model)) == ["q_proj", "k_proj", "v_proj", "o_proj"]

    class Attn(nn.Module):
        def __init__(self, out: str):
            super().__init__()
            for n in ("q_proj", "k_proj", "v_proj", out):
                setattr(self, n, nn.Linear(2, 2))

    vlm = nn.Module()
    vlm.vision_tower = nn.ModuleList([Attn("out_proj")])
    vlm.language_model = nn.ModuleList([Attn("o_proj")])
    pattern = attention_targets(vlm)
    import re

    hits = [n for n, _ in vlm.named_modules() if re.fullmatch(pattern, n)]
    assert hits == [f"language_model.0.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


def test_cli_train_refuse_resume_merge(short_files, tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--trajectories", short_files["trajectories"], "--model", str(tiny_model),
              "--bank", short_files["bank"], "--out", str(run), "--lr", "1e-3", "--max-length", "4096",
              "--no-progress"]
    argv = common + ["--epochs", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "trained 1 epochs" in out and "examples" in err
    assert main(argv) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    assert (run / "checkpoints" / "epoch-002").is_dir()
    capsys.readouterr()
    assert main(["train", "merge", "--adapter", str(run / "checkpoints" / "epoch-002"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["train", "--model", str(tiny_model), "--out", str(run)]) == 2
    assert "--trajectories" in capsys.readouterr().err


def test_selection_through_the_rollout_evaluation(short_files, tiny_model, tmp_path):
    """The default rollout_eval: exprag.evaluate on held-out TWX tasks, the adapter loaded by the
    inference backend, memory from the bank."""
    cfg = make_cfg(short_files, tiny_model, tmp_path / "run", epochs=1,
                   retrieval=RetrievalConfig(bank=short_files["bank"], memory=MemorySpec(k=1)),
                   selection=SelectionConfig(every=1, env="twx", split="dev", task_types="simonsays",
                                             per_type=2, max_steps=2, batch_size=2))
    res = train(cfg)
    run = tmp_path / "run"
    (h,) = res.history
    assert h["epoch"] == 1 and 0.0 <= h["success_rate"] <= 1.0
    ev = json.loads((run / "eval" / "epoch-001" / "config.json").read_text())
    assert ev["adapter"] == str(run / "checkpoints" / "epoch-001") and ev["split"] == "dev"
    assert ev["retrieval"]["bank"] == short_files["bank"] and ev["retrieval"]["k"] == 1
    assert len((run / "eval" / "epoch-001" / "results.jsonl").read_text().splitlines()) == 2


def test_loss_on_kept_logits_equals_the_full_loss(tiny_model, chatml_tok, short_trajs):
    """Logits only at trained positions: the same loss as transformers' own, padding included."""
    from exprag.train.data import collate
    from exprag.train.loss import lm_loss

    examples, _ = build_examples(short_trajs[:3], chatml_tok)
    batch = collate(examples, chatml_tok.pad_token_id)
    assert batch["attention_mask"].min() == 0  # rows of different lengths: padded
    n = int((batch["labels"][:, 1:] != -100).sum())
    m = load_tiny(tiny_model)
    with torch.no_grad():
        full = m(**batch, num_items_in_batch=n).loss
        kept = lm_loss(m, batch, n, keep_logits=True)
        plain = lm_loss(m, batch, n, keep_logits=False)
    assert torch.allclose(kept, full, atol=1e-5) and torch.allclose(plain, full)
