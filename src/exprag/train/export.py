"""ExpRAG-LoRA examples as chat records for other trainers (TRL, LLaMA-Factory; FSDP / DeepSpeed).

Each record is the chat that ``exprag train --bank`` tokenizes for a trajectory: our system prompt with
the memory block retrieved leakage-free (never the example's own task, data.leakage_filter), then the
episode up to its last action (data.example_messages). With the model's tokenizer the trainer's length
rules apply too (token budget counted with it; over ``max_length``: memory trimmed, trailing turns cut
or the example dropped), by running the trainer's own data preparation and following its decisions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from exprag.bank import load_bank
from exprag.memory_block import approx_tokens, token_counter
from exprag.envs import action_templates
from exprag.errors import ExpragError
from exprag.train.config import TrainConfig
from exprag.train.data import empty_memory_ids, example_messages, load_trajectories, retrieve_memories

FORMATS = ("sharegpt", "openai")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass(frozen=True)
class TrainingChat:
    trajectory_id: str
    messages: tuple[dict[str, str], ...]  # system (templates + memory block), then user / assistant turns
    memory_ids: tuple[str, ...]  # the bank trajectories in the memory block, best first


@dataclass(frozen=True)
class ExportCounts:
    examples: int
    dropped_overlong: int  # over max_length with drop (or nothing left to cut): the trainer skips them too
    checked_length: bool  # False without a tokenizer: max_length was not applied


def training_chats(cfg: TrainConfig, tokenizer: Any = None) -> tuple[list[TrainingChat], ExportCounts]:
    """The chats ``exprag train`` builds from ``cfg`` (one per trajectory; plain LoRA's when ``cfg``
    names no bank). Without ``tokenizer`` the length rules are skipped, so ``cfg.retrieval.memory.token_budget``
    (counted with the model's tokenizer) is refused."""
    if cfg.serialization != "trajectory":
        raise ExpragError("export writes one example per trajectory: serialization must be 'trajectory'")
    if tokenizer is None and cfg.retrieval.memory.token_budget:
        raise ExpragError("--token-budget counts the model's tokens: give --model (the model you will train)")
    trajs, _ = load_trajectories(cfg.trajectories, only_successful=cfg.only_successful)
    if not trajs:
        raise ExpragError(f"no trainable trajectories in {', '.join(cfg.trajectories)}")
    if cfg.retrieval.bank:
        count = token_counter(tokenizer) if tokenizer is not None else approx_tokens
        hits = retrieve_memories(load_bank(cfg.retrieval.bank), trajs, cfg.retrieval.memory, cfg.leakage,
                                 count_tokens=count)
        empty = empty_memory_ids(trajs, cfg.empty_memory_fraction, cfg.seed)
    else:  # plain LoRA: the same system prompt with an empty memory block
        hits, empty = [[] for _ in trajs], set()
    fitted = _fitted_examples(cfg, tokenizer) if tokenizer is not None else None
    templates = lru_cache(maxsize=None)(action_templates)
    chats, dropped = [], 0
    for t, h in zip(trajs, hits):
        h = [] if t.id in empty else h
        kept_actions = None
        if fitted is not None:
            if t.id not in fitted:
                dropped += 1
                continue
            memory_ids, kept_actions = fitted[t.id]
            h = h[: len(memory_ids)]  # the trainer drops the lowest-ranked memories first
            assert tuple(x.trajectory.id for x in h) == memory_ids, t.id
        msgs = example_messages(t, h, templates(t.env, t.action_syntax), cfg.retrieval.memory.format)
        if kept_actions is not None:  # cut after the last whole turn that fits, as the trainer does
            a_pos = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            msgs = msgs[: a_pos[kept_actions - 1] + 1]
        chats.append(TrainingChat(t.id, tuple(msgs), tuple(x.trajectory.id for x in h)))
    return chats, ExportCounts(len(chats), dropped, fitted is not None)


def _fitted_examples(cfg: TrainConfig, tokenizer: Any) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Trajectory id -> (memory ids kept, actions kept or None = all), from the trainer's own data
    preparation; a trajectory missing here was dropped as over-long."""
    from exprag.train.prepare import prepare_data

    train_ex, _, report = prepare_data(dataclasses.replace(cfg, val_trajectories=[]), tokenizer)
    cut = {r["id"]: r["kept_actions"] for r in report["truncated"]}
    return {e.trajectory_id: (e.memory_ids, cut.get(e.id)) for e in train_ex}


def to_record(messages: tuple[dict[str, str], ...] | list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """ShareGPT (``conversations``: from system / human / gpt) or OpenAI chat (``messages``) record."""
    if fmt == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "openai":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    raise ValueError(f"unknown export format {fmt!r} (choose {' or '.join(FORMATS)})")


def records(chats: list[TrainingChat], fmt: str) -> Iterator[dict[str, Any]]:
    return (to_record(c.messages, fmt) for c in chats)


def load_tokenizer(spec: str) -> Any:
    """The model's tokenizer only (no weights), through exprag's model resolution."""
    from transformers import AutoTokenizer

    from exprag.llm.models import quiet_transformers, resolve_model

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_model(spec).path)
