"""Shared fixtures. Real environments and encoders; one torch thread (2 cores, shared)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def twx_trajs():
    """Real TWX expert trajectories: 3 train tasks per game, 2 test tasks per game."""
    from exprag.envs import make_env
    from exprag.expert import collect

    with make_env("twx") as env:
        train = [t for g in env.task_types() for t in env.tasks("train", [g])[:3]]
        test = [t for g in env.task_types() for t in env.tasks("test", [g])[:2]]
        return list(collect(env, train)), list(collect(env, test))


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, size="64k")`` -> a fresh tmpfs directory under tmp_path, and ``read_only(dir)`` to
    remount one read-only: a real full disk and a real read-only file system (root writes through
    mode bits, so 0555 would prove nothing here). Skipped where this process may not mount."""
    import subprocess

    mounts = []

    class Tmpfs:
        def mount(self, name: str, size: str = "64k"):
            d = tmp_path / name
            d.mkdir()
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
            mounts.append(d)
            return d

        def read_only(self, d):
            res = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr

    yield Tmpfs()
    for d in reversed(mounts):
        subprocess.run(["umount", str(d)], check=False)
