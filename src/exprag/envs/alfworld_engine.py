"""The ALFWorld text engine as alfworld assembles it, shared by the env adapter and the game generator.

textworld's ``PddlEnv`` wrapped in alfworld's ``AlfredDemangler``, ``AlfredInfos`` and ``AlfredExpert``
(the stack of ``alfworld-generate`` and ``AlfredTWEnv``), one game file at a time, in-process (no gym
batch, no worker process).

Two side effects are contained around every engine call:
- alfworld's hand-coded expert draws from the *global* ``random`` module: it runs on a private stream
  seeded from the game id, so expert actions are reproducible and the caller's random state is kept;
- fast-downward's translator overwrites ``sys.argv``: it is restored.

``install_speedups()`` memoises three pure functions of textworld / fast-downward that the stock
engine recomputes on every step (template parsing, query parsing, PDDL->SAS translation of a problem
it already translated) and makes textgen copy its small context dicts instead of deep-copying the
entities they point to (which nothing mutates). Observations are byte-identical (tested); stepping is
about ten times faster. ``Engine(fast=False)`` does not install them (they are process-wide once
installed).
"""

from __future__ import annotations

import contextvars
import copy
import json
import random
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from exprag.errors import EnvError

EXPERT_TYPES = ("handcoded", "planner")


class IsolatedRandom:
    """A private stream for code that draws from the global ``random`` module."""

    def __init__(self, seed: str | int) -> None:
        self._state = random.Random(seed).getstate()

    @contextmanager
    def active(self) -> Iterator[None]:
        outer = random.getstate()
        random.setstate(self._state)
        try:
            yield
        finally:
            self._state = random.getstate()
            random.setstate(outer)


# ---- speedups -------------------------------------------------------------------------------------
_SPEEDUPS = False
# set while an engine without the planner expert loads a game: the planner's separately optimised
# translation is never used then, so the plain one stands in for it (one translation instead of two)
_NO_REPLAN: contextvars.ContextVar[bool] = contextvars.ContextVar("exprag_alfworld_no_replan", default=False)


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


def install_speedups() -> None:
    """Memoise textworld's pure parsing / translation steps (process-wide, idempotent)."""
    global _SPEEDUPS
    if _SPEEDUPS:
        return
    import fast_downward
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as tw_logic

    parse_symbols = textgen._parse_and_convert
    symbols_cache = _LRU(8192)

    def parse_and_convert(text, rule_name=None, **kwargs):
        # callers set each symbol's context afterwards: hand out a fresh copy of the parse
        parsed = symbols_cache.get_or((text, rule_name), lambda: parse_symbols(text, rule_name=rule_name, **kwargs))
        return copy.deepcopy(parsed)

    def copy_context(context):
        # textgen deep-copied the entity infos / variables the dicts point to; they are never mutated
        return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
                "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}

    parse_query = tw_logic.Rule.parse_conjunctive_query.__func__
    query_cache = _LRU(4096)

    def parse_conjunctive_query(cls, expr):
        return query_cache.get_or(expr, lambda: parse_query(cls, expr))

    pddl2sas = fast_downward.pddl2sas
    sas_cache = _LRU(8)

    def cached_pddl2sas(domain, problem, verbose=False, optimize=False):
        if optimize and _NO_REPLAN.get():
            optimize = False
        return sas_cache.get_or((domain, problem, optimize),
                                lambda: pddl2sas(domain, problem, verbose=verbose, optimize=optimize))

    textgen._parse_and_convert = parse_and_convert
    textgen.copy_context = copy_context
    tw_logic.Rule.parse_conjunctive_query = classmethod(parse_conjunctive_query)
    fast_downward.pddl2sas = cached_pddl2sas
    _SPEEDUPS = True


# ---- the engine -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _safe_expert_class():
    from alfworld.agents.environment.alfred_tw_env import AlfredExpert
    from alfworld.agents.expert import HandCodedTWAgent

    class HandCodedMoveAgent(HandCodedTWAgent):
        """alfworld 0.4 renamed ``put X in/on Y`` to ``move X to Y``, but its hand-coded expert still
        looks for "put" in the last action to know it emptied its hands: after the first object of
        ``pick_two_obj_and_place`` it believes it still holds it and wanders until the step cap. The
        policy's bookkeeping is shown the old spelling; nothing else changes."""

        def reset(self, game="INVALID"):
            super().reset(game)
            track = self.policy.update_state_tracking

            def update_state_tracking(game_state, last_action):
                if last_action.startswith("move "):
                    last_action = "put " + last_action[len("move "):]
                return track(game_state, last_action)

            self.policy.update_state_tracking = update_state_tracking

    class SafeExpert(AlfredExpert):
        """alfworld's expert wrapper, with the expert above, and an expert that gives up (alfworld
        raises from inside ``step``) leaves an empty plan instead of ending the episode with a
        traceback."""

        def load(self, gamefile):
            super().load(gamefile)
            self._handcoded_expert = HandCodedMoveAgent(max_steps=200)

        def _gather_infos(self):
            try:
                super()._gather_infos()
                self.state["extra.expert_error"] = None
            except Exception as e:  # HandCodedAgentFailed / the expert's Timeout
                self.state["extra.expert_plan"] = []
                self.state["extra.expert_error"] = f"{type(e).__name__} {e}".strip()

    return SafeExpert


