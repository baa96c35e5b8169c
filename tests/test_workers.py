"""Environments in worker processes (and Ray actors): the same files as a serial run, on real TWX."""

import json
import time

import pytest

from exprag.config import EvalConfig, RetrievalConfig
from exprag.envs import make_env
from exprag.evaluate import evaluate
from exprag.expert import collect_to_file
from exprag.workers import WorkerPool, WorkerSpec

# Timing fields, the only ones that may differ between two runs of the same episodes.
_CLOCK = {"wall_s", "gen_s"}


def _collect(path, workers):
    with make_env("twx") as env:
        tasks = [t for g in ("coin", "simonsays", "arithmetic") for t in env.tasks("train", [g])[:3]]
        return collect_to_file(env, tasks, path, desc="collect", progress=False, workers=workers)


def _untimed(path):
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for d in (row, row.get("meta", {}), row.get("meta", {}).get("agent", {})):
            for k in _CLOCK:
                d.pop(k, None)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def smollm():
    from exprag.llm import load_chat_model

    return load_chat_model("smollm2-135m")


def _eval(out, model, workers):
    cfg = EvalConfig(env="twx", split="test", task_types="coin,simonsays", per_type=2, model="smollm2-135m",
                     retrieval=RetrievalConfig(), max_steps=3, max_new_tokens=8, batch_size=2, out=str(out))
    return evaluate(cfg, model=model, workers=workers)


def _same_eval(a, b):
    for name in ("results.jsonl", "trajectories.jsonl"):
        assert _untimed(a / name) == _untimed(b / name), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("updated")
        m.pop("tokens_per_s")
        for t in m["per_type"].values():
            t.pop("tokens_per_s")
    assert ma == mb


def test_collect_workers_write_the_serial_bytes(tmp_path):
    serial = _collect(tmp_path / "serial.jsonl", WorkerSpec())
    parallel = _collect(tmp_path / "parallel.jsonl", WorkerSpec(workers=2))
    assert (tmp_path / "serial.jsonl").read_bytes() == (tmp_path / "parallel.jsonl").read_bytes()
    assert serial.tasks == parallel.tasks and serial.failures == parallel.failures
    ms, mp = (json.loads(p.read_text()) for p in (serial.manifest, parallel.manifest))
    assert ms == mp


def test_collect_workers_keep_a_generator_lazy(tmp_path):
    """A task generator decides its next task from the last episode: workers play it one at a time."""
    seen = []
    with make_env("twx") as env:
        pool = env.tasks("train", ["coin"])[:3]

        def tasks():
            for t in pool:
                yield t
                assert seen and seen[-1] == t.task_id  # on_episode saw it before the next one is asked for

        done = collect_to_file(env, tasks(), tmp_path / "g.jsonl", desc="g", progress=False, manifest=False,
                               on_episode=lambda t, traj: seen.append(t.task_id), workers=WorkerSpec(workers=2))
    assert seen == [t.task_id for t in pool] and len(done.trajectories) == 3


def test_worker_errors_come_back_as_themselves():
    from exprag.envs.base import TaskSpec
    from exprag.errors import EnvError

    with WorkerPool(WorkerSpec(workers=1, ray=None)) as pool:
        (env,) = pool.make_envs("twx", {}, 1)
        with pytest.raises(EnvError, match="GAME/seedN"):
            env.reset(TaskSpec("twx", "test", "coin", "coin-no-seed"))
        assert env.name == "twx" and env.action_templates()
        env.close()


def test_eval_workers_match_serial(tmp_path, smollm):
    serial = _eval(tmp_path / "serial", smollm, WorkerSpec())
    parallel = _eval(tmp_path / "parallel", smollm, WorkerSpec(workers=2))
    assert serial.new_episodes == parallel.new_episodes == 4
    _same_eval(tmp_path / "serial", tmp_path / "parallel")
    # the run directory does not record where the envs ran: a resume with other workers skips everything
    again = _eval(tmp_path / "parallel", smollm, WorkerSpec())
    assert again.new_episodes == 0 and again.skipped == 4


