"""The one chat-model protocol the agent talks to, whatever runs the model.

Sessions (KV reuse)
-------------------
An episode is one growing conversation: each step's prompt is the previous prompt plus the model's
reply and the next observation. ``generate(..., session_ids=[...])`` names, per conversation, the
episode it belongs to; a backend may keep state for a session between calls (the transformers
backend keeps the KV cache of the tokens it has seen) and reuse it when the next prompt starts with
those tokens. Session ids are only a hint: backends verify the prefix token by token, so passing a
wrong or stale id costs speed, never correctness, and a changed prompt (dynamic retrieval rewrote the
system prompt) simply falls back to a full prefill. Call ``end_session(id)`` when an episode finishes
to free its state; backends also evict least-recently-used sessions past a bound, so a forgotten
``end_session`` leaks nothing. One id may appear at most once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from exprag.errors import ExpragError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = list[Message]

DEFAULT_MAX_NEW_TOKENS = 64


class ModelError(ExpragError):
    """A model that cannot be found or loaded offline, or an adapter for another base model."""


class ServerError(ExpragError):
    """An OpenAI-compatible server that is down, too slow, or answers with an error."""


@dataclass
class Generation:
    """One assistant reply.

    ``text`` is the reply verbatim, without the end-of-turn token and cut before any stop string;
    callers normalise it. ``prompt_tokens`` counts the whole prompt; ``prefill_tokens`` the prompt
    tokens the model actually ran this call (the rest came from a cache); ``completion_tokens`` the
    generated tokens, the end-of-turn token included. ``seconds`` is the wall time of the call that
    produced it: replies generated together in one batch share it. ``finish_reason`` is ``"stop"``
    (end of turn or a stop string) or ``"length"`` (``max_new_tokens`` reached).
    """

    text: str
    prompt_tokens: int
    prefill_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = "stop"


@runtime_checkable
class ChatModel(Protocol):
    """Generate the next assistant message for a batch of conversations; greedy decoding, stopping
    at the end of the turn."""

    name: str

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop: Sequence[str] | None = None,
        session_ids: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """One reply per conversation, in order. ``session_ids``: see the module docstring."""
        ...

    def end_session(self, session_id: str) -> None:
        """Forget a session's state (no-op when unknown or stateless)."""
        ...


def check_batch(
    conversations: Sequence[Conversation], session_ids: Sequence[str | None] | None
) -> list[str | None]:
    """Validate a generate() call's arguments; returns one session id (or None) per conversation."""
    if isinstance(conversations, dict) or (conversations and isinstance(conversations[0], dict)):
        raise TypeError("generate() takes a list of conversations (each a list of messages), not one conversation")
    for i, conv in enumerate(conversations):
        if not conv:
            raise ValueError(f"conversation {i} is empty")
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                m.get("content"), str
            ):
                raise ValueError(f"conversation {i}, message {j}: expected {{'role': ..., 'content': str}}")
    if session_ids is None:
        return [None] * len(conversations)
    ids = list(session_ids)
    if len(ids) != len(conversations):
        raise ValueError(f"{len(ids)} session ids for {len(conversations)} conversations")
    named = [s for s in ids if s is not None]
    if len(named) != len(set(named)):
        raise ValueError("a session id appears twice in one generate() call")
    return ids