class Engine:
    """One engine reused across games: ``load(game_file, seed)`` then ``step(command)``.

    ``expert``: 'handcoded' (alfworld's hand-coded expert), 'planner' (fast-downward replanning every
    step; slow) or None (no expert: agent-only play)."""

    def __init__(self, expert: str | None = "handcoded", fast: bool = True) -> None:
        if expert is not None and expert not in EXPERT_TYPES:
            raise EnvError(f"unknown ALFWorld expert {expert!r} (choose one of: {', '.join(EXPERT_TYPES)})")
        if fast:
            install_speedups()
        import textworld
        from textworld.envs import PddlEnv

        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        self.expert = expert
        self._loaded: tuple | None = None  # (path, mtime, size) of the loaded game
        self._rng = IsolatedRandom(0)
        extras = ["gamefile"] + (["expert_plan"] if expert else [])
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
        self._pddl = PddlEnv(infos)
        env = AlfredInfos(AlfredDemangler(self._pddl, shuffle=False))
        self._env = _safe_expert_class()(env, expert_type=expert) if expert else env

    @contextmanager
    def _guard(self) -> Iterator[None]:
        argv = list(sys.argv)
        token = _NO_REPLAN.set(self.expert != "planner")
        try:
            with self._rng.active():
                yield
        finally:
            _NO_REPLAN.reset(token)
            sys.argv[:] = argv

    def load(self, game_file: str | Path, seed: str) -> dict[str, Any]:
        """Load a game and reset it; the expert draws from a stream seeded with ``seed``."""
        self._rng = IsolatedRandom(seed)
        stat = Path(game_file).stat()
        key = (str(game_file), stat.st_mtime_ns, stat.st_size)  # a rewritten file is loaded again
        with self._guard():
            if key != self._loaded:
                self._loaded = None
                self._env.load(str(game_file))
                self._loaded = key
            return self._env.reset()

    def step(self, command: str) -> tuple[dict[str, Any], bool]:
        with self._guard():
            state, _, done = self._env.step(command)
        return state, bool(done)

    def close(self) -> None:
        # fast-downward's close_lib (dlclose) crashes the process when textworld objects of the game
        # are collected afterwards; the library copy is released with the process, as textworld does
        self._env = self._pddl = None
        self._loaded = None


def read_game(path: str | Path) -> dict[str, Any]:
    """A ``game.tw-pddl`` file as a dict; a clear EnvError if it is missing or corrupt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnvError(f"{path}: ALFWorld game file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EnvError(f"{path}: corrupt ALFWorld game file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise EnvError(f"{path}: corrupt ALFWorld game file (not a JSON object)")
    missing = [k for k in ("pddl_domain", "grammar", "pddl_problem") if not isinstance(data.get(k), str)]
    if missing:
        raise EnvError(f"{path}: corrupt ALFWorld game file (missing {', '.join(missing)})")
    return data


def action_syntax(grammar: str) -> str:
    """'move' when the game's put action reads ``move X to Y`` (alfworld >= 0.4), else 'put'
    (``put X in/on Y``, the games of alfworld < 0.4)."""
    return "move" if "move {o} to {r}" in grammar else "put"


@dataclass
class Solution:
    walkthrough: list[str] | None  # None: not solved
    reason: str = ""  # why not


def solve(engine: Engine, game_file: str | Path, seed: str, max_steps: int) -> Solution:
    """Play the expert on a game: ``alfworld-generate``'s ``is_solvable``, bounded by ``max_steps``."""
    walkthrough: list[str] = []
    try:
        state = engine.load(game_file, seed)
        if engine.expert == "planner":
            plan = list(state.get("extra.expert_plan") or [])
            if not plan:
                return Solution(None, "no plan")
            if len(plan) > max_steps:
                return Solution(None, "too long")
            return Solution(plan)
        done = False
        while not done:
            plan = state.get("extra.expert_plan") or []
            if not plan:
                return Solution(None, "expert gave up")
            if len(walkthrough) >= max_steps:
                return Solution(None, "too long")
            state, done = engine.step(plan[0])
            walkthrough.append(plan[0])
    except EnvError:
        raise
    except Exception as e:  # the engine's own failure on this game: unsolvable, with the reason
        return Solution(None, f"engine error ({type(e).__name__})")
    return Solution(walkthrough)
