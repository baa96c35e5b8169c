"""The episode loop: prompt = system (instructions + action templates + memory block) + history.

Several episodes run side by side, each in its own environment instance ("slot"); every step makes
one batched model call for all live episodes, so the model is shared. With static retrieval the
system prompt is fixed for the episode and the backend's KV cache serves the growing prefix; with
dynamic retrieval the memory block is re-retrieved from task + history before every step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from exprag.bank.retriever import Filters, Retriever
from exprag.envs.base import EnvRestarted, TaskSpec, TextEnv, parse_action
from exprag.envs.registry import NOTHING_HAPPENS  # our answer to a reply we cannot parse at all
from exprag.expert import EpisodeRecorder, trajectory_id
from exprag.llm.base import ChatModel
from exprag.memory_block import MemorySpec, approx_tokens, memory_block, token_counter
from exprag.prompt import system_prompt
from exprag.trajectory import Trajectory


@dataclass
class AgentConfig:
    memory: MemorySpec = MemorySpec()  # a token budget counts with the model's tokenizer when it has one
    max_steps: int | None = None  # None: the env's cap
    max_new_tokens: int = 32
    show_admissible: bool = False
    # A diagnostic, deliberately leaky memory: only the bank's trajectories of the very game played
    # (the expert's own solution), to tell "cannot use a memory" from "retrieval finds nothing useful".
    same_task_memory: bool = False


@dataclass
class _EpisodeStats:
    """Counters of one episode; every episode (and every replay of one) starts a fresh one."""

    retrievals: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    completion_tokens: int = 0
    gen_seconds: float = 0.0
    invalid: int = 0  # parsed action not admissible (counted on envs with cheap_admissible only)
    unparsable: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Slot:
    env: TextEnv
    task: TaskSpec | None = None
    rec: EpisodeRecorder | None = None
    cap: int = 0
    system: str = ""
    memory_ids: list[str] = field(default_factory=list)
    stats: _EpisodeStats = field(default_factory=_EpisodeStats)
    replayed: bool = False  # this episode already started over after a simulator restart


@dataclass
class EpisodeResult:
    task: TaskSpec
    trajectory: Trajectory
    stats: dict


class Agent:
    def __init__(self, model: ChatModel, retriever: Retriever | None, cfg: AgentConfig,
                 filters: Filters | None = None, step_map: Callable[..., Iterable] | None = None):
        """``step_map``: how the live episodes' env steps are mapped, ``map`` by default (one after
        another); ``WorkerPool.map`` steps envs that live in workers at the same time."""
        self.model = model
        self._map = step_map or map
        self.retriever = retriever
        self.cfg = cfg
        self.filters = filters
        self._count_tokens: Callable[[str], int] | None = None
        self.token_count = ""  # how the budget counts tokens: "tokenizer" | "chars/4 estimate"

    def _counter(self) -> Callable[[str], int]:
        """The model's own tokenizer when the backend has one (HF); the chars/4 estimate otherwise
        (an OpenAI-compatible server), recorded in each episode's stats as ``memory_token_count``."""
        if self._count_tokens is None:
            tok = getattr(self.model, "tokenizer", None)
            self._count_tokens = token_counter(tok) if tok is not None else approx_tokens
            self.token_count = "tokenizer" if tok is not None else "chars/4 estimate"
        return self._count_tokens

    # ---- prompt --------------------------------------------------------------------------------
    def _memory(self, slot: _Slot) -> tuple[str, list[str]]:
        spec = self.cfg.memory
        if self.retriever is None or spec.k == 0:
            return "", []
        history = slot.rec.messages if spec.mode == "dynamic" else None
        filters = self.filters
        if self.cfg.same_task_memory:
            filters = dataclasses.replace(filters or Filters(), task_ids={slot.task.task_id})
        count = self._counter() if spec.token_budget is not None else approx_tokens
        (hits,) = spec.retrieve(self.retriever, [(slot.rec.reset.task, history)], [filters], count)
        slot.stats.retrievals += 1
        return memory_block(hits, spec.format), [h.trajectory.id for h in hits]

    def _system(self, slot: _Slot) -> str:
        memory, slot.memory_ids = self._memory(slot)
        admissible = slot.env.admissible_actions() if self.cfg.show_admissible else None
        return system_prompt(slot.env.action_templates(), memory, admissible)

    # ---- loop ----------------------------------------------------------------------------------
    def run(self, envs: Sequence[TextEnv], tasks: Sequence[TaskSpec]) -> Iterator[EpisodeResult]:
        """Play ``tasks`` on ``len(envs)`` env instances; yields each episode as it finishes."""
        queue = list(tasks)
        slots = [_Slot(env) for env in envs]
        source = getattr(self.model, "name", "model")
        for s in slots:
            self._start(s, queue, source)
        while any(s.task is not None for s in slots):
            live = [s for s in slots if s.task is not None]
            if self.cfg.memory.mode == "dynamic" or self.cfg.show_admissible:
                for s in live:
                    if s.rec.steps > 0:
                        s.system = self._system(s)
            convs = [[{"role": "system", "content": s.system}] + s.rec.messages for s in live]
            gens = self.model.generate(convs, max_new_tokens=self.cfg.max_new_tokens,
                                       session_ids=[_sid(s) for s in live])
            for s, g in zip(live, gens):
                s.stats.prompt_tokens += g.prompt_tokens
                s.stats.prefill_tokens += g.prefill_tokens
                s.stats.completion_tokens += g.completion_tokens
                s.stats.gen_seconds += g.seconds
            # Serially, ``map`` is lazy: each slot acts right before its outcome is handled, as it
            # always did; a worker pool steps all the slots' envs at once, then they are handled in order.
            for s, restarted in zip(live, self._map(self._try_act, live, [g.text for g in gens])):
                if restarted is not None:
                    if s.replayed:  # lost twice: give up with the env's one-line error
                        raise restarted
                    self._replay(s, queue, source)
                    continue
                if s.rec.done or s.rec.steps >= s.cap:
                    yield self._finish(s)
                    self._start(s, queue, source)

    def _try_act(self, s: _Slot, reply: str) -> EnvRestarted | None:
        try:
            self._act(s, reply)
        except EnvRestarted as e:
            return e
        return None

    def _replay(self, s: _Slot, queue: list[TaskSpec], source: str) -> None:
        """The env's simulator restarted mid-episode: play the episode again from its start."""
        model = getattr(self.model, "end_session", None)
        if model:
            model(_sid(s))
        queue.insert(0, s.task)
        self._start(s, queue, source)
        s.replayed = True

    def _start(self, s: _Slot, queue: list[TaskSpec], source: str) -> None:
        s.task = None
        s.replayed = False
        if not queue:
            return
        task = queue.pop(0)
        reset = s.env.reset(task)
        s.task, s.rec = task, EpisodeRecorder(s.env, task, reset, source=source)
        s.cap = self.cfg.max_steps or s.env.max_steps(task)
        s.stats = _EpisodeStats()
        s.system = self._system(s)

    def _act(self, s: _Slot, reply: str) -> None:
        action = parse_action(reply)
        if action is None:
            s.stats.unparsable += 1
            s.rec.messages.append({"role": "assistant", "content": reply.strip()})
            s.rec.messages.append({"role": "user", "content": NOTHING_HAPPENS})
            s.rec.steps += 1
            return
        if s.env.cheap_admissible:
            # Compare in the engine's own syntax (ALFWorld maps "put X in Y" to "move X to Y").
            if s.env.normalize_action(action) not in s.env.admissible_actions():
                s.stats.invalid += 1
        s.rec.record(action, s.env.step(action))

    def _finish(self, s: _Slot) -> EpisodeResult:
        e = s.stats
        stats = {
            "steps": s.rec.steps,
            "wall_s": round(time.perf_counter() - e.started, 3),
            "gen_s": round(e.gen_seconds, 3),
            "prompt_tokens": e.prompt_tokens,
            "prefill_tokens": e.prefill_tokens,
            "completion_tokens": e.completion_tokens,
            "retrievals": e.retrievals,
            "unparsable": e.unparsable,
            "memory_ids": s.memory_ids,
        }
        if self.cfg.memory.token_budget is not None and self.token_count:
            stats["memory_token_count"] = self.token_count
        if s.env.cheap_admissible:
            stats["invalid_actions"] = e.invalid
        traj = s.rec.trajectory(meta={"agent": {k: v for k, v in stats.items() if k != "memory_ids"},
                                      "memory_ids": s.memory_ids},
                                traj_id=trajectory_id(s.env.name, s.task, s.rec.source))
        model = getattr(self.model, "end_session", None)
        if model:
            model(_sid(s))
        return EpisodeResult(s.task, traj, stats)


def _sid(s: _Slot) -> str:
    return f"{s.task.env}:{s.task.split}:{s.task.task_id}:{id(s)}"