def test_experiment_eval_workers_reach_the_cells():
    from exprag.experiment import _workers, experiment_config_from_dict

    grid = {"name": "w", "env": "twx", "models": ["smollm2-135m"], "out": "x",
            "grid": [{"methods": ["no_retrieval"]}]}
    assert _workers(experiment_config_from_dict(grid)) == WorkerSpec()
    cfg = experiment_config_from_dict({**grid, "eval": {"workers": 3, "ray": "local"}})
    assert _workers(cfg) == WorkerSpec(workers=3, ray="local")


@pytest.mark.slow  # about 90 s on 2 cores (Ray's head and workers start)
def test_ray_local_cluster_matches_serial(tmp_path, smollm):
    ray = pytest.importorskip("ray")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        spec = WorkerSpec(workers=2, ray="local")  # ray.init already done: the pool joins it
        _collect(tmp_path / "serial.jsonl", WorkerSpec())
        _collect(tmp_path / "ray.jsonl", spec)
        assert (tmp_path / "serial.jsonl").read_bytes() == (tmp_path / "ray.jsonl").read_bytes()
        _eval(tmp_path / "serial", smollm, WorkerSpec())
        _eval(tmp_path / "ray", smollm, spec)
        _same_eval(tmp_path / "serial", tmp_path / "ray")
    finally:
        ray.shutdown()
    print(f"ray local cluster test: {time.perf_counter() - t0:.1f}s")


def test_experiment_cell_resources_are_checked():
    from exprag.errors import DataFormatError
    from exprag.experiment import experiment_config_from_dict

    grid = {"name": "w", "env": "twx", "models": ["smollm2-135m"], "out": "x", "grid": [{"methods": ["no_retrieval"]}]}
    cfg = experiment_config_from_dict({**grid, "eval": {"ray": "local", "cell_cpus": 2, "cell_gpus": "0.5"}})
    assert (cfg.eval.cell_cpus, cfg.eval.cell_gpus) == (2.0, 0.5)
    with pytest.raises(DataFormatError, match="cell_cpus"):
        experiment_config_from_dict({**grid, "eval": {"cell_cpus": 0}})


def test_experiment_command_flags_override_eval_workers(tmp_path, monkeypatch):
    import exprag.experiment as experiment
    from exprag.cli import main

    config = tmp_path / "e.yaml"
    config.write_text("name: w\nenv: twx\neval: {workers: 2, ray: null}\ngrid: [{methods: [no_retrieval]}]\n")
    got = []
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda cfg, **kw: got.append(cfg.eval) or experiment.ExperimentResult(cfg.out_dir, []))
    out = str(tmp_path / "exp")
    assert main(["experiment", str(config), "--out", out, "--no-report", "--no-progress"]) == 0
    assert main(["experiment", str(config), "--out", out, "--no-report", "--no-progress",
                 "--ray", "local", "--workers", "3"]) == 0
    assert [(e.workers, e.ray) for e in got] == [(2, None), (3, "local")]


def test_ray_cell_refuses_a_run_dir_its_node_does_not_see(tmp_path, monkeypatch):
    """What a cell task checks before any work, run here as a plain function (no Ray): the driver's
    probe file must read back the same at the same path, else the cell directory is not touched."""
    import dataclasses

    from exprag.experiment import _cell_eval_config, experiment_config_from_dict, expand
    from exprag.ray_cells import PROBE, SharedFilesystemError, _cell_task, cell_error, write_probe

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exp"
    out.mkdir()
    shared = write_probe(out)
    assert shared.probe == str(out / PROBE) and shared.cwd == str(tmp_path)
    shared.check()  # this process sees it
    cfg = experiment_config_from_dict({"name": "w", "env": "twx", "models": ["smollm2-135m"], "out": str(out),
                                       "grid": [{"methods": ["no_retrieval"], "groups": ["hard"]}]})
    (cell,) = expand(cfg)
    ecfg = _cell_eval_config(cfg, out, cell, {}, None)
    elsewhere = [dataclasses.replace(shared, probe=str(tmp_path / "other" / PROBE)),  # not mounted there
                 dataclasses.replace(shared, token="another run's"),  # a different directory at that path
                 dataclasses.replace(shared, cwd=str(tmp_path / "absent"))]  # relative paths would not resolve
    for bad in elsewhere:
        with pytest.raises(SharedFilesystemError, match="shared filesystem") as e:
            _cell_task(bad, cell, ecfg)
        assert str(tmp_path) in str(e.value)
    assert not (out / "cells").exists()
    named = cell_error(cell.id, e.value)
    assert isinstance(named, SharedFilesystemError) and str(named).startswith(f"cell {cell.id}: ")
    assert str(cell_error(cell.id, ValueError("x"))) == f"cell {cell.id}: ValueError: x"


