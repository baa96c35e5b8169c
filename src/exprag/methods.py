"""The methods of the paper's grid (docs/method.md#method-grid), as data: which adapter each uses and
whether it retrieves.

Shared by the experiment runner (what to train and evaluate) and the report (row order and labels).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    adapter: str | None  # None = the frozen base model; else the adapter kind: "lora" | "exprag_lora"
    retrieval: bool  # a memory block at inference


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("no_retrieval", "No retrieval, frozen model", None, False),
    Method("exprag_frozen", "ExpRAG, frozen model", None, True),
    Method("lora", "LoRA", "lora", False),
    Method("lora_retrieval", "LoRA, retrieval at inference only", "lora", True),
    Method("exprag_lora", "ExpRAG-LoRA", "exprag_lora", True),
)}

# The task groups under test (docs/method.md#glossary): easy = the task types trained on (in
# distribution), hard = the held-out ones. Results rows and cell ids keep the field name `split`.
GROUPS = ("easy", "hard")
# The memory source of a retrieving method: which trajectories feed its memory block at inference,
# relative to the task group under test (results rows keep the field name `bank`):
# matched = that group's train bank; mismatched = the other group's; all = both; empty = no trajectories
# (the memory block is then absent, as for a method without retrieval); oracle = a diagnostic, not a
# method: the memory holds only the expert trajectory of the very test game (deliberately leaky), to tell
# whether a model can use a memory at all. Oracle cells are labelled and never pooled with methods.
SOURCES = ("matched", "mismatched", "all", "empty", "oracle")
DIAGNOSTIC_SOURCES = ("oracle",)
