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

# Which bank a retrieving method reads at inference, relative to the split under test:
# matched = that split's train bank; mismatched = the other split's; all = both; empty = no trajectories
# (the memory block is then absent, as for a method without retrieval); oracle = a diagnostic, not a
# method: the memory holds only the expert trajectory of the very test game (deliberately leaky), to tell
# whether a model can use a memory at all. Oracle cells are labelled and never pooled with methods.
BANKS = ("matched", "mismatched", "all", "empty", "oracle")
DIAGNOSTIC_BANKS = ("oracle",)
SPLITS = ("easy", "hard")
