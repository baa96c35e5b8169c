"""The agent's system prompt: instructions + the env's action templates + the memory block.

One builder for inference and training, so that ExpRAG-LoRA trains on exactly the context the
agent sees at test time (docs/method.md#exprag-lora).
"""

from __future__ import annotations

from exprag.trajectory import Trajectory

INSTRUCTIONS = (
    "You are an agent acting in a text-based environment. Each user message is an observation; "
    "reply with exactly one action and nothing else: no explanation, no quotes."
)


def system_prompt(action_templates: list[str], memory_block: str = "",
                  admissible: list[str] | None = None) -> str:
    parts = [INSTRUCTIONS, "Available actions (templates):\n" + "\n".join(f"- {a}" for a in action_templates)]
    if admissible:
        parts.append("Valid actions now:\n" + "\n".join(f"- {a}" for a in admissible))
    if memory_block:
        parts.append(memory_block)
    return "\n\n".join(parts)


def conversation(system: str, trajectory: Trajectory) -> list[dict[str, str]]:
    """A stored trajectory as the chat the agent would have had: our system prompt + its episode."""
    return [{"role": "system", "content": system}] + [
        {"role": m["role"], "content": m["content"]} for m in trajectory.episode_messages()
    ]
