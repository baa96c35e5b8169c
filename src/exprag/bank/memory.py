"""The memory block: K retrieved trajectories rendered into the system prompt (docs/method.md#memory-block).

Trajectories are grouped under "Successful" and "Unsuccessful" headings. ``json`` (default) renders
each episode as a chat-JSON list of messages, the robust choice across models; ``text`` renders
``Observation:`` / ``Action:`` lines.

A token budget shortens trajectories instead of replacing them (``fit_memory``): the retrieved
trajectories stay the same, in the same order; each keeps its task, its first observation and its
first steps, and a final line says how many steps were cut (docs/method.md#d-memory-budget).
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Sequence

from exprag.trajectory import Trajectory

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


def fit_memory(trajectories: Sequence[Trajectory], fmt: str, budget: int,
               count_tokens: Callable[[str], int]) -> list[int | None]:
    """Steps to show of each trajectory so that the rendered block counts at most ``budget`` tokens:
    None for a whole trajectory. All trajectories are first cut to a common number of steps, the
    largest that fits; the budget left then lengthens them in rank order. When even the first
    observations do not fit, the lowest-ranked trajectories go (the result is shorter: a prefix of
    the ranking, never another trajectory)."""
    trajs = list(trajectories)
    lengths = [len(t.actions()) for t in trajs]

    def fits(cuts: list[int]) -> bool:
        shown = [None if c >= n else c for c, n in zip(cuts, lengths)]
        return count_tokens(render_memory(trajs[: len(cuts)], fmt, shown)) <= budget

    def largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
        """The largest v in [lo, hi] with ok(v), given ok(lo)."""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    if fits(lengths):
        return [None] * len(trajs)
    m = len(trajs)
    while m and not fits([0] * m):
        m -= 1
    cuts = [0] * m
    top = max(lengths[:m], default=0)
    common = largest(0, top, lambda c: fits([min(c, n) for n in lengths[:m]]))
    cuts = [min(common, n) for n in lengths[:m]]
    for i in range(m):
        if cuts[i] < lengths[i]:
            cuts[i] = largest(cuts[i], lengths[i], lambda v: fits(cuts[:i] + [v] + cuts[i + 1:]))
    return [None if c >= n else c for c, n in zip(cuts, lengths)]
