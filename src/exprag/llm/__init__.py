"""Chat models behind one protocol: :class:`ChatModel`.

``load_chat_model("smollm2-135m")`` runs the bundled model in-process with transformers (KV reuse
across an episode's turns, batched decoding); ``load_chat_model("NAME", backend="openai",
base_url=...)`` talks to any OpenAI-compatible server (with ``adapter=DIR``, the server's copy of
that LoRA adapter: :mod:`exprag.llm.adapters`). Heavy imports (torch, transformers) happen
only when the transformers backend is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exprag.llm.base import (
    DEFAULT_MAX_NEW_TOKENS,
    ChatModel,
    Conversation,
    Generation,
    Message,
    ModelError,
    ServerError,
)

BACKENDS = ("hf", "openai")

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_NEW_TOKENS",
    "ChatModel",
    "Conversation",
    "Generation",
    "Message",
    "ModelError",
    "ServerError",
    "load_chat_model",
]


def load_chat_model(
    spec: str,
    *,
    adapter: str | Path | None = None,
    backend: str = "hf",
    base_url: str | None = None,
    **options: Any,
) -> ChatModel:
    """Load a chat model.

    ``backend="hf"``: ``spec`` is ``smollm2-135m``, a local checkpoint directory, a ``.gguf`` file or
    a hub id in the local HF cache; ``adapter`` a PEFT LoRA directory for that base model; options go
    to :class:`exprag.llm.hf.HFChatModel` (``device``, ``dtype``, ``max_batch_size``,
    ``max_sessions``, ``kv_reuse``, ``name``).

    ``backend="openai"``: ``spec`` is the server's model name and ``base_url`` its address; options
    go to :class:`exprag.llm.openai_client.OpenAIChatModel` (``api_key``, ``timeout``,
    ``max_retries``, ``backoff``, ``concurrency``, ``send_session_ids``). ``adapter``: the request
    names the adapter's served model (:mod:`exprag.llm.adapters`); the server must list it or load it
    at run time, else a :class:`ServerError` gives the command that serves it.
    """
    if backend == "hf":
        from exprag.llm.hf import HFChatModel

        return HFChatModel(spec, adapter=adapter, **options)
    if backend == "openai":
        from exprag.llm.openai_client import OpenAIChatModel

        client = OpenAIChatModel(spec, base_url or "", **options)
        if adapter is not None:
            from exprag.llm.adapters import ensure_served

            client.name = ensure_served(client, spec, adapter)
        return client
    raise ModelError(f"unknown backend {backend!r} (choose {' or '.join(BACKENDS)})")
