"""Offline ALFWorld game generation from the ALFRED scenes shipped in the alfworld wheel.

The official games (``json_2.1.1``) cannot be downloaded everywhere. The wheel ships what is needed
to synthesise games of the same kind: the receptacles and object types of 120 ALFRED scenes
(``alfworld/gen/layouts``), which receptacle may hold which object (``gen/constants.py``), the goal
PDDL and task templates of the 6 task types (``gen/goal_library.py``), the PDDL domain and the text
grammar (``alfworld/data``). Per game we pick a scene, place the scene's object types in compatible
receptacles, pick targets whose goal is not already true, write ``traj_data.json`` +
``initial_state.pddl``, and build ``game.tw-pddl`` the way ``alfworld-generate`` does (grammar with
the task text, solvability check by the hand-coded expert, walkthrough).

Games are deterministic for (seed, split, task type, index), so a larger set extends a smaller one
and a rerun finds every game already built. Train games use ALFRED's train scenes, test games its
test scenes (never seen in training, like ``valid_unseen``). Generated games are labelled as such
(``traj_data.json: exprag.generated``): results on them are not comparable with published numbers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from exprag.errors import EnvError, UnknownTaskTypeError
from exprag.io import atomic_write_json, atomic_write_text

GENERATOR = "exprag-alfworld-gen"
GENERATOR_VERSION = 1
# alfworld's numbering (alfworld-generate / AlfredTWEnv TASK_TYPES 1..6)
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLIT_DIRS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
DATA_DIR = "json_2.1.1"
DEFAULT_MAX_EXPERT_STEPS = 50  # the paper's step cap: a game the expert cannot win in T steps is dropped

LAMPS = ("DeskLamp", "FloorLamp")
# ALFRED has no receptacle table for lamps (they stand on furniture); the furniture a lamp is put on.
LAMP_RECEPTACLES = ("Desk", "SideTable", "Dresser", "CoffeeTable", "DiningTable", "TVStand", "Shelf")
# the appliance each state-change task needs, which is also never the task's destination
APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
ACTION_PROPERTY = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable", "Sliceable": "sliceable"}
STEP = 0.25  # ALFRED's grid size (constants.AGENT_STEP_SIZE)


# ---- scenes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Receptacle:
    id: str  # ALFRED object id, e.g. "Cabinet|+00.68|+00.50|-02.20" or "Sink|...|SinkBasin"
    type: str
    loc: str  # "loc|x|z|rotation|horizon" on ALFRED's grid


@dataclass(frozen=True)
class Scene:
    num: int
    kind: str  # Kitchen | LivingRoom | Bedroom | Bathroom
    receptacles: tuple[Receptacle, ...]
    object_types: tuple[str, ...]  # placeable object types present in the scene (lamps included)
    points: tuple[tuple[int, int], ...]  # navigable grid points


def _constants():
    import alfworld.gen.constants as constants

    return constants


def _layouts_dir() -> Path:
    import alfworld.gen

    return Path(alfworld.gen.__file__).parent / "layouts"


@lru_cache(maxsize=1)
def _tables() -> dict:
    c = _constants()
    static = set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)
    placeable = set().union(*c.VAL_RECEPTACLE_OBJECTS.values()) - static
    placeable = {o for o in placeable if not o.endswith("Sliced")}
    can_contain = {r: set(objs) & placeable for r, objs in c.VAL_RECEPTACLE_OBJECTS.items() if r in static}
    for lamp in LAMPS:
        for r in LAMP_RECEPTACLES:
            can_contain.setdefault(r, set()).add(lamp)
    return {
        "static": static,
        "placeable": placeable | set(LAMPS),
        "can_contain": can_contain,
        "movable": set(c.MOVABLE_RECEPTACLES),
        "openable": set(c.OPENABLE_CLASS_LIST),
        "actions": {k: set(v) for k, v in c.VAL_ACTION_OBJECTS.items()},
        "scene_kind": {kind: set(nums) for kind, nums in c.SCENE_TYPE.items()},
        "valid_kinds": {k: set(v) for k, v in c.GOALS_VALID.items()},
    }


def scene_numbers(split: str) -> list[int]:
    """ALFRED's scene split: train (and dev) games on train scenes, test games on test scenes."""
    c = _constants()
    if split not in SPLIT_DIRS:
        raise EnvError(f"unknown split {split!r} (choose one of: {', '.join(SPLIT_DIRS)})")
    nums = c.TEST_SCENE_NUMBERS if split == "test" else c.TRAIN_SCENE_NUMBERS
    return sorted(n for n in nums if (_layouts_dir() / f"FloorPlan{n}-objects.json").is_file())


