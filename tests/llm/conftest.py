"""Fixtures for the chat-model backends: a tiny random model (mechanics) and the bundled SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from exprag.llm.models import tiny_random_model

    return tiny_random_model(tmp_path_factory.mktemp("llm") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from exprag.llm.hf import HFChatModel

    return HFChatModel(str(tiny_dir), max_batch_size=4)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (converted once into the user's exprag cache, ~1 min the first time)."""
    from exprag.llm.hf import HFChatModel

    return HFChatModel("smollm2-135m", max_batch_size=4)
