"""Synthetic multi-turn episodes for the backend tests: each reply is fed back, then a new observation."""

from __future__ import annotations

SYSTEM = (
    "You are an agent in a text game. Reply with exactly one action, such as 'go to kitchen', "
    "'take apple', 'open fridge' or 'put apple in fridge'. "
)
WORDS = ["apple", "table", "knife", "door", "sink", "fridge", "lamp", "book"]


def episode_start(i: int, system_repeat: int = 3) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM * system_repeat},
        {"role": "user", "content": f"Task {i}: put the {WORDS[i % 8]} on the table. You are in room {i}."},
    ]


def observation(i: int, step: int) -> str:
    return f"Step {step}: you see a {WORDS[(i + step) % 8]} and a {WORDS[(i + 2 * step + 1) % 8]}."


def play(model, n: int, steps: int, *, batched: bool, sessions: bool, max_new_tokens: int = 8, tag: str = "e"):
    """Play n synthetic episodes for `steps` turns (each reply is fed back, then a new observation).
    Returns the replies per episode and the Generation records per step."""
    convs = [episode_start(i) for i in range(n)]
    replies: list[list[str]] = [[] for _ in range(n)]
    gens_per_step = []
    for step in range(steps):
        sids = [f"{tag}{i}" for i in range(n)] if sessions else None
        if batched:
            gens = model.generate(convs, max_new_tokens=max_new_tokens, session_ids=sids)
        else:
            gens = [
                model.generate([c], max_new_tokens=max_new_tokens, session_ids=[sids[i]] if sids else None)[0]
                for i, c in enumerate(convs)
            ]
        gens_per_step.append(gens)
        for i, g in enumerate(gens):
            replies[i].append(g.text)
            convs[i] = convs[i] + [
                {"role": "assistant", "content": g.text},
                {"role": "user", "content": observation(i, step)},
            ]
    if sessions:
        for i in range(n):
            model.end_session(f"{tag}{i}")
    return replies, gens_per_step