def _fmt(v: float) -> str:
    """A coordinate as ALFRED writes it in object ids: '+00.68', '-01.18', '00.00'."""
    return "00.00" if abs(v) < 0.005 else f"{v:+06.2f}"


def _parse_id_pos(obj_id: str) -> tuple[float, float, float]:
    x, y, z = (float(p) for p in obj_id.split("|")[1:4])
    return x, y, z


def _id_type(obj_id: str) -> str:
    parts = obj_id.split("|")
    return parts[4] if len(parts) == 5 else parts[0]


def _loc(x: int, z: int, rot: int, hor: int) -> str:
    return f"loc|{x}|{z}|{rot}|{hor}"


@lru_cache(maxsize=None)
def load_scene(num: int) -> Scene:
    import numpy as np

    t = _tables()
    base = _layouts_dir() / f"FloorPlan{num}"
    try:
        types = json.loads(Path(f"{base}-objects.json").read_text())
        poses = json.loads(Path(f"{base}-openable.json").read_text())
        points = [(int(round(x / STEP)), int(round(z / STEP))) for x, z in np.load(f"{base}-layout.npy", allow_pickle=False).tolist()]
    except (OSError, ValueError) as e:
        raise EnvError(f"{base}-*: cannot read the ALFRED scene layout ({e})") from None
    kind = next(k for k, nums in t["scene_kind"].items() if num in nums)
    rng = random.Random(f"scene:{num}")  # synthesised receptacles are the same in every game
    used: set[str] = set()

    def unique(loc: tuple[int, int, int, int]) -> str:
        x, z, rot, hor = loc
        while _loc(x, z, rot, hor) in used:  # one receptacle per location, as 'go to' needs
            hor += 15
        used.add(_loc(x, z, rot, hor))
        return _loc(x, z, rot, hor)

    receps: list[Receptacle] = []
    for rid, (x, z, rot, hor) in sorted(poses.items()):
        rtype = _id_type(rid)
        if rtype in t["static"]:
            pose = (round(x / STEP), round(z / STEP), int(rot) // 90 % 4, int(hor))
            receps.append(Receptacle(rid, rtype, unique(pose)))
    have = {r.type for r in receps}
    for rtype in sorted(set(types) & t["static"] - have):
        # receptacles without a precomputed pose (garbage cans, toasters, towel holders...): one
        # instance at a random navigable point (the StoveBurner of a kitchen: four)
        for _ in range(4 if rtype == "StoveBurner" else 1):
            px, pz = rng.choice(points)
            y = rng.uniform(0.0, 1.6)
            prefix = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}.get(rtype, rtype)
            rid = f"{prefix}|{_fmt(px * STEP)}|{_fmt(y)}|{_fmt(pz * STEP)}"
            rid += f"|{rtype}" if rtype != prefix else ""
            receps.append(Receptacle(rid, rtype, unique((px, pz, rng.randrange(4), 30))))
    objs = tuple(sorted(set(types) & t["placeable"]))
    return Scene(num, kind, tuple(receps), objs, tuple(points))


# ---- sampling a game -------------------------------------------------------------------------------
@dataclass
class GameSpec:
    task_type: str
    scene: int
    object_target: str
    parent_target: str  # "" for look_at_obj_in_light
    toggle_target: str  # "" unless look_at_obj_in_light
    task_desc: str
    objects: list[tuple[str, str, str]]  # (object id, type, receptacle id)
    agent_loc: str
    receptacles: list[Receptacle] = field(default_factory=list)


def _holders(scene: Scene, otype: str, exclude: set[str] = frozenset()) -> list[Receptacle]:
    cc = _tables()["can_contain"]
    return [r for r in scene.receptacles if otype in cc.get(r.type, ()) and r.type not in exclude]


def _start_exclude(task_type: str, parent: str) -> set[str]:
    """Receptacle types a task's target may not start in: the goal's (else the goal may already
    hold) and the task's appliance (else the task needs no trip to it)."""
    return {parent} | ({APPLIANCE[task_type]} if task_type in APPLIANCE else set())


