"""LoRA adapters behind an OpenAI-compatible server: one served name per adapter directory.

A server that serves LoRA adapters (vLLM ``--enable-lora --lora-modules NAME=DIR``, ``exprag serve
--lora-modules NAME=DIR``) answers a request whose ``model`` is NAME with the adapter applied. exprag
derives NAME from the adapter directory itself (:func:`served_name`: its folder names plus a hash of
its absolute path), so the name is stable across runs and processes and two checkpoints never share
one; the server and exprag need no shared mapping file.

Before the first request of an adapter the client checks that the server lists NAME (``GET
/v1/models``); when it does not, it asks the server to load it (``POST /v1/load_lora_adapter``, which
``exprag serve --runtime-lora`` and vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` accept), and
when that is refused too it fails with the exact command that serves the adapter.

``python -m exprag.llm.adapters DIR...`` prints the ``NAME=DIR`` pairs for ``--lora-modules``.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from exprag.llm.base import ModelError, ServerError

if TYPE_CHECKING:  # the client imports this module
    from exprag.llm.openai_client import OpenAIChatModel

PREFIX = "lora-"


def adapter_path(adapter: str | Path) -> Path:
    """The absolute adapter directory, checked to be a PEFT adapter (the server reads it by path)."""
    path = Path(adapter).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    return path


def served_name(adapter: str | Path) -> str:
    """``lora-<run>-<checkpoint>-<8 hex of the absolute path>``, e.g. ``lora-lora-s2025-epoch-002-1a2b3c4d``
    for an experiment's ``adapters/<model>/lora-s2025/checkpoints/epoch-002``: readable in the server's
    model list, unique through the hash."""
    path = Path(adapter).expanduser().resolve()
    label = "-".join(p for p in path.parts[-3:] if p not in ("checkpoints", "/"))
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:48] or "adapter"
    return f"{PREFIX}{label}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def lora_modules(adapters: Iterable[str | Path]) -> list[str]:
    """``NAME=DIR`` arguments for ``--lora-modules``, one per distinct adapter, in order."""
    seen: dict[str, str] = {}
    for a in adapters:
        path = Path(a).expanduser().resolve()
        seen.setdefault(served_name(path), str(path))
    return [f"{n}={p}" for n, p in seen.items()]


def serve_command(model: str, adapters: Iterable[str | Path]) -> str:
    """The command that serves ``model`` with ``adapters`` through vLLM (scripts/serve_vllm.sh)."""
    mods = lora_modules(adapters)
    args = ["scripts/serve_vllm.sh", "--model", model] + (["--lora-modules", *mods] if mods else [])
    return " ".join(shlex.quote(a) for a in args)


def ensure_served(client: OpenAIChatModel, model: str, adapter: str | Path) -> str:
    """Make sure the server behind ``client`` serves ``adapter``; returns its served name.

    Listed already: nothing to do. Else the server is asked to load it at run time; a server that
    cannot (vLLM without runtime LoRA updating, a server without LoRA) is a :class:`ServerError`
    carrying the command that serves it."""
    path = adapter_path(adapter)
    name = served_name(path)
    if name in client.list_models():
        return name
    refused = client.load_lora_adapter(name, str(path))
    if name in client.list_models():
        return name
    raise ServerError(
        f"the server at {client.base_url} does not serve adapter {path} (model name {name!r}) and did not "
        f"load it at run time ({refused or 'loaded, yet not listed'}). Restart it with the adapter: "
        f"`{serve_command(model, [path])}` (vLLM; or `exprag serve --model {shlex.quote(model)} "
        f"--lora-modules {lora_modules([path])[0]}`), or enable runtime loading "
        f"(vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; exprag serve: --runtime-lora)"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m exprag.llm.adapters ADAPTER_DIR...  (prints NAME=DIR for --lora-modules)")
        return 0 if argv else 2
    for module in lora_modules(argv):
        print(module)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
