"""The install boundary: `pip install exprag[twx]` (core + textworld-express) must run `exprag collect
--env twx`, so that command path imports no simulator of another env, no torch stack, no retrieval
stack. Checked in a fresh interpreter (the test process has them all loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distributions (as import names) that `collect --env twx` must not import: they are extras.
HEAVY = ("torch", "transformers", "peft", "accelerate", "trl", "sentence_transformers", "faiss", "bm25s",
         "gguf", "alfworld", "textworld", "scienceworld", "numpy", "matplotlib", "tensorboard", "ray")

_PROBE = """
import json, sys
from exprag.cli import main
rc = main(["collect", "--env", "twx", "--split", "train", "--task-types", "simonsays", "--per-type", "1",
           "--out", sys.argv[1]])
print(json.dumps({"rc": rc, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_collect_twx_imports_no_extra(tmp_path):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "t.jsonl")], capture_output=True,
                         text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    loaded = set(res["modules"])
    assert "textworld_express" in loaded  # the probe did reach the simulator
    assert not loaded & set(HEAVY), f"collect --env twx imports extras: {sorted(loaded & set(HEAVY))}"


def test_cli_help_imports_no_extra():
    probe = ("import json, sys, contextlib, io\nfrom exprag.cli import build_parser\n"
             "build_parser()\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & (set(HEAVY) | {"textworld_express"})


def test_core_dependencies_are_light():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(d) for d in project["dependencies"]}
    assert core == {"pyyaml", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"twx", "alfworld", "scienceworld", "train", "bench", "ray", "tensorboard"} <= extras.keys()
    assert {_name(d) for d in extras["twx"]} == {"textworld-express"}
    # trl is a benchmark baseline only: nothing in src imports it
    assert not any(_name(d) == "trl" for name, deps in extras.items() if name != "bench" for d in deps)
    assert all(">=" in d for d in project["dependencies"])  # ranges; exact pins live in requirements.lock


def test_lock_pins_every_extra_exactly():
    """requirements.lock pins, exactly, every third-party package pyproject names."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[name.lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {_name(d) for d in project["dependencies"]}
    named |= {_name(d) for deps in project["optional-dependencies"].values() for d in deps}
    assert named - {"exprag"} <= pins.keys(), sorted(named - {"exprag"} - pins.keys())


def _name(requirement: str) -> str:
    for sep in "<>=![; ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def test_import_exprag_is_light():
    """`import exprag` loads nothing heavy; the API's names load on first use (reading trajectories
    needs only the core install), and `help(exprag)` loads no model stack."""
    probe = ("import json, sys, pydoc\nimport exprag\n"
             "mods = lambda: sorted({m.split('.')[0] for m in sys.modules})\nbare = mods()\n"
             "exprag.read_trajectories, exprag.Trajectory, exprag.iter_trajectories\nread = mods()\n"
             "text = pydoc.render_doc(exprag)\n"
             "print(json.dumps({'bare': bare, 'read': read, 'help': mods(), 'all': exprag.__all__, 'text': text}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert not set(res["bare"]) & (set(HEAVY) | {"textworld_express"})
    assert not set(res["read"]) & (set(HEAVY) | {"textworld_express"})
    assert not set(res["help"]) & {"torch", "transformers", "peft", "accelerate", "sentence_transformers"}
    assert "Memory" in res["all"] and all(name in res["text"] for name in res["all"])
