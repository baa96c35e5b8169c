"""`train --report-to tensorboard`: training loss per step, validation loss per epoch and rollout
success per selection in TensorBoard event files (RUN_DIR/tracking/<run name>); resumable."""

from __future__ import annotations

import pytest

from exprag.cli import main
from exprag.train.callbacks import check_trackers
from exprag.train.config import SelectionConfig, TrainConfig, TrainConfigError
from exprag.train.lora import train

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _cfg(files, model, out, **kw) -> TrainConfig:
    base = dict(trajectories=[files["trajectories"]], val_trajectories=[files["trajectories"]], model=str(model),
                out=str(out), epochs=1, lr=5e-3, batch_size=2, max_length=4096, log_every_steps=1,
                selection=SelectionConfig(every=1))
    base.update(kw)
    return TrainConfig(**base).validate()


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_losses_and_selection_and_resumes(short_files, tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    scores = iter([0.25, 0.75])
    # An existing run without tracking (its saved config written before report_to existed) ...
    first = train(_cfg(short_files, tiny_model, run), rollout_eval=lambda d: next(scores))
    saved = run / "train_config.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(True) if not line.startswith("report_to")))
    assert not (run / "tracking").exists()
    # ... resumed with one more epoch and TensorBoard on.
    res = train(_cfg(short_files, tiny_model, run, epochs=2, report_to="tensorboard"), resume=True,
                rollout_eval=lambda d: next(scores))
    sc = _scalars(run / "tracking" / "run")
    steps = [s for s, _ in sc["train/loss"]]
    assert steps == list(range(first.steps + 1, res.steps + 1))  # the resumed epoch's optimizer steps
    assert [s for s, _ in sc["eval/val_loss"]] == [res.steps]
    assert sc["eval/rollout_success"] == [(res.steps, 0.75)]  # epoch 1's score was the untracked run's
    assert all(v == v and v > 0 for _, v in sc["train/loss"] + sc["train/epoch_loss"])


def test_unknown_or_missing_tracker_is_a_clear_error(short_files, tiny_model, tmp_path, capsys, monkeypatch):
    with pytest.raises(TrainConfigError, match="report_to"):
        TrainConfig(report_to="tensorbord").validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.raises(TrainConfigError, match=r"exprag\[tensorboard\]"):
        check_trackers(["tensorboard"])
    out = tmp_path / "run"
    rc = main(["train", "--trajectories", short_files["trajectories"], "--model", str(tiny_model), "--out", str(out),
               "--report-to", "tensorboard"])
    assert rc == 2 and "not installed" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory is made
    assert TrainConfig().trackers() == [] and TrainConfig(report_to="tensorboard, wandb").validate().trackers() == [
        "tensorboard", "wandb"]


def test_experiment_adapter_finished_before_report_to_stays_done(tmp_path, monkeypatch):
    """An experiment's adapter marker written before report_to existed still marks it done, and
    turning tracking on never retrains a finished adapter."""
    import json

    import exprag.experiment as ex
    import exprag.train.lora as lora

    for report_to in ("none", "tensorboard"):
        tcfg = TrainConfig(trajectories=["t.jsonl"], out=str(tmp_path / "adapter"), report_to=report_to).validate()
        from exprag.train.config import to_dict
        old = to_dict(tcfg)  # the file shape, which old markers hold (the retrieval section flat)
        old.pop("report_to", None)
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / "experiment_done.json").write_text(
            json.dumps({"train_config": old, "checkpoint": "checkpoints/epoch-009"}))
        monkeypatch.setattr(ex, "_train_config", lambda *a: tcfg)
        monkeypatch.setattr(lora, "train", lambda *a, **k: pytest.fail("a finished adapter was trained again"))
        got = ex._ensure_adapter(None, tmp_path, "m", "lora", 1, {}, {}, False, lambda s: None)
        assert got == tmp_path / "adapter" / "checkpoints" / "epoch-009"
