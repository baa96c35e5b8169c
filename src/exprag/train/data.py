"""Trajectories -> tokenized multi-turn training examples with loss on the actions only.

Masking works for any chat template, without ``{% generation %}`` markers:

1. The conversation is rendered once with every assistant content replaced by a unique sentinel
   string; the sentinels' positions give each action's character span, and substituting the real
   actions back gives the text. A second render with the real actions must produce the same text,
   so a template that rewrites assistant turns fails loudly instead of mis-masking.
2. The text is tokenized once, as the inference backend does (``add_special_tokens=False`` on the
   rendered template), and a token is trained when its character span overlaps an action span.
   A token that straddles the boundary (``" go"`` after ``[/INST]``) is trained: it is the token
   the model must generate first.
3. The end-of-turn token is trained too (``train_eot``): after the action's last token, the first
   special token (allowing only whitespace tokens before it) -- ``<|im_end|>``, ``<|eot_id|>``,
   ``</s>``, ``<end_of_turn>`` -- so that greedy decoding learns to stop after one action.

The system prompt (instructions, action templates, memory block) and observations get label -100.
ExpRAG-LoRA examples carry a memory block retrieved from the training bank exactly as at inference,
never the trajectory itself nor one of the same task as the env defines it (``leakage_filter``): a
twin of the example in its own memory would teach copying, which cannot transfer to unseen tasks.
A token budget shortens the memory trajectories, counted with the model's own tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from exprag.bank import Bank, Filters, Hit, Retriever
from exprag.envs import action_templates, leakage_group
from exprag.errors import DataFormatError, ExpragError
from exprag.memory_block import MemorySpec, approx_tokens, memory_block, token_counter
from exprag.prompt import conversation, system_prompt
from exprag.trajectory import Trajectory, check_unique_ids, iter_jsonl_located

IGNORE = -100
_SENTINEL = "\ue000exprag-action-{}\ue001"  # private-use code points: never in real text


class TemplateError(ExpragError):
    """A chat template that cannot render our conversations faithfully."""


# ---- loading -------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    read: int = 0
    skipped_unsuccessful: list[str] = field(default_factory=list)  # trajectory ids
    splits: dict[str, int] = field(default_factory=dict)


def load_trajectories(paths: Sequence[str | Path], *, only_successful: bool = True) -> tuple[list[Trajectory], LoadReport]:
    """Read training trajectories. A trajectory without an assistant turn is an error naming its
    file and line (there is nothing to train on: the file is probably not what the user meant);
    unsuccessful ones are skipped and counted when ``only_successful``."""
    report = LoadReport()
    out: list[Trajectory] = []
    empty: list[tuple[str, str]] = []  # (file:line, id)
    located = [pair for p in paths for pair in iter_jsonl_located(p)]
    check_unique_ids(located)
    for where, t in located:
        report.read += 1
        if not t.actions():
            empty.append((where, t.id))
            continue
        if only_successful and not t.success:
            report.skipped_unsuccessful.append(t.id)
            continue
        report.splits[t.split] = report.splits.get(t.split, 0) + 1
        out.append(t)
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise DataFormatError(
            f"{empty[0][0]}: field 'messages' has no assistant turn (trajectory {empty[0][1]!r}): nothing "
            f"to train on{more}; remove such trajectories from the training files"
        )
    return out, report


# ---- rendering and masking -----------------------------------------------------------------------
def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raise_exception(): e.g. "System role not supported"
        raise TemplateError(f"the model's chat template cannot render a {messages[0]['role']}-first "
                            f"conversation: {type(e).__name__}: {e}") from None


def action_spans(tokenizer: Any, messages: list[dict[str, str]],
                 train: Callable[[int], bool] = lambda i: True) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return the text and the character spans of the assistant contents
    selected by ``train(k)`` (k = index among assistant turns), in order."""
    masked, k = [], 0
    for m in messages:
        if m["role"] == "assistant":
            masked.append({"role": "assistant", "content": _SENTINEL.format(k)})
            k += 1
        else:
            masked.append(m)
    actions = [m["content"] for m in messages if m["role"] == "assistant"]
    templ = render(tokenizer, masked)
    parts, spans, pos = [], [], 0
    for i, action in enumerate(actions):
        s = _SENTINEL.format(i)
        at = templ.find(s, pos)
        if at < 0 or templ.find(s, at + len(s)) >= 0:
            raise TemplateError("the chat template rewrites, drops or repeats assistant turns (each "
                                "action must appear verbatim, once); loss masks cannot be computed")
        parts.append(templ[pos:at])
        start = sum(len(p) for p in parts)
        parts.append(action)
        if train(i):
            spans.append((start, start + len(action)))
        pos = at + len(s)
    parts.append(templ[pos:])
    text = "".join(parts)
    if render(tokenizer, messages) != text:
        raise TemplateError("the chat template rewrites assistant turns (e.g. strips or reformats the "
                            "action text), so rendered actions cannot be located for the loss mask")
    return text, spans


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def tokenize_with_mask(tokenizer: Any, messages: list[dict[str, str]], *,
                       train: Callable[[int], bool] = lambda i: True, train_eot: bool = True,
                       specials: set[int] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels copy the ids of action tokens (+ end-of-turn), -100 elsewhere."""
    text, spans = action_spans(tokenizer, messages, train)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    specials = specials if specials is not None else special_ids(tokenizer)
    j = 0
    for a, b in spans:
        while j < len(ids) and offsets[j][1] <= a:
            j += 1
        last = -1
        while j < len(ids) and offsets[j][0] < b:
            if offsets[j][1] > a:  # overlaps the action
                labels[j] = ids[j]
                last = j
            j += 1
        if last < 0:
            raise TemplateError(f"an action at characters {a}..{b} produced no token")
        if train_eot:
            n = last + 1
            while n < len(ids) and n <= last + 3:
                if ids[n] in specials:
                    for q in range(last + 1, n + 1):
                        labels[q] = ids[q]
                    j = n + 1
                    break
                if text[offsets[n][0]:offsets[n][1]].strip():
                    break  # a non-whitespace, non-special token: the template has no end-of-turn token
                n += 1
    return ids, labels


def trained_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of trained positions as [start, end) token index pairs."""
    runs, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


# ---- examples --------------------------------------------------------------------------------------
@dataclass
class Example:
    id: str  # trajectory id, or "<id>#step<k>" in step serialisation
    trajectory_id: str
    input_ids: list[int]
    labels: list[int]
    memory_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class BuildReport:
    trajectories: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    empty_memory: int = 0  # examples given an empty block on purpose (empty_memory_fraction)
    shortened_memory: int = 0  # examples whose memory trajectories the token budget shortened
    trimmed_memory: list[dict[str, Any]] = field(default_factory=list)  # id, kept, retrieved
    truncated: list[dict[str, Any]] = field(default_factory=list)  # id, kept_actions, actions
    dropped_overlong: list[dict[str, Any]] = field(default_factory=list)  # id, tokens

    def summary(self) -> dict[str, Any]:
        return {
            "trajectories": self.trajectories, "examples": self.examples, "tokens": self.tokens,
            "trained_tokens": self.trained_tokens, "max_length": self.max_length,
            "empty_memory": self.empty_memory, "shortened_memory": self.shortened_memory,
            "trimmed_memory": len(self.trimmed_memory),
            "truncated": len(self.truncated), "dropped_overlong": len(self.dropped_overlong),
        }


def leakage_filter(t: Trajectory, scope: str = "task") -> Filters:
    """Never the trajectory itself nor any trajectory of the same task as its env defines it
    (``exprag.envs.leakage_group``): the same TWX game seed, ScienceWorld variation, or ALFWorld
    task folder (all its trials); with ``scope="scene"`` also any ALFWorld task of the same scene."""
    return Filters(exclude_ids={t.id}, exclude_task_ids={t.task_id},
                   exclude_groups={(t.env, leakage_group(t.env, t.task_id, scope))}, group_scope=scope)


def retrieve_memories(bank: Bank, trajs: Sequence[Trajectory], memory: MemorySpec, leakage: str = "task",
                      steps: Sequence[int] | None = None,
                      count_tokens: Callable[[str], int] = approx_tokens) -> list[list[Hit]]:
    """One retrieval per trajectory (static), or per (trajectory, step) for dynamic mode, where
    ``steps[i]`` is the number of messages of the episode seen so far; never from the trajectory's
    own task (``leakage``: its scope, see ``leakage_filter``)."""
    episodes = [t.episode_messages() for t in trajs]
    queries = [(t.task, None if steps is None else ep[: steps[i]]) for i, (t, ep) in enumerate(zip(trajs, episodes))]
    return memory.retrieve(Retriever(bank), queries, [leakage_filter(t, leakage) for t in trajs], count_tokens)


def empty_memory_ids(trajs: Sequence[Trajectory], fraction: float, seed: int) -> set[str]:
    """The trajectories whose examples get an empty memory block (docs/method.md#d-empty-memory-mixing)."""
    n = round(fraction * len(trajs))
    return {t.id for t in random.Random(seed).sample(list(trajs), n)} if n else set()


class _Templates:
    """The templates the agent's prompt showed: the env's, in the trajectory's recorded syntax."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str | None], list[str]] = {}

    def __call__(self, t: Trajectory) -> list[str]:
        key = (t.env, t.action_syntax)
        if key not in self._cache:
            self._cache[key] = action_templates(*key)
        return self._cache[key]


def build_examples(
    trajs: Sequence[Trajectory],
    tokenizer: Any,
    *,
    bank: Bank | None = None,
    memory: MemorySpec = MemorySpec(),
    leakage: str = "task",
    empty_memory_fraction: float = 0.0,
    serialization: str = "trajectory",
    max_length: int | None = None,
    overlong: str = "trim",
    train_eot: bool = True,
    seed: int = 2025,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> tuple[list[Example], BuildReport]:
    """Tokenized examples, in input order. ``bank=None`` = plain LoRA (same system prompt, empty
    memory block); ``memory``: the block the model will see at inference, never retrieved from the
    example's own task (``leakage`` scope, see ``leakage_filter``). Over-long examples (``max_length``)
    are never cut inside an assistant turn: ``trim`` drops the lowest-ranked memory trajectory first, then whole trailing turns; ``drop`` drops the example. All are reported."""
    if serialization not in ("trajectory", "step"):
        raise ValueError(f"unknown serialization {serialization!r} (choose trajectory or step)")
    if memory.mode == "dynamic" and bank is not None and serialization != "step":
        raise ValueError("dynamic retrieval needs serialization='step' (the memory changes every step)")
    report = BuildReport(trajectories=len(trajs), max_length=max_length or 0)
    templates = _Templates()
    specials = special_ids(tokenizer)
    count = token_counter(tokenizer)
    empty_ids = empty_memory_ids(trajs, empty_memory_fraction, seed) if bank is not None else set()

    # (trajectory, assistant index to train or None = all, hits) work items
    items: list[tuple[Trajectory, int | None, list[Hit]]] = []
    if serialization == "trajectory":
        hits = (retrieve_memories(bank, trajs, memory, leakage, count_tokens=count) if bank is not None
                else [[] for _ in trajs])
        items = [(t, None, h) for t, h in zip(trajs, hits)]
    else:
        step_trajs, step_idx, seen = [], [], []
        for t in trajs:
            ep = t.episode_messages()
            a_pos = [i for i, m in enumerate(ep) if m["role"] == "assistant"]
            for k, pos in enumerate(a_pos):
                step_trajs.append(t)
                step_idx.append(k)
                seen.append(pos)
        if bank is None:
            hits = [[] for _ in step_trajs]
        elif memory.mode == "static":  # one retrieval per trajectory, shared by its steps
            per = dict(zip((t.id for t in trajs), retrieve_memories(bank, trajs, memory, leakage, count_tokens=count)))
            hits = [per[t.id] for t in step_trajs]
        else:
            hits = retrieve_memories(bank, step_trajs, memory, leakage, steps=seen, count_tokens=count)
        items = list(zip(step_trajs, step_idx, hits))

    examples: list[Example] = []
    iterator = progress(items) if progress else items
    for t, step, hits in iterator:
        if t.id in empty_ids:
            hits = []
        ex = _one_example(t, step, hits, tokenizer, templates(t), memory.format,
                          max_length, overlong, train_eot, specials, report)
        if ex is None:
            continue
        if t.id in empty_ids and (step is None or step == 0):
            report.empty_memory += 1
        report.shortened_memory += any(h.steps is not None for h in hits)
        examples.append(ex)
        report.examples += 1
        report.tokens += len(ex)
        report.trained_tokens += ex.trained_tokens
    return examples, report


def example_messages(t: Trajectory, hits: Sequence[Hit], templates: list[str], fmt: str = "json",
                     step: int | None = None) -> list[dict[str, str]]:
    """The chat one example trains on: our system prompt (templates + memory block) + the episode,
    ending at the last trained action (the trailing observation carries no loss)."""
    block = memory_block(hits, fmt)
    msgs = conversation(system_prompt(templates, block), t)
    a_pos = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    end = a_pos[-1] if step is None else a_pos[step]
    return msgs[: end + 1]


def _one_example(t: Trajectory, step: int | None, hits: list[Hit], tokenizer: Any, templates: list[str],
                 fmt: str, max_length: int | None, overlong: str, train_eot: bool, specials: set[int],
                 report: BuildReport) -> Example | None:
    ex_id = t.id if step is None else f"{t.id}#step{step}"
    train = (lambda i: True) if step is None else (lambda i: i == step)
    retrieved = len(hits)
    while True:
        msgs = example_messages(t, hits, templates, fmt, step)
        ids, labels = tokenize_with_mask(tokenizer, msgs, train=train, train_eot=train_eot, specials=specials)
        if not max_length or len(ids) <= max_length or overlong == "drop" or not hits:
            break
        hits = hits[:-1]  # the lowest-ranked memory trajectory goes first
    if len(hits) < retrieved:
        report.trimmed_memory.append({"id": ex_id, "kept": len(hits), "retrieved": retrieved})
    if max_length and len(ids) > max_length:
        runs = trained_spans(labels)
        fitting = [end for _, end in runs if end <= max_length]
        if overlong == "drop" or not fitting or step is not None:
            report.dropped_overlong.append({"id": ex_id, "tokens": len(ids)})
            return None
        cut = fitting[-1]  # the end of the last whole assistant turn that fits
        report.truncated.append({"id": ex_id, "kept_actions": len(fitting), "actions": len(runs)})
        ids, labels = ids[:cut], labels[:cut]
    return Example(ex_id, t.id, ids, labels, tuple(h.trajectory.id for h in hits))


# ---- batching ---------------------------------------------------------------------------------------
def length_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None,
                   seed: int = 2025, epoch: int = 0, bucket: bool = True) -> list[list[int]]:
    """Index batches for one epoch, deterministic in (seed, epoch). With ``bucket``, examples are
    shuffled, sorted by length within windows of 64 batches (little padding, still random), cut
    into batches (at most ``batch_size`` examples and ``max_batch_tokens`` padded tokens), and the
    batches shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        window = batch_size * 64
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: lengths[i])]
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur:
            padded = max(longest, lengths[i]) * (len(cur) + 1)
            if len(cur) >= batch_size or (max_batch_tokens and padded > max_batch_tokens):
                batches.append(cur)
                cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    if bucket:
        rng.shuffle(batches)
    return batches


def split_micro(batch: Sequence[int], lengths: Sequence[int], size: int,
                max_tokens: int | None = None) -> list[list[int]]:
    """Cut one optimizer batch into forward passes of at most ``size`` examples and ``max_tokens``
    padded tokens, shortest first (similar lengths share a pass: little padding)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(batch, key=lambda i: lengths[i]):
        if cur and (len(cur) >= size or (max_tokens and lengths[i] * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e)] = torch.tensor(e.input_ids)
        labels[r, : len(e)] = torch.tensor(e.labels)
        mask[r, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