def _candidates(task_type: str, scene: Scene) -> list[tuple[str, str, str]]:
    """(object, parent, toggle) target triples that make a sensible, not yet achieved goal here."""
    t = _tables()
    rtypes = {r.type for r in scene.receptacles}
    out: list[tuple[str, str, str]] = []
    pickable = [o for o in scene.object_types if o not in LAMPS and _holders(scene, o)]
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in LAMPS if lamp in scene.object_types and _holders(scene, lamp)]
        return [(o, "", lamp) for lamp in lamps for o in pickable]
    appliance = APPLIANCE.get(task_type)
    if appliance and appliance not in rtypes:
        return []
    need = {"pick_clean_then_place_in_recep": "Cleanable", "pick_heat_then_place_in_recep": "Heatable",
            "pick_cool_then_place_in_recep": "Coolable"}.get(task_type)
    for o in pickable:
        if need and o not in t["actions"][need]:
            continue
        for parent in sorted({r.type for r in _holders(scene, o)}):
            if parent == appliance:
                continue
            if not _holders(scene, o, exclude=_start_exclude(task_type, parent)):
                continue  # nowhere to start from
            out.append((o, parent, ""))
    return out


def sample_game(task_type: str, split: str, rng: random.Random) -> GameSpec | None:
    """A random game of ``task_type`` on a scene of ``split``; None if no scene fits (never, in practice)."""
    t = _tables()
    kinds = t["valid_kinds"][task_type]
    scenes = [n for n in scene_numbers(split) if load_scene(n).kind in kinds]
    rng.shuffle(scenes)
    for num in scenes:
        scene = load_scene(num)
        cands = _candidates(task_type, scene)
        if cands:
            break
    else:
        return None
    obj_t, parent_t, toggle_t = rng.choice(cands)

    # instances: 1-3 of each object type (ALFRED's MAX_NUM_OF_OBJ_INSTANCES), 2-3 for pick_two's target
    objects: list[tuple[str, str, str]] = []
    used_ids: set[str] = set()
    for otype in scene.object_types:
        if otype in LAMPS and otype != toggle_t and rng.random() < 0.5:
            continue
        n = rng.choice((1, 1, 1, 2, 2, 3))
        if otype == obj_t and task_type == "pick_two_obj_and_place":
            n = max(n, 2)
        if otype in LAMPS:
            n = 1
        holders = _holders(scene, otype, _start_exclude(task_type, parent_t) if otype == obj_t else set())
        if not holders:
            continue
        for _ in range(n):
            r = rng.choice(holders)
            rx, ry, rz = _parse_id_pos(r.id)
            oid = ""
            while not oid or oid in used_ids:  # an ALFRED-style id: type and position
                x, y, z = rx + rng.uniform(-0.4, 0.4), ry + rng.uniform(0, 0.2), rz + rng.uniform(-0.4, 0.4)
                oid = f"{otype}|{_fmt(x)}|{_fmt(y)}|{_fmt(z)}"
            used_ids.add(oid)
            objects.append((oid, otype, r.id))
    # the agent starts in the middle of the room, on a grid point where no receptacle is
    recep_points = {tuple(int(v) for v in r.loc.split("|")[1:3]) for r in scene.receptacles}
    free = [p for p in scene.points if p not in recep_points] or list(scene.points)
    px, pz = rng.choice(free)
    agent_loc = _loc(px, pz, rng.randrange(4), 30)
    import alfworld.gen.goal_library as glib

    template = rng.choice(glib.gdict[task_type]["templates"])
    desc = template.format(obj=obj_t.lower(), recep=parent_t.lower(), toggle=toggle_t.lower(), mrecep="")
    return GameSpec(task_type, scene.num, obj_t, parent_t, toggle_t, desc, objects, agent_loc,
                    list(scene.receptacles))


# ---- writing a game --------------------------------------------------------------------------------
def mangle(name: str) -> str:
    """ALFRED ids as PDDL names (PlannedGameState.fix_pddl_str_chars)."""
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


