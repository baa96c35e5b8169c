"""Experience for any agent: an OpenAI-compatible memory proxy (``exprag serve --bank BANK``).

An agent written elsewhere talks to ``/v1/chat/completions`` as to any OpenAI-compatible server.
For each request the proxy retrieves the top-K trajectories of the bank for the task and puts the
memory block into the system prompt exactly as ``exprag eval``'s agent does (``exprag.prompt``: the
block is the system prompt's last part, after a blank line), then answers with exprag's own model or
forwards the request to an upstream server (vLLM, another ``exprag serve``; streaming passes through).
This is how an ExpRAG-LoRA adapter, served upstream by name, gets its memory behind an agent
framework that knows nothing of exprag.

The task is the conversation's first user turn, or the request's ``exprag.task``. Static mode
retrieves from the task; dynamic mode from the task and the conversation so far (its user and
assistant turns, as the agent's dynamic query reads an episode). Per request, an ``exprag`` object in
the body (removed before the model sees the body) may set ``k``, ``mode``, ``task``, or ``bank:
false`` for no memory.

Write-back: ``POST /v1/exprag/episodes`` with ``{"messages": [...], "success": true}`` (optionally
``task``, ``task_type``, ``id``, ``reward``) appends the finished episode to the bank, under the
bank's lock, and later requests can retrieve it.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from exprag.bank import Retriever, append_to_bank, load_bank
from exprag.errors import DataFormatError
from exprag.llm.server import BadRequest, message_text
from exprag.memory_block import MemorySpec, approx_tokens, memory_block
from exprag.trajectory import Trajectory

MODES = ("static", "dynamic")
EPISODES_ROUTE = "/v1/exprag/episodes"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise BadRequest("'messages' must be a non-empty list of objects")
    return msgs


class MemoryProxy:
    """Retrieval and write-back for requests to a served model. ``bank``: a bank directory;
    ``spec``: the memory the agent would see (K, mode, format, token budget); ``count_tokens``:
    how a token budget counts (the served model's tokenizer when there is one)."""

    def __init__(self, bank: str | Path, spec: MemorySpec,
                 count_tokens: Callable[[str], int] = approx_tokens) -> None:
        self.spec = spec
        self.count_tokens = count_tokens
        self.retriever = Retriever(load_bank(bank))
        self.retriever.bank.index(spec.mode)  # a corrupt index fails at start, not at the first request
        self._lock = threading.Lock()  # one write-back at a time from this process

    @property
    def bank(self):
        return self.retriever.bank

    def settings(self, body: dict[str, Any]) -> tuple[MemorySpec | None, str | None]:
        """The request's memory (None: none) and task, from its ``exprag`` field (removed)."""
        extra = body.pop("exprag", None) or {}
        if not isinstance(extra, dict):
            raise BadRequest("'exprag' must be an object: {k, mode, task, bank}")
        unknown = set(extra) - {"k", "mode", "task", "bank"}
        if unknown:
            raise BadRequest(f"'exprag.{sorted(unknown)[0]}' is not a setting (k, mode, task, bank)")
        if extra.get("bank", True) is False:
            return None, None
        k, mode, task = extra.get("k", self.spec.k), extra.get("mode", self.spec.mode), extra.get("task")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest("'exprag.k' must be an integer >= 0")
        if mode not in MODES:
            raise BadRequest("'exprag.mode' must be static or dynamic")
        if task is not None and (not isinstance(task, str) or not task.strip()):
            raise BadRequest("'exprag.task' must be a non-empty string")
        spec = MemorySpec(k, mode, self.spec.format, self.spec.token_budget)
        return (spec if k > 0 else None), task

    def block(self, task: str, history: list[dict[str, str]] | None, spec: MemorySpec) -> str:
        """The memory block ``exprag eval`` builds for ``task`` (and, dynamic, the episode so far)."""
        (hits,) = spec.retrieve(self.retriever, [(task, history if spec.mode == "dynamic" else None)],
                                None, self.count_tokens)
        return memory_block(hits, spec.format)

    def rewrite(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request with the memory block in its system prompt (a new system turn when it has none)."""
        spec, task = self.settings(body)
        if spec is None:
            return body
        msgs = _messages(body)
        turns = [(i, m) for i, m in enumerate(msgs) if m.get("role") in ("user", "assistant")]
        if task is None:
            first_user = next((m for _, m in turns if m.get("role") == "user"), None)
            if first_user is None:
                raise BadRequest("no user turn to take the task from (or give 'exprag.task')")
            task = message_text(first_user.get("content"), "messages[first user turn]")
        history = [{"role": m["role"], "content": message_text(m.get("content"), f"messages[{i}]")} for i, m in turns]
        block = self.block(task, history, spec)
        if not block:
            return body
        msgs = list(msgs)
        head = msgs[0]
        if head.get("role") in ("system", "developer") and isinstance(head.get("content"), str):
            msgs[0] = {**head, "content": f"{head['content']}\n\n{block}" if head["content"] else block}
        else:
            msgs.insert(0, {"role": "system", "content": block})
        return {**body, "messages": msgs}

    def add_episode(self, body: Any) -> dict[str, Any]:
        """Write-back of a finished episode posted by a client; the bank as published afterwards."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object: {messages, success, task?, task_type?, id?}")
        msgs = _messages(body)
        success = body.get("success")
        if not isinstance(success, bool):
            raise BadRequest("'success' must be true or false")
        episode = []
        for i, m in enumerate(msgs):
            if m.get("role") in ("user", "assistant"):
                episode.append({"role": m["role"], "content": message_text(m.get("content"), f"messages[{i}]")})
            elif m.get("role") not in ("system", "developer"):
                raise BadRequest(f"messages[{i}].role must be system, user or assistant")
        first_user = next((m["content"] for m in episode if m["role"] == "user"), None)
        task = body.get("task", first_user)
        if not isinstance(task, str) or not task.strip():
            raise BadRequest("'task' must be a non-empty string (or send a user turn)")
        envs = self.bank.envs
        record = {
            "id": body.get("id") or f"proxy:{uuid.uuid4().hex[:12]}",
            "env": body.get("env") or (envs[0] if len(envs) == 1 else "external"),
            "env_version": "external", "split": "train",
            "task_type": body.get("task_type") or "unlabelled",
            "task_id": body.get("task_id") or f"proxy/{uuid.uuid4().hex[:12]}",
            "task": task, "messages": episode, "success": success,
            "reward": body.get("reward", 1.0 if success else 0.0),
            "num_steps": sum(m["role"] == "assistant" for m in episode), "source": "exprag-proxy",
        }
        try:
            traj = Trajectory.from_dict(record, where="episode")
        except Exception as e:  # noqa: BLE001 - a DataFormatError naming the field
            raise BadRequest(str(e)) from None
        with self._lock:
            try:
                self.retriever.bank = append_to_bank(self.bank, [traj])
            except DataFormatError as e:  # an id the bank holds already
                raise BadRequest(str(e)) from None
        return {"status": "ok", "id": traj.id, "count": len(self.bank)}

    def routes(self) -> list[Any]:
        """The write-back endpoint, for ``ChatServer(routes=...)``."""
        import asyncio

        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from exprag.llm.server import HTTPError, read_json_body

        async def episodes(request: Any):
            body = await read_json_body(request)
            try:
                return JSONResponse(await asyncio.to_thread(self.add_episode, body))
            except BadRequest as e:
                raise HTTPError(400, str(e)) from None

        return [Route(EPISODES_ROUTE, episodes, methods=["POST"])]

