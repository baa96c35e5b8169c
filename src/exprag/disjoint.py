"""Held-out test games that must not be shared between experiments (a confirmatory run is tested on games
that did not generate the finding it confirms; McNemar assumes independent pairs).

A generated ALFWorld game's identity is ``alfworld_gen.game_identity``: task type, scene, goal targets,
where each object and the agent start. An experiment's test games come from one of:

- an experiment directory: the test games its data stage kept (``data/ceiling.json``, groups ``test-*``);
- an experiment config (``.yaml`` / ``.yml``): every candidate test game its settings can generate (its
  test split's ``gen_seed`` and ``gen_per_type``, the task types of its grid's groups), a superset of
  the games it will keep, known before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exprag.errors import DataFormatError


@dataclass(frozen=True)
class GameSet:
    source: str  # the path as given
    split: str
    ids: dict[str, str]  # identity -> task id
    complete: bool  # True: the games kept; False: every candidate (a superset)


def _identities(task_ids: list[str], split: str, where: str) -> dict[str, str]:
    from exprag.envs import alfworld_gen as gen
    from exprag.errors import EnvError

    out: dict[str, str] = {}
    for tid in task_ids:
        try:
            key = gen.game_identity(gen.spec_of(tid, split))
        except EnvError as e:
            raise DataFormatError(f"{where}: {e}") from None
        if key in out:
            raise DataFormatError(f"{where}: {tid!r} and {out[key]!r} are the same game (identity {key})")
        out[key] = tid
    return out


def kept_test_games(run_dir: str | Path) -> GameSet:
    """The test games an experiment directory's data stage kept (``data/ceiling.json``)."""
    from exprag.validate import read_json

    path = Path(run_dir) / "data" / "ceiling.json"
    if not path.is_file():
        raise DataFormatError(f"{path}: not found; disjoint_from names experiment directories whose data "
                              f"stage has run, or experiment configs")
    record = read_json(path)
    groups = record.get("groups") if isinstance(record, dict) else None
    groups = {g: v for g, v in groups.items() if g.startswith("test-") and isinstance(v, dict)} \
        if isinstance(groups, dict) else {}
    splits = {v.get("split") for v in groups.values()}
    if not groups or len(splits) != 1:
        raise DataFormatError(f"{path}: field 'groups': expected test-* groups of one split, got {sorted(groups)}")
    ids = [t for v in groups.values() for t in v.get("kept") or []]
    split = splits.pop()
    return GameSet(str(run_dir), split, _identities(ids, split, str(path)), complete=True)


def candidate_test_games(config: str | Path) -> GameSet:
    """Every candidate test game an experiment config's settings can generate."""
    from exprag.envs import alfworld_gen as gen
    from exprag.envs.alfworld import _gen_per_type, _gen_seed
    from exprag.envs.splits import resolve_task_types
    from exprag.experiment import expand, load_experiment_config

    cfg = load_experiment_config(config)
    if cfg.env != "alfworld" or cfg.env_args.get("data_dir"):
        raise DataFormatError(f"{config}: disjointness is checked for generated ALFWorld games only "
                              f"(env {cfg.env!r}{', data_dir given' if cfg.env_args.get('data_dir') else ''})")
    split = cfg.data.test_split
    seed = _gen_seed(cfg.env_args.get("gen_seed"))[split]
    per_type = _gen_per_type(cfg.env_args.get("gen_per_type"))[split]
    groups = dict.fromkeys(c.group for c in expand(cfg))
    types = list(dict.fromkeys(t for g in groups for t in resolve_task_types(cfg.env, cfg.group_types(g))))
    ids = gen.candidate_ids(split, seed, per_type, types)
    return GameSet(str(config), split, _identities(ids, split, str(config)), complete=False)


def game_set(source: str | Path) -> GameSet:
    """A directory's kept test games, or a config's candidate test games (see the module docstring)."""
    p = Path(source)
    return candidate_test_games(p) if p.suffix in (".yaml", ".yml") else kept_test_games(p)


def shared(a: GameSet, b: GameSet) -> list[tuple[str, str]]:
    """(task id in a, task id in b) of every game in both sets (games of different splits never are)."""
    if a.split != b.split:
        return []
    return sorted((a.ids[k], b.ids[k]) for k in a.ids.keys() & b.ids.keys())


def check_disjoint(task_ids: list[str], split: str, others: list[str], where: str) -> None:
    """DataFormatError, naming the first shared game, unless ``task_ids`` (games of ``split``) share no game
    with any of ``others`` (experiment directories or configs), nor a game with itself."""
    mine = GameSet(where, split, _identities(task_ids, split, where), complete=True)
    for other in others:
        both = shared(mine, game_set(other))
        if both:
            raise DataFormatError(f"{where}: field 'data.disjoint_from': {len(both)} test games are also "
                                  f"test games of {other}, e.g. {both[0][0]} = {both[0][1]}")