def problem_pddl(spec: GameSpec, name: str) -> str:
    import alfworld.gen.goal_library as glib

    t = _tables()
    receps = spec.receptacles
    rtypes = sorted({r.type for r in receps})
    otypes = sorted({o[1] for o in spec.objects})
    locs = sorted({r.loc for r in receps} | {spec.agent_loc})
    recep_loc = {r.id: r.loc for r in receps}
    lines = ["(define (problem plan_%s)" % name, "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{o}Type - otype" for o in otypes] + [f"{r}Type - rtype" for r in rtypes]
    lines += [f"{mangle(o[0])} - object" for o in spec.objects]
    lines += [f"{mangle(r.id)} - receptacle" for r in receps]
    lines += [f"{mangle(loc)} - location" for loc in locs]
    lines += [")", "(:init", f"(atLocation agent1 {mangle(spec.agent_loc)})"]
    for r in receps:
        lines.append(f"(receptacleType {mangle(r.id)} {r.type}Type)")
        lines.append(f"(receptacleAtLocation {mangle(r.id)} {mangle(r.loc)})")
        if r.type in t["openable"]:
            lines.append(f"(openable {mangle(r.id)})")
    for oid, otype, rid in spec.objects:
        o = mangle(oid)
        lines += [f"(objectType {o} {otype}Type)", f"(inReceptacle {o} {mangle(rid)})",
                  f"(objectAtLocation {o} {mangle(recep_loc[rid])})"]
        if otype in LAMPS:
            lines.append(f"(toggleable {o})")
        else:
            lines.append(f"(pickupable {o})")
        if otype in t["movable"]:
            lines.append(f"(isReceptacleObject {o})")
        for group, pred in ACTION_PROPERTY.items():
            if otype in t["actions"][group]:
                lines.append(f"({pred} {o})")
    for r in rtypes:
        for o in otypes:
            if o in t["can_contain"].get(r, ()):
                lines.append(f"(canContain {r}Type {o}Type)")
    lines.append(")")
    goal = glib.gdict[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep="")
    return "\n".join(lines) + "\n" + goal.replace("#", "-").strip() + "\n"


def traj_data(spec: GameSpec, task_id: str, seed: int, index: int, split: str) -> dict:
    """The fields of ALFRED's traj_data.json that alfworld reads, plus our provenance."""
    return {
        "task_id": task_id,
        "task_type": spec.task_type,
        "pddl_params": {
            "object_target": spec.object_target,
            "parent_target": spec.parent_target,
            "toggle_target": spec.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": f"FloorPlan{spec.scene}", "scene_num": spec.scene},
        "turk_annotations": {"anns": [{"task_desc": spec.task_desc, "high_descs": []}]},
        "exprag": {"generated": True, "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
                   "seed": seed, "index": index, "split": split, "task_desc": spec.task_desc},
    }


def game_dirname(spec: GameSpec) -> str:
    """``<task_type>-<Object>-<Mrecep>-<Parent>-<scene>`` as in json_2.1.1."""
    parent = spec.parent_target or spec.toggle_target
    return f"{spec.task_type}-{spec.object_target}-None-{parent}-{spec.scene}"


# ---- game identity ---------------------------------------------------------------------------------
_TRIAL_RE = re.compile(r"trial_gen_s(\d+)_(\d+)")


def _rng(seed: int, split: str, task_type: str, index: int) -> random.Random:
    """The stream game ``index`` of (seed, split, task type) is drawn from: games are deterministic in it."""
    return random.Random(f"{GENERATOR}:{GENERATOR_VERSION}:{seed}:{split}:{task_type}:{index}")


def spec_of(task_id: str, split: str) -> GameSpec:
    """The GameSpec a generated game's task id ``<folder>/trial_gen_s<seed>_<index>`` was built from, drawn
    again from its seeded stream (no file needed); EnvError if the id is not a generated game's, or if
    the draw no longer gives its folder (another generator version)."""
    folder, _, trial = task_id.partition("/")
    m = _TRIAL_RE.fullmatch(trial)
    task_type = folder.split("-", 1)[0]
    if not m or task_type not in TASK_TYPES:
        raise EnvError(f"{task_id!r} is not a generated ALFWorld game id (<task type>-...-<scene>/trial_gen_s<seed>_<index>)")
    spec = sample_game(task_type, split, _rng(int(m.group(1)), split, task_type, int(m.group(2))))
    if spec is None or game_dirname(spec) != folder:
        raise EnvError(f"{task_id!r}: generator v{GENERATOR_VERSION} draws {game_dirname(spec) if spec else 'no game'} "
                       f"for this seed and index on split {split!r}; the id was made by another generator or split")
    return spec


def game_identity(spec: GameSpec) -> str:
    """What makes two generated games the same game to play: the task type, scene, goal targets, where each
    object starts (its type and receptacle) and where the agent starts. The sampled coordinates in object
    ids and the wording of the task text are left out, so two games that differ only in those count as
    one (a stricter test of disjointness)."""
    placed = sorted((otype, recep) for _, otype, recep in spec.objects)
    key = [spec.task_type, spec.scene, spec.object_target, spec.parent_target, spec.toggle_target, placed, spec.agent_loc]
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]


