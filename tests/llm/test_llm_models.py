"""Model resolution: the bundled GGUF, the conversion cache (atomic, race-safe), local paths."""

from __future__ import annotations

import threading
import time

import pytest

from exprag.llm import ModelError
from exprag.llm import models
from exprag.llm.models import MARKER, bundled_gguf_path, cache_dir, ensure_converted, is_converted, resolve_model


def test_bundled_gguf_is_found_without_importing_its_package():
    path = bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPRAG_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def _fake_converter(calls, fail=False):
    def convert(gguf, out):
        calls.append(out)
        time.sleep(0.2)  # long enough for the racers to pile up on the lock
        if fail:
            raise RuntimeError("disk full")
        (out / "config.json").write_text("{}")
        (out / MARKER).write_text("{}")

    return convert


def test_conversion_runs_once_when_processes_race(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "models" / "m"
    results = []
    racers = [threading.Thread(target=lambda: results.append(ensure_converted(gguf, target))) for _ in range(4)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert results == [target] * 4 and len(calls) == 1 and is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]  # no temp dir left


def test_failed_conversion_leaves_no_partial_checkpoint(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, fail=True))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(gguf, target)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [".m.lock"]
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert ensure_converted(gguf, target) == target and is_converted(target)


def test_local_directory_and_gguf_specs(tiny_dir, monkeypatch, tmp_path):
    r = resolve_model(str(tiny_dir))
    assert r.path == tiny_dir and r.name == str(tiny_dir)
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    monkeypatch.setenv("EXPRAG_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Other-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    r = resolve_model(str(gguf))
    assert r.path.parent == tmp_path / "cache" / "models" and r.path.name.startswith("Other-Model.Q8_0-")
    assert resolve_model(str(gguf)).path == r.path and len(calls) == 1  # converted once, then cached


def test_unknown_hub_id_says_how_to_use_a_local_path():
    with pytest.raises(ModelError) as e:
        resolve_model("some-org/not-downloaded")
    msg = str(e.value)
    assert "offline" in msg and "huggingface-cli download some-org/not-downloaded" in msg and "--model DIR" in msg


@pytest.mark.slow
def test_real_gguf_conversion_race_between_processes(tmp_path):
    """Two processes resolve the bundled model into an empty cache at once: one converts, both get
    the same complete checkpoint, which computes what the GGUF-loaded model computes."""
    import os
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = dict(os.environ, EXPRAG_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    code = "from exprag.llm.models import resolve_model; print(resolve_model('smollm2-135m').path)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    target = tmp_path / "models" / "smollm2-135m"
    assert outs[0] == str(target) and is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]

    gguf = bundled_gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    conv = [{"role": "user", "content": "Name a fruit."}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text == ref_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
