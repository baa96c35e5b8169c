"""Bad input through the CLI, as a user types it: exit 2, one line on stderr naming the file / line /
field or flag, no traceback, and nothing created or changed on disk.

Every case fails before any model or environment is loaded (that is the point of validating at the
boundary), so the matrix costs one interpreter start per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exprag.bank import build_bank
from exprag.bank.store import bank_files
from exprag.train.config import TrainConfigError, load_train_config
from exprag.trajectory import Trajectory, read_jsonl, write_jsonl
from exprag.validate import read_json


REPO = Path(__file__).resolve().parents[1]


def traj(i: int, **over) -> dict:
    task_type = ["coin", "sorting", "simonsays"][i % 3]
    d = Trajectory(
        id=f"twx-train-{task_type}-{i}", env="twx", env_version="textworld-express==1.0", split="train",
        task_type=task_type, task_id=f"{task_type}-{i}", task=f"Your task is to play {task_type} number {i}.",
        messages=[{"role": "user", "content": f"Your task is to play {task_type}. You are in a room."},
                  {"role": "assistant", "content": "look around"},
                  {"role": "user", "content": "You see a door."}],
        success=True, reward=1.0, num_steps=1, source="expert",
    ).to_dict()
    d.update(over)
    return d


def lines(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of good and bad inputs, and a good and a corrupt bank."""
    d = tmp_path_factory.mktemp("bad-input")
    good = [Trajectory.from_dict(traj(i)) for i in range(6)]
    write_jsonl(d / "good.jsonl", good)
    build_bank(good, d / "bank", "bm25", sources=[d / "good.jsonl"], retrieval="bm25")
    build_bank(good, d / "dense-bank", "minilm", sources=[d / "good.jsonl"], retrieval="dense")
    emb = bank_files(d / "dense-bank") / "static" / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[: emb.stat().st_size // 2])  # a copy cut short
    (d / "manifest-bank").mkdir()
    (d / "manifest-bank" / "manifest.json").write_text('{"format": "exprag-bank", ')
    files = {
        "bad-json.jsonl": lines(traj(0)) + '{"id": "x", \n',
        "bad-type.jsonl": lines(traj(0), traj(1, success="yes")),
        "nonutf8.jsonl": lines(traj(0)).encode() + b'{"id": "caf\xe9"}\n',
        "deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
        "schema0.jsonl": lines(traj(0, schema_version=0)),
        "nan.jsonl": lines(traj(0)) + json.dumps(traj(1, reward=float("nan"))) + "\n",
        "dup.jsonl": lines(traj(7), traj(0)),
        "empty.jsonl": "",
        "failures.jsonl": lines(traj(0, success=False)),
        "nonutf8.json": b'[{"role": "user", "content": "caf\xe9"}]',
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "afile": "not a directory\n",
        "eval-neg.yaml": "env: twx\nper_type: -1\n",
        "eval-k.yaml": "env: twx\nretrieval:\n  k: -1\n",
        "eval-words.yaml": "env: twx\nmax_steps: many\n",
        "eval-tag.yaml": "env: !!python/object/apply:os.system ['echo pwned']\n",
        "eval-unknown.yaml": "env: twx\nsteps: 3\n",
        "eval-deep.yaml": "env: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "eval-nonutf8.yaml": b"env: caf\xe9\n",
        "eval-envarg.yaml": "env: twx\nenv_args: {colour: red}\n",
        "eval-tilde.yaml": "env: twx\nout: '~/runs/x'\n",
        "train-epochs.yaml": 'epochs: "one"\n',
        "train-zero.yaml": "epochs: 0\n",
        "train-lora.yaml": "lora:\n  r: 0\n",
        "train-bool.yaml": "only_successful: maybe\n",
        "train-list.yaml": "val_trajectories: [1, 2]\n",
    }
    deep_meta: dict = {}
    for _ in range(900):  # loads, but overflowed the recursion of every later copy of the record
        deep_meta = {"a": deep_meta}
    files["deep-meta.jsonl"] = json.dumps({**traj(0), "meta": deep_meta}) + "\n"
    for name, content in files.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    os.mkfifo(d / "fifo.jsonl")  # would block a reader forever
    (d / "loop.jsonl").symlink_to(d / "loop.jsonl")
    for name, pointer in (("garbled-bank", b"\xff\xfe v-2026\n"), ("linked-bank", None)):
        build_bank(good, d / name, "bm25", retrieval="bm25")
        (d / name / "CURRENT").unlink()
        if pointer is None:  # a link to someone else's file: its content must not be printed
            (d / name / "CURRENT").symlink_to(d / "afile")
        else:
            (d / name / "CURRENT").write_bytes(pointer)
    return d


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and mtime: what a failed command must not touch."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


TRAIN = ["train", "--trajectories", "{d}/good.jsonl", "--model", "smollm2-135m", "--out", "{d}/run"]
EVAL = ["eval", "--env", "twx", "--per-type", "1", "--out", "{d}/run"]
QUERY = ["bank", "query", "{d}/bank", "--task", "find the coin"]
BUILD = ["bank", "build", "--encoder", "bm25", "--out", "{d}/new-bank", "--trajectories"]

# (id, argv, what stderr must say)
CASES = [
    # numeric flags: counts >= 1, k >= 0, budgets > 0, max-steps >= 1
    ("collect-per-type-neg", ["collect", "--env", "twx", "--per-type", "-1", "--out", "{d}/o.jsonl"],
     "argument --per-type: must be an integer >= 1, got -1"),
    ("collect-per-type-0", ["collect", "--env", "twx", "--per-type", "0", "--out", "{d}/o.jsonl"],
     "argument --per-type: must be an integer >= 1, got 0"),
    ("collect-limit-neg", ["collect", "--env", "twx", "--limit", "-2", "--out", "{d}/o.jsonl"],
     "argument --limit: must be an integer >= 1, got -2"),
    ("collect-per-type-text", ["collect", "--env", "twx", "--per-type", "two", "--out", "{d}/o.jsonl"],
     "argument --per-type: must be an integer >= 1, got 'two'"),
    ("eval-per-type-neg", ["eval", "--env", "twx", "--per-type", "-1", "--out", "{d}/run"], "argument --per-type"),
    ("eval-limit-0", EVAL + ["--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    ("eval-k-neg", EVAL + ["-k", "-1"], "argument -k: must be an integer >= 0, got -1"),
    ("eval-token-budget-0", EVAL + ["--token-budget", "0"], "argument --token-budget"),
    ("eval-max-steps-0", EVAL + ["--max-steps", "0"], "argument --max-steps: must be an integer >= 1"),
    ("eval-batch-size-0", EVAL + ["--batch-size", "0"], "argument --batch-size"),
    ("eval-max-new-tokens-0", EVAL + ["--max-new-tokens", "0"], "argument --max-new-tokens"),
    ("query-k-neg", QUERY + ["-k", "-3"], "argument -k: must be an integer >= 0, got -3"),
    ("query-budget-0", QUERY + ["--token-budget", "0"], "argument --token-budget"),
    ("retrieval-k-0", ["bank", "eval-retrieval", "{d}/bank", "--queries", "{d}/good.jsonl", "-k", "0"],
     "argument -k: must be an integer >= 1"),
    ("build-dense-weight-neg", BUILD + ["{d}/good.jsonl", "--dense-weight", "-1"], "argument --dense-weight"),
    ("build-alpha-0", BUILD + ["{d}/good.jsonl", "--alpha", "0"], "argument --alpha: must be a number > 0"),
    ("train-epochs-0", TRAIN + ["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    ("train-lr-nan", TRAIN + ["--lr", "nan"], "argument --lr: must be a number > 0 (finite)"),
    ("train-lr-neg", TRAIN + ["--lr=-1e-4"], "argument --lr: must be a number > 0"),
    ("train-fraction", TRAIN + ["--empty-memory-fraction", "1.5"], "argument --empty-memory-fraction"),
    ("train-k-neg", TRAIN + ["-k", "-1"], "argument -k"),
    ("train-eval-per-type-0", TRAIN + ["--eval-per-type", "0"], "argument --eval-per-type"),
    ("alfworld-per-type-0", ["alfworld", "generate", "--per-type", "0", "--out", "{d}/games"],
     "argument --per-type"),
    ("quickstart-per-type-0", ["quickstart", "--per-type", "0", "--out", "{d}/qs"], "argument --per-type"),
    ("quickstart-games-0", ["quickstart", "--games-per-type", "0", "--out", "{d}/qs"], "argument --games-per-type"),
    ("serve-port", ["serve", "--model", "smollm2-135m", "--port", "70000"], "argument --port"),
    # config files: the same rules, with the file and field named; YAML tags and unknown fields refused
    ("eval-yaml-neg", ["eval", "--config", "{d}/eval-neg.yaml", "--out", "{d}/run"],
     "eval-neg.yaml: field 'per_type' must be an integer >= 1, got -1"),
    ("eval-yaml-k", ["eval", "--config", "{d}/eval-k.yaml", "--out", "{d}/run"],
     "eval-k.yaml.retrieval: field 'k' must be an integer >= 0, got -1"),
    ("eval-yaml-words", ["eval", "--config", "{d}/eval-words.yaml", "--out", "{d}/run"],
     "eval-words.yaml: field 'max_steps' must be an integer >= 1, got 'many'"),
    ("eval-yaml-tag", ["eval", "--config", "{d}/eval-tag.yaml", "--out", "{d}/run"], "eval-tag.yaml:1: invalid YAML"),
    ("eval-yaml-unknown", ["eval", "--config", "{d}/eval-unknown.yaml", "--out", "{d}/run"],
     "eval-unknown.yaml: unknown field 'steps'"),
    ("eval-yaml-deep", ["eval", "--config", "{d}/eval-deep.yaml", "--out", "{d}/run"],
     "eval-deep.yaml: YAML nested too deeply"),
    ("eval-yaml-nonutf8", ["eval", "--config", "{d}/eval-nonutf8.yaml", "--out", "{d}/run"],
     "eval-nonutf8.yaml: not UTF-8 text"),
    ("eval-yaml-env-args", ["eval", "--config", "{d}/eval-envarg.yaml", "--out", "{d}/run"],
     "--env-arg 'colour': twx takes no such option"),
    ("eval-yaml-missing", ["eval", "--config", "{d}/nope.yaml"], "nope.yaml: no such config file"),
    ("train-yaml-words", ["train", "--config", "{d}/train-epochs.yaml", *TRAIN[1:]],
     "train-epochs.yaml: field 'epochs' must be an integer >= 1, got 'one'"),
    ("train-yaml-zero", ["train", "--config", "{d}/train-zero.yaml", *TRAIN[1:]],
     "train-zero.yaml: field 'epochs' must be an integer >= 1, got 0"),
    ("train-yaml-lora", ["train", "--config", "{d}/train-lora.yaml", *TRAIN[1:]],
     "train-lora.yaml.lora: field 'r' must be an integer >= 1, got 0"),
    ("train-yaml-bool", ["train", "--config", "{d}/train-bool.yaml", *TRAIN[1:]],
     "train-bool.yaml: field 'only_successful' must be true or false, got 'maybe'"),
    ("train-yaml-list", ["train", "--config", "{d}/train-list.yaml", *TRAIN[1:]],
     "train-list.yaml: field 'val_trajectories' must be a list of strings"),
    # a failed start leaves no run directory (model, adapter, bank, env args, data files, --out)
    ("eval-model-missing", ["eval", "--env", "twx", "--model", "/nonexistent", "--out", "{d}/run"],
     "model '/nonexistent': no such directory"),
    ("eval-adapter-missing", EVAL + ["--adapter", "{d}/no-adapter"], "no-adapter: no adapter_config.json"),
    ("eval-bank-missing", EVAL + ["--bank", "{d}/no-bank"], "no-bank: no bank directory"),
    ("eval-bank-truncated", EVAL + ["--bank", "{d}/dense-bank"],
     "static/embeddings.npy: does not match the checksum the bank recorded"),
    ("eval-bank-manifest", EVAL + ["--bank", "{d}/manifest-bank"], "manifest.json:1: invalid JSON"),
    ("eval-env-arg-unknown", EVAL + ["--env-arg", "colour=red"], "--env-arg 'colour': twx takes no such option"),
    ("eval-env-arg-text", EVAL + ["--env-arg", "env_step_limit=lots"], "--env-arg 'env_step_limit': must be an integer"),
    ("eval-env-arg-form", EVAL + ["--env-arg", "colour"], "--env-arg 'colour' is not KEY=VALUE"),
    ("eval-alfworld-data", ["eval", "--env", "alfworld", "--env-arg", "data_dir={d}/no-games", "--out", "{d}/run"],
     "no ALFWorld games under"),
    ("eval-out-file", ["eval", "--env", "twx", "--out", "{d}/afile"], "exists and is not a directory"),
    ("eval-openai-no-url", EVAL + ["--backend", "openai"], "the openai backend needs --base-url"),
    ("eval-task-type", ["eval", "--env", "twx", "--task-types", "nope", "--out", "{d}/run"], "unknown task type 'nope'"),
    ("train-model-missing", ["train", "--trajectories", "{d}/good.jsonl", "--model", "/nonexistent", "--out", "{d}/run"],
     "model '/nonexistent': no such directory"),
    ("train-data-missing", ["train", "--trajectories", "{d}/no.jsonl", "--model", "smollm2-135m", "--out", "{d}/run"],
     "no.jsonl: no such file"),
    ("train-data-bad", ["train", "--trajectories", "{d}/bad-type.jsonl", *TRAIN[3:]],
     "bad-type.jsonl:2: field 'success' must be a boolean"),
    ("train-val-bad", TRAIN + ["--val-trajectories", "{d}/bad-json.jsonl"], "bad-json.jsonl:2: invalid JSON"),
    ("train-only-failures", ["train", "--trajectories", "{d}/failures.jsonl", *TRAIN[3:]],
     "no trainable trajectories in"),
    ("train-bank-missing", TRAIN + ["--bank", "{d}/no-bank"], "no-bank: no bank directory"),
    ("train-out-file", ["train", "--trajectories", "{d}/good.jsonl", "--model", "smollm2-135m", "--out", "{d}/afile"],
     "exists and is not a directory"),
    # input files: malformed, non-UTF-8, absurdly nested, out-of-range values, duplicates, empty
    ("build-bad-json", BUILD + ["{d}/bad-json.jsonl"], "bad-json.jsonl:2: invalid JSON"),
    ("build-bad-type", BUILD + ["{d}/bad-type.jsonl"], "bad-type.jsonl:2: field 'success' must be a boolean"),
    ("build-nonutf8", BUILD + ["{d}/nonutf8.jsonl"], "nonutf8.jsonl:2: not UTF-8 text"),
    ("build-deep", BUILD + ["{d}/deep.jsonl"], "deep.jsonl:1: invalid JSON (nested too deeply)"),
    ("build-deep-meta", BUILD + ["{d}/deep-meta.jsonl"], "deep-meta.jsonl:1: field 'meta' is nested deeper than"),
    ("build-dir", BUILD + ["{d}"], ": is a directory, not a file"),
    ("build-fifo", BUILD + ["{d}/fifo.jsonl"], "fifo.jsonl: is not a regular file"),
    ("build-link-loop", BUILD + ["{d}/loop.jsonl"], "loop.jsonl: is a symbolic link to nothing"),
    ("query-current-garbled", ["bank", "query", "{d}/garbled-bank", "--task", "x"],
     "CURRENT: names bytes that are not UTF-8 text, which is not a version of this bank"),
    ("query-current-link", ["bank", "query", "{d}/linked-bank", "--task", "x"], "CURRENT: is a symbolic link"),
    ("build-schema-0", BUILD + ["{d}/schema0.jsonl"], "schema0.jsonl:1: field 'schema_version' must be an integer >= 1"),
    ("build-nan-reward", BUILD + ["{d}/nan.jsonl"], "nan.jsonl:2: field 'reward' must be a finite number"),
    ("build-duplicate-id", BUILD + ["{d}/good.jsonl", "{d}/dup.jsonl"],
     "dup.jsonl:2: field 'id' 'twx-train-coin-0' duplicates the trajectory at"),
    ("build-empty", BUILD + ["{d}/empty.jsonl"], "empty.jsonl: no trajectories to build a bank from"),
    ("build-only-success", BUILD + ["{d}/failures.jsonl", "--only-success"],
     "failures.jsonl: no successful trajectories"),
    ("build-missing", BUILD + ["{d}/no.jsonl"], "no.jsonl: no such file"),
    ("build-out-file", ["bank", "build", "--encoder", "bm25", "--trajectories", "{d}/good.jsonl", "--out", "{d}/afile"],
     "exists and is not a directory"),
    ("collect-env-arg-value", ["collect", "--env", "alfworld", "--env-arg", "gen_per_type=abc", "--per-type", "1",
                               "--out", "{d}/o.jsonl"], "option gen_per_type must be an integer >= 1, got 'abc'"),
    ("collect-out-under-file", ["collect", "--env", "twx", "--per-type", "1", "--out", "{d}/afile/o.jsonl"],
     "is not a directory"),
    ("collect-env-arg", ["collect", "--env", "twx", "--env-arg", "colour=red", "--out", "{d}/o.jsonl"],
     "--env-arg 'colour': twx takes no such option"),
    ("collect-unknown-env", ["collect", "--env", "minigrid", "--out", "{d}/o.jsonl"], "unknown env 'minigrid'"),
    ("export-bad", ["export", "--trajectories", "{d}/bad-type.jsonl", "--format", "sharegpt", "--out", "{d}/o.jsonl"],
     "bad-type.jsonl:2: field 'success'"),
    ("export-out-dir", ["export", "--trajectories", "{d}/good.jsonl", "--format", "openai", "--out", "{d}/bank"],
     "bank: --out is a directory"),
    # bank query: the query itself, the history file, the bank
    ("query-empty-task", ["bank", "query", "{d}/bank", "--task", ""], "--task is empty"),
    ("query-blank-task", ["bank", "query", "{d}/bank", "--task", "   "], "--task is empty"),
    ("query-history-nonutf8", QUERY + ["--mode", "dynamic", "--history", "{d}/nonutf8.json"],
     "nonutf8.json: not UTF-8 text"),
    ("query-history-deep", QUERY + ["--mode", "dynamic", "--history", "{d}/deep.json"],
     "deep.json: invalid JSON (nested too deeply)"),
    ("query-history-missing", QUERY + ["--mode", "dynamic", "--history", "{d}/no.json"], "no.json: no such file"),
    ("query-truncated-index", ["bank", "query", "{d}/dense-bank", "--task", "find the coin"],
     "static/embeddings.npy: does not match the checksum the bank recorded"),
    ("info-truncated-index", ["bank", "info", "{d}/dense-bank"],
     "static/embeddings.npy: does not match the checksum the bank recorded"),
    ("query-manifest", ["bank", "query", "{d}/manifest-bank", "--task", "x"], "manifest.json:1: invalid JSON"),
    ("query-encoder", QUERY + ["--encoder", "minilm"], "'bm25' but 'minilm' was asked for"),
    ("info-not-bank", ["bank", "info", "{d}/afile"], "no bank directory here"),
    ("unknown-flag", ["eval", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("experiment-out-file", ["experiment", str(REPO / "configs" / "small-cpu.yaml"), "--out", "{d}/afile"],
     "exists and is not a directory"),
    ("report-out-file", ["report", "{d}/bank", "--out", "{d}/afile"], "exists and is not a directory"),
    ("eval-out-tilde", ["eval", "--config", "{d}/eval-tilde.yaml"], "~/runs/x: --out starts with '~'"),
    ("build-out-tilde", ["bank", "build", "--encoder", "bm25", "--out", "~/b", "--trajectories", "{d}/good.jsonl"],
     "~/b: --out starts with '~', which only a shell expands"),
]


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exprag", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("argv, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(ws, argv, expect):
    argv = [a.replace("{d}", str(ws)) for a in argv]
    before = snapshot(ws)
    res = run_cli(argv, ws)
    err = res.stderr
    assert res.returncode == 2, (res.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert expect in err, err
    assert snapshot(ws) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: mode 0555 for a normal user; for root (who writes through
    mode bits) a read-only tmpfs mounted there, skipped where mounting is not allowed."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root writes through mode bits and cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_read_only_out_refused_before_work(read_only_dir, tmp_path):
    """collect into a directory it cannot write fails before the expert runs."""
    ro = read_only_dir
    res = run_cli(["collect", "--env", "twx", "--per-type", "1", "--out", str(ro / "o.jsonl")], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{ro / 'o.jsonl'}: --out is not writable" in res.stderr
    assert res.stderr.count("\n") == 1 and list(ro.iterdir()) == []


def test_debug_shows_the_traceback(ws):
    res = run_cli(["--debug", "bank", "query", str(ws / "dense-bank"), "--task", "x"], ws)
    assert res.returncode != 0 and "Traceback" in res.stderr and "BankError" in res.stderr
    res = run_cli(["bank", "query", str(ws / "dense-bank"), "--task", "x", "--debug"], ws)
    assert "Traceback" in res.stderr


def test_yaml_numbers_written_as_text_are_accepted(tmp_path):
    """PyYAML reads ``5e-5`` (no dot) and quoted numbers as strings: the values users mean are kept."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text('lr: 5e-5\nepochs: "2"\nweight_decay: 0\nlora:\n  dropout: "0.05"\nretrieval:\n  k: "1"\n')
    c = load_train_config(cfg, {"trajectories": ["x.jsonl"]})
    assert (c.lr, c.epochs, c.weight_decay, c.lora.dropout, c.retrieval.memory.k) == (5e-5, 2, 0.0, 0.05, 1)
    assert isinstance(c.epochs, int) and isinstance(c.lr, float)
    with pytest.raises(TrainConfigError, match="field 'batch_size' must be an integer >= 1, got 0"):
        load_train_config(None, {"batch_size": 0})


@pytest.mark.slow
def test_a_corrected_start_runs_after_a_failed_one(tmp_path):
    """A failed start leaves no run directory behind, so the corrected command is not refused as a
    change of config."""
    out = tmp_path / "run"
    bad = run_cli(["eval", "--env", "twx", "--task-types", "coin", "--per-type", "1", "--model", "/nonexistent",
                   "--out", str(out)], tmp_path)
    assert bad.returncode == 2 and not out.exists()
    good = run_cli(["eval", "--env", "twx", "--task-types", "coin", "--per-type", "1", "--max-steps", "1",
                    "--max-new-tokens", "4", "--batch-size", "1", "--out", str(out)], tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model"] == "smollm2-135m"
    assert len(read_jsonl(out / "trajectories.jsonl")) == 1


def test_truncated_embeddings_detected_by_the_library(ws):
    from exprag.bank import load_bank
    from exprag.errors import BankError

    bank = load_bank(ws / "dense-bank")
    with pytest.raises(BankError, match="static/embeddings.npy: does not match the checksum"):
        bank.index("static")
    assert np.load(bank_files(ws / "dense-bank") / "dynamic" / "embeddings.npy").shape[0] == 6  # the intact one reads
    assert read_json(bank_files(ws / "bank") / "manifest.json")["count"] == 6


def test_a_full_disk_names_the_output(ws, tmpfs):
    """No space left while writing a bank: one line naming the file, exit 2, no internal error."""
    disk = tmpfs.mount("full", size="16k")
    res = run_cli(["bank", "build", "--encoder", "bm25", "--out", str(disk / "bank"), "--trajectories",
                   str(ws / "good.jsonl")], ws)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"exprag: error: {disk / 'bank'}") and "No space left on device" in res.stderr


def test_a_closed_pipe_ends_quietly(ws):
    """`exprag bank query ... | head -1`: the reader goes away; no traceback, no internal error."""
    proc = subprocess.Popen([sys.executable, "-m", "exprag", "bank", "query", str(ws / "bank"), "--task", "x",
                             "-k", "6", "--memory"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ws)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and err == "", err