def candidate_ids(split: str, seed: int, per_type: int, task_types: list[str]) -> list[str]:
    """The task ids of every candidate game ``generate`` may look at for (split, seed, per_type), solvable
    or not (indices below its default ``max_attempts``): a superset of the games it keeps, found without
    building anything."""
    out = []
    for tt in task_types:
        for index in range(4 * per_type + 8):
            spec = sample_game(tt, split, _rng(seed, split, tt, index))
            if spec is not None:
                out.append(f"{game_dirname(spec)}/{_trial_name(seed, index)}")
    return out


# ---- the generation run ----------------------------------------------------------------------------
@dataclass
class TypeReport:
    generated: int = 0  # solvable games in the set (built now or found built)
    built: int = 0  # candidates built by this run
    dropped: int = 0  # unsolvable candidates skipped on the way (built now or found built)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # wall time this run spent building games of this type
    games: list[Path] = field(default_factory=list)  # game.tw-pddl of the solvable games, in order
    cached: bool = False  # the whole type came from an earlier run's manifest


@dataclass
class GenReport:
    root: Path  # the json_2.1.1 directory
    split: str
    seed: int
    per_type: int
    types: dict[str, TypeReport] = field(default_factory=dict)

    @property
    def games(self) -> list[Path]:
        return [g for rep in self.types.values() for g in rep.games]

    @property
    def cached(self) -> bool:
        return all(rep.cached for rep in self.types.values())


def data_root(out: str | Path) -> Path:
    """``OUT/json_2.1.1`` (the layout of the official data, so ALFWORLD_DATA=OUT works too)."""
    return Path(out) / DATA_DIR


def _trial_name(seed: int, index: int) -> str:
    return f"trial_gen_s{seed}_{index:05d}"


def manifest_path(out: str | Path, split: str, seed: int) -> Path:
    return data_root(out) / SPLIT_DIRS[split] / f"exprag_generation_s{seed}.json"


