"""Static and dynamic retrieval over a bank: top-K with filters, exclusions and a token budget.

Static: the query is the task description, keys are the stored task descriptions (docs/method.md#static-retrieval).
Dynamic: the query is the task + the agent's last actions, keys are task + a trajectory's actions
(docs/method.md#d-dynamic-keys).
A token budget never changes which trajectories are retrieved: it shortens them (``fit_budget``), by a
cost the caller gives: the tokens of the memory block as the caller renders it (``exprag.memory_block``).
How keys are scored is the bank's (``bank.retrieval``, see ``exprag.bank.scoring``); a query is only
text: no task-type metadata of the query is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np

from exprag.bank.store import MODES, Bank
from exprag.envs import leakage_group
from exprag.envs.registry import rejections
from exprag.errors import BankError
from exprag.trajectory import Trajectory, carried_out, history_text


# Tokens of the memory block that ``trajectories`` render to, the i-th shortened to ``steps[i]`` actions
# (None: whole); the caller knows the block's format and the tokenizer (exprag.memory_block.block_cost).
BlockCost = Callable[[Sequence[Trajectory], Sequence[int | None]], int]


@dataclass(frozen=True)
class Hit:
    trajectory: Trajectory
    score: float
    position: int  # row in the bank
    steps: int | None = None  # steps shown in the memory block (a token budget); None = whole


@dataclass(frozen=True)
class Filters:
    """Which bank entries may be returned: by task type, env, success, or leaving out ids, tasks and
    leakage groups (what training uses so that a memory never shows the example's own task).

    Examples:
        >>> f = exprag.Filters(task_types={"pick_clean_then_place_in_recep"})
        >>> {h.trajectory.task_type for h in exprag.retrieve(BANK, "Your task is to: look at a book.", filters=f)}
        {'pick_clean_then_place_in_recep'}
    """

    task_types: Collection[str] | None = None
    envs: Collection[str] | None = None
    success: bool | None = None
    exclude_ids: Collection[str] = ()
    exclude_task_ids: Collection[str] = ()  # leakage-free training: never the same game / variation
    # (env, group) pairs of ``exprag.envs.leakage_group`` under ``group_scope``: e.g. every trial of
    # an ALFWorld task folder, or every task of its scene
    exclude_groups: Collection[tuple[str, str]] = ()
    group_scope: str = "task"
    task_ids: Collection[str] | None = None  # only these games (a diagnostic oracle memory)

    def active(self) -> bool:
        return bool(self.task_types is not None or self.envs is not None or self.success is not None
                    or self.exclude_ids or self.exclude_task_ids or self.exclude_groups
                    or self.task_ids is not None)

    def allows(self, t: Trajectory) -> bool:
        return ((self.task_types is None or t.task_type in self.task_types)
                and (self.envs is None or t.env in self.envs)
                and (self.success is None or t.success == self.success)
                and t.id not in self.exclude_ids
                and t.task_id not in self.exclude_task_ids
                and (self.task_ids is None or t.task_id in self.task_ids)
                and (not self.exclude_groups
                     or (t.env, leakage_group(t.env, t.task_id, self.group_scope)) not in self.exclude_groups))


# Dynamic queries keep the agent's last few actions: on agent episodes the whole history (room
# listings, observations of wandering) drowned the task text; see docs/retrieval-quality.md.
DYNAMIC_QUERY_ACTIONS = 3


def query_text(task: str, history: Sequence[dict[str, str]] | None, mode: str) -> str:
    """Static: the task. Dynamic: the task and the last ``DYNAMIC_QUERY_ACTIONS`` actions the env
    carried out (its rejections of non-actions left out), in the form of the dynamic keys
    (``store.dynamic_key``: task + actions)."""
    if mode == "static":
        return task
    return history_text(task, carried_out(history or [], rejections())[-DYNAMIC_QUERY_ACTIONS:])


class Retriever:
    def __init__(self, bank: Bank):
        self.bank = bank

    def retrieve(
        self,
        task: str,
        history: Sequence[dict[str, str]] | None = None,
        *,
        k: int = 2,
        mode: str = "static",
        filters: Filters | None = None,
        token_budget: int | None = None,
        cost: BlockCost | None = None,
    ) -> list[Hit]:
        return self.retrieve_batch([(task, history)], k=k, mode=mode, filters=[filters],
                                   token_budget=token_budget, cost=cost)[0]

    def retrieve_batch(
        self,
        queries: Sequence[tuple[str, Sequence[dict[str, str]] | None]],
        *,
        k: int = 2,
        mode: str = "static",
        filters: Sequence[Filters | None] | None = None,
        token_budget: int | None = None,
        cost: BlockCost | None = None,
    ) -> list[list[Hit]]:
        """One list of hits per query, best first. ``filters`` is one entry per query (or None).
        ``token_budget`` (tokens of the whole memory block, by ``cost``) sets each hit's ``steps``;
        it may drop the lowest-ranked hits, never replace them."""
        if mode not in MODES:
            raise BankError(f"unknown retrieval mode {mode!r} (choose static or dynamic)")
        if k < 0:
            raise BankError(f"k must be >= 0, got {k}")
        if token_budget is not None and cost is None:
            raise ValueError("a token budget needs the cost of a memory block (exprag.memory_block.block_cost)")
        if not queries:
            return []
        filters = list(filters) if filters is not None else [None] * len(queries)
        if len(filters) != len(queries):
            raise ValueError("filters must have one entry per query")
        if k == 0 or len(self.bank) == 0:
            return [[] for _ in queries]
        index = self.bank.index(mode)
        texts = [query_text(t, h, mode) for t, h in queries]
        trajs = self.bank.trajectories
        need_more = any(f is not None and f.active() for f in filters)
        # Over-fetch so that filtered-out entries rarely leave fewer than k; fall back to a full scan.
        fetch = min(len(trajs), k if not need_more else max(4 * k, k + 32))
        top_scores, top_ids = index.top(texts, fetch)
        out: list[list[Hit]] = []
        for qi, f in enumerate(filters):
            hits = self._select(top_scores[qi], top_ids[qi], f, k)
            if len(hits) < k and fetch < len(trajs):
                hits = self._select(*self._rank_all(index, texts[qi], fetch), f, k)
            if token_budget is not None:
                cuts = fit_budget([h.trajectory for h in hits], token_budget, cost)
                hits = [Hit(h.trajectory, h.score, h.position, c) for h, c in zip(hits, cuts)]
            out.append(hits)
        return out

    @staticmethod
    def _rank_all(index, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every key's score and id, best first: an index with its own ordering (a second stage,
        diversity) ranks the whole bank itself, with the order and scores its ``top(text, k)`` gives."""
        rank_all = getattr(index, "rank_all", None)
        if rank_all is not None:
            return rank_all(text, k)
        s = index.scores([text])[0]
        order = np.argsort(-s, kind="stable")
        return s[order], order

    def _select(self, scores, ids, f: Filters | None, k: int) -> list[Hit]:
        hits: list[Hit] = []
        for s, i in zip(scores, ids):
            if i < 0:  # FAISS pads with -1 when it finds fewer than asked
                continue
            t = self.bank.trajectories[int(i)]
            if f is not None and not f.allows(t):
                continue
            hits.append(Hit(t, float(s), int(i)))
            if len(hits) == k:
                break
        return hits


def fit_budget(trajectories: Sequence[Trajectory], budget: int, cost: BlockCost) -> list[int | None]:
    """Steps to show of each trajectory so that the memory block costs at most ``budget`` tokens:
    None for a whole trajectory. All trajectories are first cut to a common number of steps, the
    largest that fits; the budget left then lengthens them in rank order. When even the first
    observations do not fit, the lowest-ranked trajectories go (the result is shorter: a prefix of
    the ranking, never another trajectory)."""
    trajs = list(trajectories)
    lengths = [len(t.actions()) for t in trajs]

    def fits(cuts: list[int]) -> bool:
        shown = [None if c >= n else c for c, n in zip(cuts, lengths)]
        return cost(trajs[: len(cuts)], shown) <= budget

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
    top = max(lengths[:m], default=0)
    common = largest(0, top, lambda c: fits([min(c, n) for n in lengths[:m]]))
    cuts = [min(common, n) for n in lengths[:m]]
    for i in range(m):
        if cuts[i] < lengths[i]:
            cuts[i] = largest(cuts[i], lengths[i], lambda v: fits(cuts[:i] + [v] + cuts[i + 1:]))
    return [None if c >= n else c for c, n in zip(cuts, lengths)]
