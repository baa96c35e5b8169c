"""The memory block: K retrieved trajectories rendered into the system prompt (docs/method.md#memory-block).

``MemorySpec`` says which block an agent sees; the same spec travels from the CLI or config file to the
block, at inference and at training (ExpRAG-LoRA trains on the block it will see, docs/method.md#exprag-lora).

Trajectories are grouped under "Successful" and "Unsuccessful" headings. ``json`` (default) renders
each episode as a chat-JSON list of messages, the robust choice across models; ``text`` renders
``Observation:`` / ``Action:`` lines.

A token budget shortens trajectories instead of replacing them: the retriever keeps the retrieved
trajectories, in the same order, and cuts each to its first steps until the block, as rendered here
(``block_cost``), fits (``exprag.bank.retriever.fit_budget``); each keeps its task and its first
observation, and a final line says how many steps were cut (docs/method.md#d-memory-budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from exprag.trajectory import Trajectory

if TYPE_CHECKING:
    from exprag.bank.retriever import BlockCost, Filters, Hit, Retriever

FORMATS = ("json", "text")
HEADER = (
    "# Memory: past episodes of similar tasks\n"
    "Use them as examples of how such tasks are solved; act only on the current task."
)


def omitted_line(n: int) -> str:
    return f"... ({n} more step{'s' if n != 1 else ''} omitted)"


def render_trajectory(t: Trajectory, fmt: str = "json", steps: int | None = None) -> str:
    """One trajectory; with ``steps``, only its first observation and first ``steps`` actions (each
    with the observation it produced), then the omission line."""
    episode = t.episode_messages()
    omitted = 0
    if steps is not None:
        a_pos = [i for i, m in enumerate(episode) if m["role"] == "assistant"]
        if 0 <= steps < len(a_pos):
            omitted = len(a_pos) - steps
            episode = episode[: a_pos[steps]]
    if fmt == "json":
        body = json.dumps([{"role": m["role"], "content": m["content"]} for m in episode],
                          ensure_ascii=False)
    elif fmt == "text":
        body = "\n".join(
            f"{'Observation' if m['role'] == 'user' else 'Action'}: {m['content']}" for m in episode
        )
    else:
        raise ValueError(f"unknown memory format {fmt!r} (choose json or text)")
    return f"Task: {t.task}\n{body}" + (f"\n{omitted_line(omitted)}" if omitted else "")


def render_memory(trajectories: Iterable[Trajectory], fmt: str = "json",
                  steps: Sequence[int | None] | None = None) -> str:
    """The block for the system prompt; empty string when nothing was retrieved. ``steps[i]``
    shortens the i-th trajectory (None: whole)."""
    trajs = list(trajectories)
    if not trajs:
        return ""
    cuts = list(steps) if steps is not None else [None] * len(trajs)
    if len(cuts) != len(trajs):
        raise ValueError("steps must have one entry per trajectory")
    parts = [HEADER]
    n = 0
    for title, won in (("Successful", True), ("Unsuccessful", False)):
        group = [(t, c) for t, c in zip(trajs, cuts) if bool(t.success) == won]
        if not group:
            continue
        parts.append(f"## {title} trajectories")
        for t, c in group:
            n += 1
            parts.append(f"### Trajectory {n}\n{render_trajectory(t, fmt, c)}")
    return "\n\n".join(parts)


def memory_block(hits: Sequence[Hit], fmt: str = "json") -> str:
    """The memory block of retrieved hits, each shortened as the token budget decided."""
    return render_memory([h.trajectory for h in hits], fmt, [h.steps for h in hits])


def approx_tokens(text: str) -> int:
    """~4 characters a token: the estimate used only when no tokenizer is at hand (it undercounts
    SmolLM2's tokens of JSON memory blocks, e.g. by 6% on TWX); pass ``token_counter(tokenizer)``."""
    return len(text) // 4 + 1


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Tokens of a text as the model sees it inside the prompt (no BOS/EOS added)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def block_cost(fmt: str = "json", count_tokens: Callable[[str], int] = approx_tokens) -> BlockCost:
    """The retriever's cost of a memory: the tokens of the block these trajectories, so shortened,
    render to in ``fmt``."""
    return lambda trajs, steps: count_tokens(render_memory(trajs, fmt, steps))


@dataclass(frozen=True)
class MemorySpec:
    """The memory block an agent sees: the ``k`` best trajectories by ``mode`` retrieval (static: the
    task; dynamic: the task and the last actions, re-retrieved every step), rendered as ``format``,
    shortened to ``token_budget`` tokens (None: whole trajectories)."""

    k: int = 2
    mode: str = "static"  # static | dynamic
    format: str = "json"  # json | text
    token_budget: int | None = None

    def retrieve(self, retriever: Retriever, queries: Sequence[tuple[str, Sequence[dict[str, str]] | None]],
                 filters: Sequence[Filters | None] | None = None,
                 count_tokens: Callable[[str], int] = approx_tokens) -> list[list[Hit]]:
        """One memory per query (task, history so far): its hits, best first, shortened to the
        budget as ``count_tokens`` counts this spec's rendering."""
        return retriever.retrieve_batch(queries, k=self.k, mode=self.mode, filters=filters,
                                        token_budget=self.token_budget, cost=block_cost(self.format, count_tokens))
