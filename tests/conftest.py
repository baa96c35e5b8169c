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
