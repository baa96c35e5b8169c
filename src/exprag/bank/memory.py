"""The memory block: K retrieved trajectories rendered into the system prompt (SPEC §1).

Trajectories are grouped under "Successful" and "Unsuccessful" headings. ``json`` (default) renders
each episode as a chat-JSON list of messages, the robust choice across models; ``text`` renders
``Observation:`` / ``Action:`` lines.
"""

from __future__ import annotations

import json
from typing import Iterable

from exprag.trajectory import Trajectory

FORMATS = ("json", "text")
HEADER = (
    "# Memory: past episodes of similar tasks\n"
    "Use them as examples of how such tasks are solved; act only on the current task."
)


def render_trajectory(t: Trajectory, fmt: str = "json") -> str:
    episode = t.episode_messages()
    if fmt == "json":
        body = json.dumps([{"role": m["role"], "content": m["content"]} for m in episode],
                          ensure_ascii=False)
    elif fmt == "text":
        body = "\n".join(
            f"{'Observation' if m['role'] == 'user' else 'Action'}: {m['content']}" for m in episode
        )
    else:
        raise ValueError(f"unknown memory format {fmt!r} (choose json or text)")
    return f"Task: {t.task}\n{body}"


def render_memory(trajectories: Iterable[Trajectory], fmt: str = "json") -> str:
    """The block for the system prompt; empty string when nothing was retrieved."""
    trajs = list(trajectories)
    if not trajs:
        return ""
    parts = [HEADER]
    n = 0
    for title, group in (("Successful", [t for t in trajs if t.success]),
                         ("Unsuccessful", [t for t in trajs if not t.success])):
        if not group:
            continue
        parts.append(f"## {title} trajectories")
        for t in group:
            n += 1
            parts.append(f"### Trajectory {n}\n{render_trajectory(t, fmt)}")
    return "\n\n".join(parts)