class GenerationBar:
    """A progress bar fed by ``generate``'s per-candidate callback: solvable games count, dropped ones
    show in the postfix. With ``lazy`` it appears at the first candidate only, so a set that is already
    built (``generate`` then calls nothing) shows no bar."""

    def __init__(self, total: int, desc: str, *, lazy: bool = False) -> None:
        self.total, self.desc, self.dropped, self._bar = total, desc, 0, None
        if not lazy:
            self._open()

    def _open(self) -> None:
        from exprag.progress import bar

        self._bar = bar(total=self.total, desc=self.desc, unit="game")

    def __call__(self, task_type: str, solvable: bool) -> None:
        if self._bar is None:
            self._open()
        if solvable:
            self._bar.update(1)
        else:
            self.dropped += 1
            self._bar.set_postfix(dropped=self.dropped)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def generate(
    out: str | Path,
    *,
    split: str = "train",
    per_type: int = 10,
    seed: int = 0,
    task_types: list[str] | None = None,
    max_expert_steps: int = DEFAULT_MAX_EXPERT_STEPS,
    max_attempts: int | None = None,
    progress: Callable[[str, bool], None] | None = None,
    build: bool = True,
) -> GenReport | None:
    """Build (or find built) ``per_type`` solvable games per task type under ``OUT/json_2.1.1/<split>``.

    Candidates are tried in index order; an unsolvable one stays on disk marked ``solvable: false``
    (so reruns skip it, as alfworld does) and is counted as dropped. A per-seed manifest beside the
    games records each type's set, so the same request again returns at once. ``build=False``
    returns None instead of building anything. ``progress(task_type, solvable)`` is called once per
    candidate game looked at (for a progress bar)."""
    if per_type < 0:
        raise EnvError(f"per_type must be >= 0, got {per_type}")
    types = list(task_types) if task_types else list(TASK_TYPES)
    for tt in types:
        if tt not in TASK_TYPES:
            raise UnknownTaskTypeError(f"unknown ALFWorld task type {tt!r}; use one of: {', '.join(TASK_TYPES)}")
    scene_numbers(split)  # validates the split
    root = data_root(out)
    split_dir = root / SPLIT_DIRS[split]
    mpath = manifest_path(out, split, seed)
    head = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "split": split, "seed": seed,
            "max_expert_steps": max_expert_steps}
    manifest = _read_manifest(mpath, head)
    report = GenReport(root, split, seed, per_type)
    max_attempts = max_attempts if max_attempts is not None else 4 * per_type + 8
    engine = None
    domain = grammar = ""
    for tt in types:
        entry = manifest["types"].get(tt)
        if entry and entry["per_type"] == per_type and all((root / g).is_file() for g in entry["games"]):
            report.types[tt] = TypeReport(entry["generated"], 0, entry["dropped"], Counter(entry["reasons"]),
                                          0.0, [root / g for g in entry["games"]], cached=True)
            continue
        if not build:
            return None
        rep = report.types[tt] = TypeReport()
        for index in range(max_attempts):
            if rep.generated >= per_type:
                break
            t0 = time.perf_counter()
            spec = sample_game(tt, split, _rng(seed, split, tt, index))
            if spec is None:
                rep.dropped += 1
                rep.reasons["no scene fits"] += 1
                continue
            game_dir = split_dir / game_dirname(spec) / _trial_name(seed, index)
            status = _built_status(game_dir / "game.tw-pddl")
            if status is None:
                if engine is None:
                    from exprag.envs.alfworld_engine import Engine

                    engine = Engine("handcoded")
                    domain, grammar = _logic_files()
                status = _build(engine, game_dir, spec, seed, index, split, domain, grammar, max_expert_steps)
                rep.built += 1
                rep.seconds += time.perf_counter() - t0
            solvable, reason = status
            if solvable:
                rep.generated += 1
                rep.games.append(game_dir / "game.tw-pddl")
            else:
                rep.dropped += 1
                rep.reasons[reason] += 1
            if progress:
                progress(tt, solvable)
        manifest["types"][tt] = {"per_type": per_type, "generated": rep.generated, "dropped": rep.dropped,
                                 "reasons": dict(rep.reasons),
                                 "games": [str(g.relative_to(root)) for g in rep.games]}
        atomic_write_json(mpath, manifest)
    if engine is not None:
        engine.close()
    return report


def _read_manifest(path: Path, head: dict) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in head.items()):
        return {**head, "types": {}}
    data.setdefault("types", {})
    return data


def _logic_files() -> tuple[str, str]:
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    return Path(ALFRED_PDDL_PATH).read_text(), Path(ALFRED_TWL2_PATH).read_text()


def _built_status(game_file: Path) -> tuple[bool, str] | None:
    """(solvable, reason) of a game built by an earlier run; None if absent or unfinished."""
    try:
        data = json.loads(game_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("solvable") is None:
        return None
    return bool(data["solvable"]), str(data.get("exprag_unsolvable_reason") or "unsolvable")


def _build(engine, game_dir: Path, spec: GameSpec, seed: int, index: int, split: str,
           domain: str, grammar: str, max_expert_steps: int) -> tuple[bool, str]:
    from exprag.envs.alfworld_engine import solve

    task_id = f"{game_dirname(spec)}/{_trial_name(seed, index)}"
    td = traj_data(spec, task_id, seed, index, split)
    name = _trial_name(seed, index)
    problem = problem_pddl(spec, name)
    # alfworld's add_task_to_grammar, with the template drawn from the game's own seeded stream
    # (alfworld draws it from the global random module, which would make games irreproducible)
    game_grammar = grammar.replace("UNKNOWN GOAL", spec.task_desc)
    game_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(game_dir / "traj_data.json", td)
    atomic_write_text(game_dir / "initial_state.pddl", problem)
    game_file = game_dir / "game.tw-pddl"
    gamedata = {"pddl_domain": domain, "grammar": game_grammar, "pddl_problem": problem,
                "solvable": None, "walkthrough": None}
    atomic_write_text(game_file, json.dumps(gamedata))
    sol = solve(engine, game_file, seed=task_id, max_steps=max_expert_steps)
    gamedata["walkthrough"] = sol.walkthrough
    gamedata["solvable"] = sol.walkthrough is not None
    if sol.walkthrough is None:
        gamedata["exprag_unsolvable_reason"] = sol.reason
    atomic_write_text(game_file, json.dumps(gamedata))
    return gamedata["solvable"], gamedata.get("exprag_unsolvable_reason", "")