def _tiny_experiment(out, ray=None):
    return {"name": "cells", "env": "twx", "models": ["smollm2-135m"], "encoder": "bm25", "out": str(out),
            "main_k": 1, "data": {"train_per_type": 1, "val_per_type": 0, "test_per_type": 1},
            "eval": {"max_steps": 3, "max_new_tokens": 8, "batch_size": 4, "token_budget": 150, "ray": ray},
            "grid": [{"methods": ["no_retrieval", "exprag_frozen"], "groups": ["hard"]}]}


def _untimed_rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows


@pytest.mark.slow  # 97 s on 2 shared cores (load 4-5): serial 38 s; Ray head, the 2 cells as tasks, a failing
#                    rerun and a resume 59 s
def test_experiment_cells_as_ray_tasks_match_serial(tmp_path):
    """The serial cells are moved aside, then the same experiment directory (data and banks reused)
    runs them again as two Ray tasks at once."""
    ray = pytest.importorskip("ray")
    from exprag.errors import RunConfigError
    from exprag.experiment import experiment_config_from_dict, run_experiment

    t0 = time.perf_counter()
    out = tmp_path / "exp"
    serial = run_experiment(experiment_config_from_dict(_tiny_experiment(out)), command="pytest")
    assert serial.cells_run == 2
    (out / "cells").rename(tmp_path / "serial-cells")
    (out / "results.jsonl").rename(tmp_path / "serial-results.jsonl")
    t1 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        cfg = experiment_config_from_dict(_tiny_experiment(out, ray="local"))  # joins the head started above
        seen = []
        res = run_experiment(cfg, command="pytest", on_cell=lambda row: seen.append(row["cell"]))
        assert res.cells_run == 2 and sorted(seen) == sorted(r["cell"] for r in serial.rows)
        expected = _untimed_rows(tmp_path / "serial-results.jsonl")
        assert _untimed_rows(out / "results.jsonl") == expected  # grid order, the same episodes
        assert all(r["episodes"] and len(r["episodes"]) == r["n"] == 4 for r in res.rows)
        for row in res.rows:
            _same_eval(tmp_path / "serial-cells" / row["run_dir"].removeprefix("cells/"), out / row["run_dir"])
        assert not (out / ".ray-probe").exists()

        # A failing task names its cell; the other cell stays finished, and a rerun resumes.
        broken = out / res.rows[0]["run_dir"]
        (broken / "cell.json").unlink()
        good = (broken / "config.json").read_text()
        (broken / "config.json").write_text(good.replace('"max_steps": 3', '"max_steps": 5'))
        with pytest.raises(RunConfigError, match=f"cell {res.rows[0]['cell']}: .*max_steps"):
            run_experiment(cfg, command="pytest")
        assert (out / res.rows[1]["run_dir"] / "cell.json").is_file()
        (broken / "config.json").write_text(good)
        again = run_experiment(cfg, command="pytest")
        assert (again.cells_run, again.cells_reused) == (1, 1)
        assert _untimed_rows(out / "results.jsonl") == expected
    finally:
        ray.shutdown()
    print(f"experiment cells: serial {t1 - t0:.1f}s, as Ray tasks {time.perf_counter() - t1:.1f}s")


def test_sigterm_with_workers_ends_quietly(tmp_path):
    """SIGTERM to the process group (a scheduler stopping the job): one line, no worker tracebacks."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "exprag", "collect", "--env", "twx", "--split", "train", "--task-types", "all",
         "--per-type", "200", "--workers", "2", "--out", str(tmp_path / "o.jsonl")],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # the workers and their JVMs are up, episodes under way
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "exprag: terminated", err
    assert not (tmp_path / "o.jsonl").exists()
