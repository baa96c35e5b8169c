"""`exprag experiment`: the paper's method grid (docs/method.md#method-grid) from one YAML file, resumably.

An experiment directory holds, each stage reused when it is already there::

    experiment.json   the resolved config, the command, commit, machine, and time spent per stage
    data/             expert trajectories: train-easy / train-hard (banks, training), dev-easy (val loss);
                      with an expert ceiling or oracle cells, test-<group> (and ceiling.json: the games
                      kept for test and selection, and why the others were dropped)
    banks/            easy, hard and all (easy + hard) train banks, per retriever (see RetrieverSettings);
                      oracle-<group>: the test games' expert trajectories, for the diagnostic oracle cells
    adapters/         one LoRA and one ExpRAG-LoRA adapter per (model, seed), each trained once
    cells/            one evaluation run (exprag.evaluate) per cell: model x method x task group x memory
                      source x K x mode x seed (docs/method.md#glossary)
    results.jsonl     one row per finished cell (rewritten atomically after every cell), with the retriever
                      it used and its per-episode outcomes (paired statistics); results.md: the table
    training.json     per adapter: loss and rollout success by epoch

Results rows, cell.json, cell ids and experiment.json keep the file field names ``split`` (the task
group) and ``bank`` (the memory source), so that runs written before the names changed still resume
and report (docs/method.md#glossary).

A killed run resumes where it stopped: finished cells are not rerun, a half-finished cell resumes
episode by episode, an interrupted training resumes from its last checkpoint. With ``eval.ray`` the
unfinished cells run as Ray tasks (exprag.ray_cells) into the same directories.

No ``from __future__ import annotations``: ``exprag.config.from_dict`` reads the nested sections
(``data:``, ``eval:``) into their dataclasses from the real annotations.
"""

import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from exprag.config import EvalConfig, RetrievalConfig, from_dict, read_yaml
from exprag.errors import DataFormatError, ExpragError
from exprag.io import atomic_write_json, atomic_write_text, check_output_dir, iter_json_lines, run_lock
from exprag.memory_block import MemorySpec
from exprag.methods import DIAGNOSTIC_SOURCES, GROUPS, METHODS, SOURCES
from exprag.validate import FIELD_RULES, NON_NEGATIVE, POSITIVE, read_json
from exprag.workers import WorkerSpec

Log = Callable[[str], None]
# Fields of the training config that the runner sets itself (data, model, output, seed, memory).
_RUNNER_TRAIN_FIELDS = ("trajectories", "val_trajectories", "model", "out", "seed", "retrieval")
# Eval fields that may differ between a finished cell and its rerun without changing the measurement.
_CELL_RESUMABLE = {"out", "batch_size", "request_timeout", "concurrency"}  # transport settings do not change results
_SCORINGS = ("procedure", "dense", "bm25")  # exprag.bank.scoring.SCORINGS (not imported: it loads numpy)
_MINILM, _BM25 = "minilm", "bm25"
_CEILING_LOOK = 5  # with an expert ceiling, games looked at per type: at most this x test_per_type


@dataclass
class RetrieverSettings:
    """How the experiment's banks score trajectories against a query (exprag.bank.scoring).

    ``procedure``: exprag's procedure-weighted lexical score (+ a small dense term); ``dense``: the
    paper's dot product of normalised sentence embeddings; ``bm25``: plain BM25 (no model). ``encoder``
    is ``minilm`` (bundled), ``bm25``, or a sentence-transformers id / local directory. When it cannot
    be loaded (offline, not cached) the experiment fails, unless ``encoder_fallback`` names an encoder
    to use instead; the fallback is then recorded in the bank, every cell's row and the report."""

    scoring: str = "procedure"
    encoder: str | None = None  # None = the experiment's top-level `encoder` (minilm when unset)
    encoder_fallback: str | None = None


@dataclass(frozen=True)
class RetrieverSpec:
    """A resolved retriever; ``key`` names its banks and, for a grid block's override, its cells."""

    scoring: str
    encoder: str
    fallback: str | None = None

    @property
    def key(self) -> str:
        return _BM25 if self.scoring == _BM25 else f"{self.scoring}-{slug(self.encoder)}"

    @property
    def legacy(self) -> bool:
        """The retriever of experiments made before configs chose one (see bank_dir)."""
        return (self.scoring, self.encoder, self.fallback) == ("procedure", _MINILM, None)


@dataclass
class DataSettings:
    train_per_type: int | None = 10  # expert trajectories per train task type, easy and hard; None = all
    val_per_type: int = 2  # easy dev expert trajectories, for validation loss; 0 = none
    test_per_type: int | None = 5  # evaluation tasks per task type; None = all
    test_split: str = "test"
    # Keep as test and dev (checkpoint selection) games only those the expert solves within this
    # fraction of the step cap (e.g. 0.667), so that no cap falls below the expert; what was dropped
    # and why is written to data/ceiling.json. None = every selected game.
    expert_ceiling: float | None = None
    # The experiment's own task groups, e.g. {easy: [types trained], hard: [types held out]}, for a
    # held-out set other than the env's default easy / hard; a group not named keeps the env's default.
    task_types: dict[str, list[str]] | None = None
    # Other experiments whose test games this one's must not share (a confirmatory run on games that did
    # not generate the finding): experiment directories (the test games their data stage kept) or experiment
    # configs (every test game their settings can generate). Checked when the data stage keeps the test
    # games (exprag.disjoint); generated ALFWorld games only.
    disjoint_from: list[str] | None = None


@dataclass
class EvalSettings:
    max_steps: int | None = None  # None = the env's cap
    max_new_tokens: int = 32
    batch_size: int = 4
    memory_format: str = "json"
    token_budget: int | None = None  # memory tokens; the same budget is used to train ExpRAG-LoRA
    show_admissible: bool = False
    backend: str = "hf"
    base_url: str | None = None
    # Where the envs of cells and checkpoint selection run (exprag.workers); results do not depend on it.
    # With ray, each unfinished cell is one Ray task (exprag.ray_cells) asking for these resources, its
    # envs in the task; data and checkpoint selection keep `workers` Ray actors.
    workers: int = 1
    ray: str | None = None
    cell_cpus: float = 1.0
    cell_gpus: float = 0.0  # 1: one cell per GPU
    concurrency: int | None = None  # requests in flight to base_url (backend openai); None = 8


FIELD_RULES[EvalSettings] = {"cell_cpus": POSITIVE, "cell_gpus": NON_NEGATIVE}


@dataclass
class GridBlock:
    """A Cartesian product of grid axes; the experiment is the union of its blocks."""

    methods: list[str]
    groups: list[str] = field(default_factory=lambda: list(GROUPS))  # YAML `groups:` (or `splits:`)
    sources: list[str] = field(default_factory=lambda: ["matched"])  # YAML `sources:` (or `banks:`)
    k: list[int] | None = None  # None = [main_k]
    modes: list[str] = field(default_factory=lambda: ["static"])
    models: list[str] | None = None  # None = every model of the experiment
    # Fields of RetrieverSettings that this block's retrieving cells change (e.g. {scoring: procedure}):
    # they become extra cells, labelled with the retriever's key, beside the experiment's retriever.
    retrieval: dict[str, Any] | None = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    env: str = "alfworld"
    env_args: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    encoder: str | None = None  # shorthand for retrieval.encoder
    retrieval: RetrieverSettings = field(default_factory=RetrieverSettings)
    out: str | None = None  # None = runs/experiments/<name>
    seeds: list[int] = field(default_factory=lambda: [2025])
    main_k: int = 2  # K of the main table and of ExpRAG-LoRA's training memory (docs/method.md#exprag-lora)
    data: DataSettings = field(default_factory=DataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (epochs, lr, lora, selection...)
    grid: list[Any] = field(default_factory=list)  # GridBlock mappings
    # Pre-registered hypotheses, printed in the report header: [{id, text, comparison}], free-form.
    hypotheses: list[dict[str, Any]] = field(default_factory=list)
    alpha: float = 0.05  # significance level of the hypotheses' paired exact McNemar tests
    # The commit at which the hypotheses were written, older than every cell (shown by --list and the report).
    preregistered_at: str | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/experiments/{self.name}")

    def group_types(self, group: str) -> str:
        """The task types of a task group (easy | hard) as eval configs take them: the env's group name,
        or the comma list of ``data.task_types``; any other value (a type list) is returned as is."""
        custom = (self.data.task_types or {}).get(group)
        return ",".join(custom) if custom else group

    @property
    def retriever(self) -> RetrieverSpec:
        """The experiment's retriever: main cells, and ExpRAG-LoRA's training memory."""
        return _spec(self.retrieval, self.encoder)

    def memory(self, k: int, mode: str) -> MemorySpec:
        """The memory block of a cell (and, with ``main_k`` static, of ExpRAG-LoRA's training)."""
        return MemorySpec(k=k, mode=mode, format=self.eval.memory_format, token_budget=self.eval.token_budget)

    def agent_eval_config(self, model: str, seed: int) -> EvalConfig:
        """The evaluation settings every rollout of ``model`` shares, a cell's or a checkpoint
        selection's: the env and the agent's settings; each sets its tasks, adapter, memory and out."""
        e = self.eval
        return EvalConfig(env=self.env, env_args=dict(self.env_args), model=model, backend=e.backend,
                          base_url=e.base_url, concurrency=e.concurrency, max_steps=e.max_steps,
                          max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                          show_admissible=e.show_admissible, seed=seed)

    def block_retriever(self, block: GridBlock) -> RetrieverSpec:
        if not block.retrieval:
            return self.retriever
        return _spec(dataclasses.replace(self.retrieval, **block.retrieval), self.encoder)


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    group: str  # easy | hard: the task types under test
    source: str  # the memory source: matched | mismatched | all | empty | oracle | none (no retrieval)
    k: int | None
    mode: str | None
    seed: int | None  # None for the frozen model (greedy decoding: nothing random)
    retriever: str | None = None  # a grid block's retriever key; None = the experiment's retriever

    @property
    def id(self) -> str:
        parts = [self.method, self.group, self.source]
        if self.k is not None:
            parts += [f"k{self.k}", str(self.mode)]
        if self.retriever is not None:
            parts.append(self.retriever)
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return f"{slug(self.model)}/{'-'.join(parts)}"

    @property
    def retrieves(self) -> bool:
        return self.k is not None

    @property
    def record(self) -> dict[str, Any]:
        """The cell as results rows and cell.json hold it: the task group and memory source keep their
        file field names ``split`` and ``bank``."""
        return {"model": self.model, "method": self.method, "split": self.group, "bank": self.source,
                "k": self.k, "mode": self.mode, "seed": self.seed, "retriever": self.retriever}


@dataclass
class ExperimentResult:
    out: Path
    rows: list[dict[str, Any]]
    cells_run: int = 0
    cells_reused: int = 0


def slug(model: str) -> str:
    """A directory-safe name for a model id or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").split("/")[-1]) or "model"


def _spec(r: RetrieverSettings, shorthand: str | None) -> RetrieverSpec:
    encoder = r.encoder or shorthand or _MINILM
    if r.scoring == _BM25:  # no model: the encoder and its fallback do not apply
        return RetrieverSpec(_BM25, _BM25)
    return RetrieverSpec(r.scoring, encoder, r.encoder_fallback if r.encoder_fallback != encoder else None)


# ---- config -------------------------------------------------------------------------------------------
def load_experiment_config(path: str | Path) -> ExperimentConfig:
    return experiment_config_from_dict(read_yaml(path, "experiment config"), str(path))


def experiment_config_from_dict(data: dict[str, Any], where: str = "<experiment>") -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, data, where)
    cfg.grid = [b if isinstance(b, GridBlock) else _grid_block(b, i, where) for i, b in enumerate(cfg.grid)]
    return validate(cfg, where)


# Grid block keys and the names configs used before them (docs/method.md#glossary); either is read.
_OLD_AXIS_KEYS = {"groups": "splits", "sources": "banks"}
_AXES = {"groups": GROUPS, "sources": SOURCES}


def _grid_block(data: Any, i: int, where: str) -> GridBlock:
    """Grid block ``i`` from its YAML mapping, which may spell ``groups`` / ``sources`` by their older
    names ``splits`` / ``banks`` (not both); a bad value is reported under the key as written."""
    if isinstance(data, dict):
        data = dict(data)
        for new, old in _OLD_AXIS_KEYS.items():
            if old not in data:
                continue
            if new in data:
                raise DataFormatError(f"{where}: grid[{i}]: both {new!r} and {old!r} (its older name); "
                                      f"keep {new!r}")
            _check_axis(f"grid[{i}].{old}", data[old], _AXES[new],
                        lambda name, why: DataFormatError(f"{where}: field {name!r}: {why}"))
            data[new] = data.pop(old)
    return from_dict(GridBlock, data, f"{where}.grid[{i}]")


def _check_axis(name: str, values: Any, allowed: Any, bad: Callable[[str, str], DataFormatError]) -> None:
    unknown = [v for v in values if v not in allowed] if isinstance(values, list) else values
    if unknown or not values:
        raise bad(name, f"{unknown or 'empty'}; choose from {', '.join(allowed)}")


def validate(cfg: ExperimentConfig, where: str = "<experiment>") -> ExperimentConfig:
    from exprag.envs.splits import check_env
    from exprag.train.config import config_from_dict

    def bad(name: str, why: str) -> DataFormatError:
        return DataFormatError(f"{where}: field {name!r}: {why}")

    check_env(cfg.env)
    if not cfg.models:
        raise bad("models", "name at least one model")
    if not cfg.grid:
        raise bad("grid", "declare at least one block (methods, groups, sources, k, modes)")
    for i, b in enumerate(cfg.grid):
        for name, values, allowed in (("methods", b.methods, METHODS), ("groups", b.groups, GROUPS),
                                      ("sources", b.sources, SOURCES), ("modes", b.modes, ("static", "dynamic"))):
            _check_axis(f"grid[{i}].{name}", values, allowed, bad)
        if b.k is not None and (not b.k or any(int(k) < 1 for k in b.k)):
            raise bad(f"grid[{i}].k", "a list of K >= 1")
        stray = [m for m in b.models or [] if m not in cfg.models]
        if stray:
            raise bad(f"grid[{i}].models", f"{stray[0]!r} is not in the experiment's models")
    _check_retrievers(cfg, bad)
    cfg.hypotheses = _check_hypotheses(cfg.hypotheses, bad)
    if not 0 < cfg.alpha < 1:
        raise bad("alpha", f"{cfg.alpha}; a significance level in (0, 1)")
    if cfg.data.expert_ceiling is not None and not 0 < cfg.data.expert_ceiling <= 1:
        raise bad("data.expert_ceiling", f"{cfg.data.expert_ceiling}; a fraction of the step cap in (0, 1]")
    _check_task_types(cfg, bad)
    if cfg.preregistered_at is not None and not re.fullmatch(r"[0-9a-f]{7,40}", str(cfg.preregistered_at)):
        raise bad("preregistered_at", f"{cfg.preregistered_at!r}; a git commit id (7-40 hex digits)")
    dis = cfg.data.disjoint_from
    if dis is not None:
        if not isinstance(dis, list) or not dis or not all(isinstance(d, str) and d for d in dis):
            raise bad("data.disjoint_from", "a non-empty list of experiment directories or configs")
        if cfg.env != "alfworld" or cfg.env_args.get("data_dir"):
            raise bad("data.disjoint_from", "is checked for generated ALFWorld games only")
    owned = [k for k in _RUNNER_TRAIN_FIELDS if k in cfg.train]
    if owned:
        raise bad(f"train.{owned[0]}", "is set by the experiment (data, models, seeds, main_k and eval set it)")
    config_from_dict({**cfg.train, "trajectories": ["-"]}, f"{where}.train")  # field names and values
    for name in ("train_per_type", "test_per_type"):
        n = getattr(cfg.data, name)
        if n is not None and n < 1:
            raise bad(f"data.{name}", "must be >= 1, or null for every game of the split")
    return cfg


def _check_task_types(cfg: ExperimentConfig, bad: Callable[[str, str], DataFormatError]) -> None:
    from exprag.envs.splits import all_types, resolve_task_types

    custom = cfg.data.task_types
    if custom is None:
        return
    if not isinstance(custom, dict):
        raise bad("data.task_types", "a mapping {easy: [task types], hard: [task types]}")
    known = all_types(cfg.env)
    for group, types in custom.items():
        if group not in GROUPS:
            raise bad(f"data.task_types.{group}", f"unknown task group; choose from {', '.join(GROUPS)}")
        if not isinstance(types, list) or not types or any(t not in known for t in types):
            raise bad(f"data.task_types.{group}", f"{types!r}; a non-empty list of {cfg.env} task types: "
                                                  f"{', '.join(known)}")
    easy, hard = (set(resolve_task_types(cfg.env, cfg.group_types(g))) for g in GROUPS)
    both = easy & hard
    if both:
        raise bad("data.task_types", f"{sorted(both)[0]!r} is in both splits; held-out types must not be trained")


def _check_retrievers(cfg: ExperimentConfig, bad: Callable[[str, str], DataFormatError]) -> None:
    if not isinstance(cfg.retrieval, RetrieverSettings):
        raise bad("retrieval", "a mapping: {scoring, encoder, encoder_fallback}")
    if cfg.encoder is not None and cfg.retrieval.encoder not in (None, cfg.encoder):
        raise bad("encoder", f"{cfg.encoder!r} differs from retrieval.encoder {cfg.retrieval.encoder!r}; set one")
    blocks = [("retrieval", None)] + [(f"grid[{i}].retrieval", b) for i, b in enumerate(cfg.grid)]
    seen: dict[str, RetrieverSpec] = {}
    for name, b in blocks:
        if b is not None and b.retrieval is not None:
            if not isinstance(b.retrieval, dict):
                raise bad(name, "a mapping of retrieval fields (scoring, encoder, encoder_fallback)")
            unknown = set(b.retrieval) - {f.name for f in dataclasses.fields(RetrieverSettings)}
            if unknown:
                raise bad(f"{name}.{sorted(unknown)[0]}", "unknown; choose from scoring, encoder, encoder_fallback")
        r = cfg.retrieval if b is None else dataclasses.replace(cfg.retrieval, **(b.retrieval or {}))
        for f in ("scoring", "encoder", "encoder_fallback"):
            if getattr(r, f) is not None and (not isinstance(getattr(r, f), str) or not getattr(r, f)):
                raise bad(f"{name}.{f}", "a non-empty string")
        if r.scoring not in _SCORINGS:
            raise bad(f"{name}.scoring", f"{r.scoring!r}; choose from {', '.join(_SCORINGS)}")
        spec = cfg.retriever if b is None else cfg.block_retriever(b)
        if spec.scoring == "dense" and _BM25 in (spec.encoder, spec.fallback):
            raise bad(f"{name}.encoder", "dense scoring needs a dense encoder (minilm or a sentence-transformers id)")
        if spec.fallback == _BM25:
            raise bad(f"{name}.encoder_fallback", "a dense encoder (e.g. minilm), which bm25 is not")
        if seen.setdefault(spec.key, spec) != spec:
            raise bad(name, f"retriever key {spec.key!r} would name two retrievers ({seen[spec.key]} and {spec}): "
                            "two encoders with the same final name, or one encoder with two fallbacks")


# A hypothesis's optional test, evaluated by the report: A vs B paired on the cells of one task group.
# a / b: "method" (matched memory source) or "method/source"; alternative: greater (A > B: b > c and
# p < alpha) or not_less (A >= B: not significantly worse). `group` is also read as `split`, its older
# name, which experiment.json keeps (docs/method.md#glossary).
_HYPOTHESIS_FIELDS = ("id", "text", "comparison", "a", "b", "group", "alternative")
ALTERNATIVES = ("greater", "not_less")


def parse_arm(arm: str) -> tuple[str, str]:
    """(method, memory source) of a hypothesis arm "method" or "method/source"; a method without
    retrieval reads none."""
    method, _, source = arm.partition("/")
    if method in METHODS and not METHODS[method].retrieval:
        return method, source or "none"
    return method, source or "matched"


def _check_hypotheses(hyps: Any, bad: Callable[[str, str], DataFormatError]) -> list[dict[str, Any]]:
    """The hypotheses, checked, with an older ``split:`` key read as ``group:``."""
    if not isinstance(hyps, list):
        raise bad("hypotheses", "a list of {id, text, comparison}")
    ids = set()
    for i, h in enumerate(hyps):
        if not isinstance(h, dict):
            raise bad(f"hypotheses[{i}]", "a mapping {id, text, comparison}")
        for f in h:
            if f not in (*_HYPOTHESIS_FIELDS, "split"):
                raise bad(f"hypotheses[{i}].{f}", f"unknown; choose from {', '.join(_HYPOTHESIS_FIELDS)}")
        if "split" in h and "group" in h:
            raise bad(f"hypotheses[{i}]", "both 'group' and 'split' (its older name); keep 'group'")
        _check_hypothesis_test(h, f"hypotheses[{i}]", bad)
        for f in ("id", "text"):
            if not isinstance(h.get(f), str) or not h[f].strip():
                raise bad(f"hypotheses[{i}].{f}", "a non-empty string")
        if h.get("comparison") is not None and not isinstance(h["comparison"], str):
            raise bad(f"hypotheses[{i}].comparison", "a string")
        if h["id"] in ids:
            raise bad(f"hypotheses[{i}].id", f"{h['id']!r} is used twice")
        ids.add(h["id"])
    return [{("group" if k == "split" else k): v for k, v in h.items()} for h in hyps]


def _check_hypothesis_test(h: dict[str, Any], where: str, bad: Callable[[str, str], DataFormatError]) -> None:
    group = "split" if "split" in h else "group"  # the key as written
    given = [f for f in ("a", "b", group) if f in h]
    if not given and "alternative" not in h:
        return  # free-form: printed, not tested
    if len(given) < 3:
        missing = [f for f in ("a", "b") if f not in h] or ["split"]  # the name existing configs know
        raise bad(f"{where}.{missing[0]}", "a tested hypothesis names a, b and its task group (group:, or split:)")
    for f in ("a", "b"):
        method, source = parse_arm(h[f]) if isinstance(h[f], str) else ("", "")
        if method not in METHODS or source not in (*SOURCES, "none") or source in DIAGNOSTIC_SOURCES \
                or (source == "none") == METHODS[method].retrieval:
            raise bad(f"{where}.{f}", f"{h[f]!r}; a method ({', '.join(METHODS)}), optionally /memory source "
                                      f"({', '.join(s for s in SOURCES if s not in DIAGNOSTIC_SOURCES)})")
    if h[group] not in GROUPS:
        raise bad(f"{where}.{group}", f"{h[group]!r}; choose from {', '.join(GROUPS)}")
    if h.get("alternative", "greater") not in ALTERNATIVES:
        raise bad(f"{where}.alternative", f"{h['alternative']!r}; choose from {', '.join(ALTERNATIVES)}")


def expand(cfg: ExperimentConfig) -> list[Cell]:
    """The grid's cells, deduplicated, ordered so that each (model, adapter) is loaded once."""
    cells: dict[Cell, None] = {}
    for b in cfg.grid:
        spec = cfg.block_retriever(b)
        retriever = None if spec == cfg.retriever else spec.key
        for model in b.models or cfg.models:
            for method in b.methods:
                m = METHODS[method]
                for group in b.groups:
                    for source in b.sources if m.retrieval else ["none"]:
                        retrieves = m.retrieval and source != "empty"
                        for k in (b.k or [cfg.main_k]) if retrieves else [None]:
                            for mode in b.modes if retrieves else [None]:
                                for seed in cfg.seeds if m.adapter else [None]:
                                    r = retriever if retrieves else None  # no memory: no retriever
                                    cells[Cell(model, method, group, source, k, mode, seed, r)] = None
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(cells, key=lambda c: (cfg.models.index(c.model), METHODS[c.method].adapter or "",
                                        c.seed or 0, order[c.method], GROUPS.index(c.group),
                                        SOURCES.index(c.source) if c.source in SOURCES else -1, c.k or 0, c.mode or "",
                                        c.retriever or ""))


def retrievers(cfg: ExperimentConfig) -> dict[str | None, RetrieverSpec]:
    """The experiment's retriever (key None) and each grid block's other retriever, by cell key."""
    found: dict[str | None, RetrieverSpec] = {None: cfg.retriever}
    for b in cfg.grid:
        spec = cfg.block_retriever(b)
        if spec != cfg.retriever:
            found[spec.key] = spec
    return found


# ---- the run ------------------------------------------------------------------------------------------
def run_experiment(cfg: ExperimentConfig, *, command: str = "", progress: bool = False,
                   log: Log | None = None, on_cell: Callable[[dict[str, Any]], None] | None = None
                   ) -> ExperimentResult:
    """Run (or resume) the grid. ``on_cell(row)`` is called after each finished cell. The experiment
    directory must be absent, empty or an experiment's; it is locked for the run (its cells and
    adapters, inside it, take their own locks too)."""
    check_output_dir(cfg.out_dir, "experiment directory", lambda p: (p / "experiment.json").is_file())
    with run_lock(cfg.out_dir, "experiment directory"):
        return _run_experiment(cfg, command=command, progress=progress, log=log, on_cell=on_cell)


def _run_experiment(cfg: ExperimentConfig, *, command: str, progress: bool, log: Log | None,
                    on_cell: Callable[[dict[str, Any]], None] | None) -> ExperimentResult:
    say: Log = log or (lambda s: None)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    cells = expand(cfg)
    info = _start_info(cfg, out, command)
    t0 = time.perf_counter() - info["duration_s"]  # the time spent by earlier invocations counts
    stages = info["stages"]

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        s = time.perf_counter()
        try:
            return fn()
        finally:
            stages[stage] = round(stages.get(stage, 0.0) + time.perf_counter() - s, 1)
            _save_info(out, info, t0)

    adapters_needed = sorted({(c.model, METHODS[c.method].adapter, c.seed) for c in cells
                              if METHODS[c.method].adapter}, key=lambda a: (cfg.models.index(a[0]), a[1], a[2]))
    say(f"experiment {cfg.name}: {len(cells)} cells, {len(adapters_needed)} adapters -> {out}")
    data = timed("data_s", lambda: _ensure_data(cfg, out, adapters_needed, progress, say))
    kept = timed("data_s", lambda: _ensure_test_experts(cfg, out, cells, adapters_needed, progress, say))
    data.update({g: out / "data" / f"{g}.jsonl" for g in kept if g.startswith("test-")})
    kept = kept if cfg.data.expert_ceiling is not None else {}  # oracle only: the usual selection
    banks, used = timed("banks_s", lambda: _ensure_banks(cfg, out, data, cells, say))
    info["retrievers"] = {"default" if k is None else k: v for k, v in used.items()}
    _save_info(out, info, t0)
    adapters: dict[tuple[str, str, int], Path] = {}
    for model, kind, seed in adapters_needed:
        adapters[(model, kind, seed)] = timed(
            "train_s", lambda: _ensure_adapter(cfg, out, model, kind, seed, data, banks[None], progress, say,
                                               kept.get("sel")))
    _write_training_summary(out, cfg, adapters_needed)
    if cfg.eval.backend == "openai" and adapters:  # served by name: loaded at run time, else start it so
        from exprag.llm.adapters import serve_command

        for model in dict.fromkeys(m for m, _, _ in adapters):
            say(f"LoRA cells of {model} ask {cfg.eval.base_url} for their adapters (loaded at run time when "
                f"the server allows it); a server started without them: "
                f"{serve_command(model, [p for k, p in adapters.items() if k[0] == model])}")
    if cfg.data.expert_ceiling is not None and any(kind == "exprag_lora" for _, kind, _ in adapters_needed):
        timed("train_s", lambda: _write_training_coverage(cfg, out, data, banks[None]))

    rows: dict[Cell, dict[str, Any]] = {}
    ecfgs = {c: _cell_eval_config(cfg, out, c, banks, adapters.get((c.model, METHODS[c.method].adapter, c.seed)),
                                  kept.get(f"test-{c.group}")) for c in cells}

    def finish(cell: Cell, done: dict[str, Any]) -> None:
        """The cell's row; results.jsonl / .md rewritten in grid order with every row so far."""
        rows[cell] = _row(cfg, out, cell, ecfgs[cell], done, used.get(cell.retriever) if cell.retrieves else None)
        _write_results(out, [rows[c] for c in cells if c in rows])
        if on_cell:
            on_cell(rows[cell])

    if cfg.eval.ray is not None:
        run, reused = _run_cells_on_ray(cfg, out, cells, ecfgs, finish, timed, say)
    else:
        run = reused = 0
        model_key, model_obj = None, None
        for i, cell in enumerate(cells, 1):
            ecfg = ecfgs[cell]
            done = _finished_cell(Path(ecfg.out), ecfg)
            if done is None:
                if model_key != (cell.model, ecfg.adapter):
                    model_obj = None
                    gc.collect()
                    model_key, model_obj = (cell.model, ecfg.adapter), _lazy_model(ecfg)
                say(f"[cell {i}/{len(cells)}] {cell.id}")
                done = timed("eval_s", lambda: _run_cell(ecfg, cell, model_obj, progress, _workers(cfg)))
                run += 1
            else:
                reused += 1
            finish(cell, done)
    info["finished"] = _now()
    _save_info(out, info, t0)
    say(f"experiment {cfg.name}: {run} cells run, {reused} reused; results: {out / 'results.md'}")
    return ExperimentResult(out, [rows[c] for c in cells], cells_run=run, cells_reused=reused)


def _run_cells_on_ray(cfg: ExperimentConfig, out: Path, cells: list[Cell], ecfgs: dict[Cell, EvalConfig],
                      finish: Callable[[Cell, dict[str, Any]], None], timed: Callable[[str, Callable[[], Any]], Any],
                      say: Log) -> tuple[int, int]:
    """The unfinished cells as Ray tasks on ``cfg.eval.ray`` (exprag.ray_cells), finished ones reused;
    each cell is handed to ``finish`` as it completes. Returns (cells run, cells reused)."""
    from exprag.ray_cells import CellResources, run_cells

    todo = []
    for cell in cells:
        done = _finished_cell(Path(ecfgs[cell].out), ecfgs[cell])
        if done is None:
            todo.append(cell)
        else:
            finish(cell, done)
    if not todo:
        return 0, len(cells)
    res = CellResources(cfg.eval.cell_cpus, cfg.eval.cell_gpus)
    say(f"{len(todo)} cells as Ray tasks on {cfg.eval.ray} ({res.cpus:g} CPU, {res.gpus:g} GPU each)")

    def run_all() -> None:
        # closing: an exception in finish (on_cell) cancels the tasks still out at once
        with contextlib.closing(run_cells(cfg.eval.ray, out, [(c, ecfgs[c]) for c in todo], res)) as finished:
            for n, (cell, done) in enumerate(finished, 1):
                say(f"[cell {n}/{len(todo)} done] {cell.id}")
                finish(cell, done)

    timed("eval_s", run_all)  # wall-clock time of the parallel cells
    return len(todo), len(cells) - len(todo)


def _lazy_model(ecfg: EvalConfig) -> Any:
    from exprag.evaluate import LazyModel

    from exprag.evaluate import openai_transport

    return LazyModel(ecfg.model, adapter=ecfg.adapter, backend=ecfg.backend, base_url=ecfg.base_url,
                     **openai_transport(ecfg))


def _workers(cfg: ExperimentConfig) -> WorkerSpec:
    return WorkerSpec(cfg.eval.workers, cfg.eval.ray)


def _run_cell(ecfg: EvalConfig, cell: Cell, model: Any, progress: bool, workers: WorkerSpec) -> dict[str, Any]:
    from exprag.config import to_dict
    from exprag.evaluate import evaluate

    res = evaluate(ecfg, model=model, progress=progress, workers=workers)
    done = {"cell": cell.record, "eval_config": to_dict(ecfg), "metrics": res.metrics,
            "finished": _now()}
    atomic_write_json(Path(ecfg.out) / "cell.json", done)
    return done


def _finished_cell(cell_dir: Path, ecfg: EvalConfig) -> dict[str, Any] | None:
    """The cell's record when it finished with this very configuration, else None (run or resume it)."""
    from exprag.config import changed_fields, to_dict

    path = cell_dir / "cell.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text(encoding="utf-8"))
    if changed_fields(done.get("eval_config", {}), to_dict(ecfg), _CELL_RESUMABLE):
        return None  # evaluate() then refuses it, naming the field that changed
    return done


def _bank_name(cell: Cell) -> str:
    """The bank (easy | hard | all train bank, or oracle-<group>) a retrieving cell's memory source reads."""
    other = {"easy": "hard", "hard": "easy"}[cell.group]
    return {"matched": cell.group, "mismatched": other, "all": "all", "oracle": f"oracle-{cell.group}"}[cell.source]


def _cell_eval_config(cfg: ExperimentConfig, out: Path, cell: Cell, banks: dict[str | None, dict[str, Path]],
                      adapter: Path | None, task_ids: list[str] | None = None) -> EvalConfig:
    """``task_ids``: the games that pass the expert ceiling (already at most ``test_per_type`` per type)."""
    retrieval = RetrievalConfig()
    if cell.retrieves:
        retrieval = RetrievalConfig(bank=str(banks[cell.retriever][_bank_name(cell)]),
                                    memory=cfg.memory(cell.k, cell.mode))
    base = cfg.agent_eval_config(cell.model, cell.seed if cell.seed is not None else 2025)
    return dataclasses.replace(
        base, split=cfg.data.test_split, task_types=cfg.group_types(cell.group), per_type=cfg.data.test_per_type,
        adapter=str(adapter) if adapter else None, retrieval=retrieval, out=str(out / "cells" / cell.id),
        task_ids=task_ids, oracle_memory=True if cell.source in DIAGNOSTIC_SOURCES else None,
    )


def replay_cell_config(run_dir: str | Path, cell_id: str, task_ids: list[str], out: str | Path,
                       **changes: Any) -> EvalConfig:
    """The evaluation a finished experiment ran for one cell (model, adapter checkpoint, bank, memory
    and agent settings, read from the experiment directory alone), on ``task_ids`` and into ``out``:
    how committed adapters are replayed (the quickstart). ``changes``: other EvalConfig fields
    (``env_args``, ``max_steps``, ``batch_size``)."""
    run_dir = Path(run_dir)
    meta = read_json_record(run_dir / "experiment.json")
    cfg = experiment_config_from_dict(meta.get("config") or {}, str(run_dir / "experiment.json"))
    cells = {c.id: c for c in expand(cfg)}
    if cell_id not in cells:
        raise DataFormatError(f"{run_dir / 'experiment.json'}: no cell {cell_id!r} in its grid "
                              f"(cells: {', '.join(cells)})")
    cell = cells[cell_id]
    specs = retrievers(cfg)
    banks = {key: {name: bank_dir(run_dir, key, spec, name) for name in ("easy", "hard", "all", *(
        f"oracle-{g}" for g in GROUPS))} for key, spec in specs.items()}
    adapter = None
    if METHODS[cell.method].adapter:
        adir = adapter_dir(run_dir, cell.model, METHODS[cell.method].adapter, cell.seed)
        done = read_json_record(adir / "experiment_done.json")
        adapter = adir / str(done.get("checkpoint"))
        if not (adapter / "adapter_config.json").is_file():
            raise DataFormatError(f"{adir / 'experiment_done.json'}: field 'checkpoint' names {adapter}, "
                                  "which holds no adapter_config.json")
    ecfg = _cell_eval_config(cfg, run_dir, cell, banks, adapter, list(task_ids))
    if ecfg.retrieval.bank and not Path(ecfg.retrieval.bank).is_dir():
        raise DataFormatError(f"{run_dir}: cell {cell_id} reads the bank {ecfg.retrieval.bank}, which is missing")
    return dataclasses.replace(ecfg, out=str(out), **changes)


def read_json_record(path: Path) -> dict[str, Any]:
    """A record an experiment wrote (experiment.json, experiment_done.json): a JSON object, or an error
    naming the file."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _row(cfg: ExperimentConfig, out: Path, cell: Cell, ecfg: EvalConfig, done: dict[str, Any],
         retriever: dict[str, Any] | None) -> dict[str, Any]:
    m = done["metrics"]
    row = {"cell": cell.id, **cell.record, "method_label": METHODS[cell.method].label,
           "env": cfg.env, "adapter": _rel(ecfg.adapter, out), "retriever_info": retriever}
    for key in ("n", "successes", "success_rate", "ci95", "mean_steps", "tokens_per_s",
                "unparsable_rate", "valid_action_rate"):
        if key in m:
            row[key] = m[key]
    row["per_type"] = {t: {k: b[k] for k in ("n", "successes", "success_rate", "ci95", "mean_steps")}
                       for t, b in m.get("per_type", {}).items()}
    row["run_dir"] = _rel(ecfg.out, out)
    row["episodes"] = _episodes(Path(ecfg.out), m.get("n"))
    if cell.source in DIAGNOSTIC_SOURCES:
        row["diagnostic"] = "oracle memory: the expert trajectory of the very test game (leaky by design)"
    experts = out / "data" / f"test-{cell.group}.jsonl"
    if cell.retrieves and experts.is_file():
        row["expert_action_coverage"] = expert_action_coverage(experts, Path(ecfg.out), Path(ecfg.retrieval.bank))
    return row


def expert_action_coverage(experts: Path, cell_dir: Path, bank: Path) -> dict[str, Any] | None:
    """How many of the expert's actions on each evaluated game appear verbatim among the actions of the
    trajectories retrieved into that episode's memory (whole trajectories: an upper bound when a token
    budget shortened them). ``None`` when the cell's episodes record no memory ids."""
    from exprag.bank.store import bank_trajectory_files
    from exprag.trajectory import read_jsonl

    expert = {t.task_id: t.actions() for t in read_jsonl(experts)}
    memory = {t.id: set(t.actions()) for t in read_jsonl(*bank_trajectory_files(bank))}
    path = cell_dir / "trajectories.jsonl"
    found = total = games = 0
    for t in read_jsonl(path) if path.is_file() else []:
        ids = t.meta.get("memory_ids")
        if t.task_id not in expert or not isinstance(ids, list):
            continue
        seen = set().union(*(memory.get(i, set()) for i in ids))
        found += sum(a in seen for a in expert[t.task_id])
        total += len(expert[t.task_id])
        games += 1
    return {"found": found, "expert_actions": total, "games": games,
            "fraction": round(found / total, 4) if total else None} if games else None


def _episodes(cell_dir: Path, n: int | None) -> dict[str, bool] | None:
    """Success per task id, so that the report can pair episodes across methods (McNemar); None when
    the cell's episode file does not hold exactly the cell's ``n`` episodes."""
    from exprag.evaluate import read_results

    got = {str(r["task_id"]): bool(r["success"]) for r in read_results(cell_dir / "results.jsonl")}
    return got if len(got) == n else None


def _rel(path: str | Path | None, base: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    head = ["| model | method | split | bank | K | mode | seed | success | 95% CI | mean steps | valid actions |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    body = []
    for r in rows:
        lo, hi = r["ci95"]
        va = r.get("valid_action_rate")
        label = r["method_label"] + (f" [{r['retriever']}]" if r.get("retriever") else "")
        body.append(
            f"| {r['model']} | {label} | {r['split']} | {r['bank']} | {r['k'] or '–'} | "
            f"{r['mode'] or '–'} | {r['seed'] if r['seed'] is not None else '–'} | "
            f"{100 * r['success_rate']:.1f}% ({r['successes']}/{r['n']}) | {100 * lo:.1f}–{100 * hi:.1f} | "
            f"{r['mean_steps']} | {'–' if va is None else f'{100 * va:.1f}%'} |")
    atomic_write_text(out / "results.md", "\n".join(head + body) + "\n")


# ---- stages -------------------------------------------------------------------------------------------
def _ensure_data(cfg: ExperimentConfig, out: Path, adapters: list, progress: bool, say: Log) -> dict[str, Path]:
    """Expert trajectories of the train games (easy, hard) and, for validation loss, easy dev games."""
    from exprag.envs import make_env
    from exprag.envs.splits import resolve_task_types, select_tasks
    from exprag.expert import collect_to_file

    wanted = {f"train-{g}": ("train", g, cfg.data.train_per_type) for g in GROUPS}
    if adapters and cfg.data.val_per_type:
        wanted["dev-easy"] = ("dev", "easy", cfg.data.val_per_type)
    paths = {name: out / "data" / f"{name}.jsonl" for name in wanted}
    todo = [name for name, p in paths.items() if not p.is_file()]
    if todo:
        with make_env(cfg.env, **cfg.env_args) as env:
            for name in todo:
                split, group, per_type = wanted[name]
                tasks = select_tasks(env.tasks(split, resolve_task_types(cfg.env, cfg.group_types(group))), per_type)
                done = collect_to_file(
                    env, tasks, paths[name], desc=f"expert {name}", progress=progress or None,
                    workers=_workers(cfg), env_args=cfg.env_args,
                    empty_error=f"{cfg.env}: the expert solved none of the {len(tasks)} {split} tasks of the "
                                f"{group} types; no data for {paths[name]}")
                say(f"data: {len(done.trajectories)}/{len(tasks)} expert trajectories -> {paths[name]}")
    return paths


def _needs_test_experts(cfg: ExperimentConfig, cells: list[Cell]) -> bool:
    return cfg.data.expert_ceiling is not None or any(c.source in DIAGNOSTIC_SOURCES for c in cells)


def _ensure_test_experts(cfg: ExperimentConfig, out: Path, cells: list[Cell], adapters: list, progress: bool,
                         say: Log) -> dict[str, list[str]]:
    """Expert trajectories of the test games of every task group under test (and, with a ceiling, of
    the dev games of checkpoint selection): ``data/test-<group>.jsonl`` feed the oracle banks and the
    report's expert-action coverage. Returns the task ids kept per game set (``test-<group>``, ``sel``;
    ceiling.json's ``groups``), at most
    ``per_type`` of each type, the first the expert solves within ``expert_ceiling`` x the step cap;
    ``data/ceiling.json`` records every game looked at, its expert length, its cap, and why it was dropped."""
    from exprag.envs import make_env
    from exprag.envs.splits import resolve_task_types, select_tasks
    from exprag.expert import collect_to_file
    from exprag.train.config import config_from_dict

    if not _needs_test_experts(cfg, cells):
        return {}
    path = out / "data" / "ceiling.json"
    groups = {f"test-{g}": (cfg.data.test_split, cfg.group_types(g), cfg.data.test_per_type, cfg.eval.max_steps)
              for g in GROUPS if any(c.group == g for c in cells)}
    sel = config_from_dict({**cfg.train, "trajectories": ["-"]}, f"{cfg.name}.train").selection
    if adapters and sel.every and cfg.data.expert_ceiling is not None:
        groups["sel"] = (sel.split, cfg.group_types(sel.task_types), sel.per_type, sel.max_steps or cfg.eval.max_steps)
    want = {"expert_ceiling": cfg.data.expert_ceiling,
            "groups": {g: {"split": sp, "task_types": ty, "per_type": n, "max_steps": m}
                       for g, (sp, ty, n, m) in groups.items()}}
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        settings = {g: {k: v.get(k) for k in ("split", "task_types", "per_type", "max_steps")}
                    for g, v in (done.get("groups") or {}).items()}
        if done.get("expert_ceiling") == want["expert_ceiling"] and settings == want["groups"] \
                and all((out / "data" / f"{g}.jsonl").is_file() for g in groups):
            kept = {g: v["kept"] for g, v in done["groups"].items()}
            _check_disjoint(cfg, kept)
            return kept
    ceiling = cfg.data.expert_ceiling
    record: dict[str, Any] = {"expert_ceiling": ceiling, "groups": {}}
    with make_env(cfg.env, **cfg.env_args) as env:
        for g, (split, types, per_type, max_steps) in groups.items():
            tasks = env.tasks(split, resolve_task_types(cfg.env, types))
            if ceiling is None:  # oracle memories only: the games the cells evaluate
                tasks = select_tasks(tasks, per_type)
            games = _CeilingGames(env, per_type, max_steps, ceiling)
            done = collect_to_file(env, games.to_play(tasks), out / "data" / f"{g}.jsonl", desc=f"expert {g}",
                                   total=len(tasks), progress=progress or None, manifest=False,
                                   on_episode=games.judge)
            short = [t for t in resolve_task_types(cfg.env, types) if per_type and games.per.get(t, 0) < per_type]
            if short:
                say(f"data: {g}: only {', '.join(f'{t} {games.per.get(t, 0)}' for t in short)} of {per_type} "
                    "games per type pass the expert ceiling")
            record["groups"][g] = {**want["groups"][g], "kept": games.kept, "games": games.games}
            say(f"data: {g}: {len(games.kept)} games kept of {len(games.games)} "
                f"({len(done.trajectories)} expert trajectories)")
    kept = {g: v["kept"] for g, v in record["groups"].items()}
    _check_disjoint(cfg, kept)  # before ceiling.json is written: a rerun checks again rather than reuse it
    atomic_write_json(path, record)
    return kept


def _check_disjoint(cfg: ExperimentConfig, kept: dict[str, list[str]]) -> None:
    if cfg.data.disjoint_from:
        from exprag.disjoint import check_disjoint

        tests = [t for g, ids in kept.items() if g.startswith("test-") for t in ids]
        check_disjoint(tests, cfg.data.test_split, cfg.data.disjoint_from, f"{cfg.name}: test games")


@dataclass
class _CeilingGames:
    """One group's games for ``_ensure_test_experts``: which the expert plays next (``to_play``), and
    which are kept, judged as each episode ends (``judge``)."""

    env: Any
    per_type: int | None
    max_steps: int | None
    ceiling: float | None
    kept: list[str] = field(default_factory=list)  # task ids
    games: list[dict[str, Any]] = field(default_factory=list)  # every game looked at, for ceiling.json
    per: dict[str, int] = field(default_factory=dict)  # kept per task type
    looked: dict[str, int] = field(default_factory=dict)  # played per task type

    def to_play(self, tasks: list) -> Iterator[Any]:
        for task in tasks:
            n = self.per_type
            if n is not None and (self.per.get(task.task_type, 0) >= n
                                  or self.looked.get(task.task_type, 0) >= _CEILING_LOOK * n):
                continue  # enough games of this type (or looked at): the expert is not run on the rest
            self.looked[task.task_type] = self.looked.get(task.task_type, 0) + 1
            yield task

    def judge(self, task: Any, traj: Any) -> None:
        cap = self.max_steps or self.env.max_steps(task)
        game = {"task_id": task.task_id, "task_type": task.task_type, "cap": cap,
                "expert_steps": traj.num_steps if traj else None, "expert_success": bool(traj and traj.success)}
        if traj is None:
            game["dropped"] = "the expert hit an env error"
        elif not traj.success:
            game["dropped"] = "the expert fails"
        elif self.ceiling is not None and traj.num_steps > self.ceiling * cap:
            game["dropped"] = f"the expert needs {traj.num_steps} steps > {self.ceiling} x cap {cap}"
        else:
            self.per[task.task_type] = self.per.get(task.task_type, 0) + 1
            self.kept.append(task.task_id)
        self.games.append(game)


def bank_dir(out: Path, key: str | None, spec: RetrieverSpec, name: str) -> Path:
    """banks/<retriever key>/<name>; the experiment's retriever, when it is the one experiments used
    before configs chose (procedure over minilm), keeps banks/<name> so that their runs still resume."""
    return out / "banks" / name if key is None and spec.legacy else out / "banks" / spec.key / name


def _ensure_banks(cfg: ExperimentConfig, out: Path, data: dict[str, Path], cells: list[Cell], say: Log
                  ) -> tuple[dict[str | None, dict[str, Path]], dict[str | None, dict[str, Any]]]:
    """The banks of every retriever, each built once: ``{retriever key: {easy|hard|all: path}}``, and
    what each retriever really used (``{key: provenance}``, the encoder fallback included).

    The experiment's retriever gets all three banks (ExpRAG-LoRA trains and selects with them); a grid
    block's retriever only those its cells read. A bank built with the fallback encoder stays so (its
    cells were measured with it): delete its directory to rebuild with the requested encoder."""
    from exprag.bank import build_bank
    from exprag.bank.store import reusable_manifest
    from exprag.trajectory import read_jsonl

    inputs = {"easy": [data["train-easy"]], "hard": [data["train-hard"]],
              "all": [data["train-easy"], data["train-hard"]]}
    for g in GROUPS:  # the diagnostic oracle banks: expert trajectories of the test games themselves
        if f"test-{g}" in data:
            inputs[f"oracle-{g}"] = [data[f"test-{g}"]]
    specs = retrievers(cfg)
    needed = {key: {_bank_name(c) for c in cells if c.retrieves and c.retriever == key}
              | ({"easy", "hard", "all"} if key is None else set()) for key in specs}
    banks: dict[str | None, dict[str, Path]] = {}
    used: dict[str | None, dict[str, Any]] = {}
    for key, spec in specs.items():
        if not needed[key]:
            continue
        encoder, why = None, None  # the encoder this retriever builds with, decided at its first build
        banks[key] = {}
        for name in sorted(needed[key], key=list(inputs).index):
            files, path = inputs[name], bank_dir(out, key, spec, name)
            manifest = reusable_manifest(path, files, [encoder] if encoder else [spec.encoder, spec.fallback],
                                         spec.scoring)
            if manifest is not None:
                encoder = manifest["encoder"]["name"]
                why = why or (manifest.get("experiment") or {}).get("fallback_reason")
            else:
                if encoder is None:
                    encoder, why = _usable_encoder(spec)
                bank = build_bank(read_jsonl(*files), path, encoder, sources=files, retrieval=spec.scoring)
                if why:
                    _note_fallback(path, spec, why)
                say(f"bank {name} ({spec.scoring}, {encoder}"
                    + (f", fallback for {spec.encoder}" if why else "") + f"): {len(bank.trajectories)} "
                    f"trajectories -> {path}")
            banks[key][name] = path
        used[key] = {"key": spec.key, "scoring": spec.scoring, "encoder": spec.encoder, "encoder_used": encoder,
                     "fallback": encoder != spec.encoder, "fallback_reason": why if encoder != spec.encoder else None}
    return banks, used


def _usable_encoder(spec: RetrieverSpec) -> tuple[str, str | None]:
    """``(encoder, None)`` when the retriever's encoder loads; ``(fallback, why)`` when it does not and
    the config allows a fallback. Without a fallback the bank build itself raises, naming the encoder."""
    if spec.fallback is None or spec.encoder in (_MINILM, _BM25):
        return spec.encoder, None
    from exprag.bank.encoders import make_encoder
    from exprag.errors import BankError

    try:
        make_encoder(spec.encoder).model  # the dense model loads here (offline unless HF_HUB_OFFLINE=0)
        return spec.encoder, None
    except BankError as e:
        return spec.fallback, str(e)


def _note_fallback(path: Path, spec: RetrieverSpec, why: str) -> None:
    """Record in the bank's manifest that it was built with the fallback encoder, and why."""
    from exprag.bank.store import bank_files

    mf = bank_files(path) / "manifest.json"  # the published version's manifest
    manifest = json.loads(mf.read_text(encoding="utf-8"))
    manifest["experiment"] = {"requested_encoder": spec.encoder, "fallback_reason": why}
    atomic_write_json(mf, manifest)


def adapter_dir(out: Path, model: str, kind: str, seed: int) -> Path:
    return out / "adapters" / slug(model) / f"{kind}-s{seed}"


def _train_config(cfg: ExperimentConfig, out: Path, model: str, kind: str, seed: int,
                  data: dict[str, Path], banks: dict[str, Path]) -> Any:
    from exprag.train.config import config_from_dict

    retrieval = RetrievalConfig()
    if kind == "exprag_lora":  # the memory block of inference: main K, static, from the easy train bank
        retrieval = RetrievalConfig(bank=str(banks["easy"]), memory=cfg.memory(cfg.main_k, "static"))
    tcfg = config_from_dict({
        **cfg.train, "trajectories": [str(data["train-easy"])],
        "val_trajectories": [str(data["dev-easy"])] if "dev-easy" in data else [],
        "model": model, "out": str(adapter_dir(out, model, kind, seed)), "seed": seed, "retrieval": retrieval,
    }, f"{cfg.name}.train")
    return tcfg


def _ensure_adapter(cfg: ExperimentConfig, out: Path, model: str, kind: str, seed: int,
                    data: dict[str, Path], banks: dict[str, Path], progress: bool, say: Log,
                    selection_ids: list[str] | None = None) -> Path:
    """Train (or resume, or reuse) one adapter; returns the checkpoint the cells evaluate: the best by
    rollout success when selection is configured (docs/method.md#checkpoint-selection), else the last epoch."""
    from exprag.config import changed_fields
    from exprag.train.config import LOGGING_FIELDS, to_dict
    from exprag.train.lora import train

    tcfg = _train_config(cfg, out, model, kind, seed, data, banks)
    run_dir = Path(tcfg.out)
    marker = run_dir / "experiment_done.json"
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if not changed_fields(done.get("train_config") or {}, to_dict(tcfg), LOGGING_FIELDS):
            return run_dir / done["checkpoint"]
        say(f"adapter {run_dir}: the training settings changed; resuming checks what may change")
    say(f"train {kind} (seed {seed}) on {model} -> {run_dir}")
    rollout = _selection_eval(cfg, tcfg, kind, banks, selection_ids) if tcfg.selection.every else None
    res = train(tcfg, resume=True, rollout_eval=rollout, progress=progress, log=say)
    ckpt = res.best_checkpoint or res.last_checkpoint
    if ckpt is None:
        raise ExpragError(f"{run_dir}: training produced no checkpoint")
    ckpt = run_dir / _rel(ckpt.resolve(), run_dir)  # the checkpoint itself, not the moving RUN_DIR/best link
    atomic_write_json(marker, {"train_config": to_dict(tcfg), "checkpoint": _rel(ckpt, run_dir),
                               "wall_s": round(res.wall_s, 1), "finished": _now()})
    return ckpt


def _selection_eval(cfg: ExperimentConfig, tcfg: Any, kind: str, banks: dict[str, Path],
                    task_ids: list[str] | None = None) -> Callable[[Path], float]:
    """Rollout success of a checkpoint on the selection split, with the memory the method uses at test
    time: the train bank of the selection task types for ExpRAG-LoRA, none for plain LoRA. ``task_ids``:
    the dev games that pass the expert ceiling (None = the selection's first ``per_type``)."""
    from exprag.train.select import rollout_eval, selection_eval_config

    sel = tcfg.selection
    retrieval = RetrievalConfig()
    if kind == "exprag_lora":  # the training memory (main K, static), from the selection types' bank
        bank = sel.bank or (str(banks[sel.task_types]) if sel.task_types in banks else str(banks["all"]))
        retrieval = RetrievalConfig(bank=bank, memory=tcfg.retrieval.memory)
    # Checkpoints run in-process while training: a server could not know them before they exist.
    base = dataclasses.replace(cfg.agent_eval_config(tcfg.model, tcfg.seed), backend="hf", base_url=None,
                               concurrency=None)
    return rollout_eval(lambda ckpt: selection_eval_config(
        sel, base, ckpt, retrieval, Path(tcfg.out) / "eval" / ckpt.name,
        task_types=cfg.group_types(sel.task_types), task_ids=task_ids), workers=_workers(cfg))


def _write_training_summary(out: Path, cfg: ExperimentConfig, adapters: list) -> None:
    summary = []
    for model, kind, seed in adapters:
        run_dir = adapter_dir(out, model, kind, seed)
        marker = run_dir / "experiment_done.json"
        done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        epochs: dict[int, dict[str, Any]] = {}
        metrics = run_dir / "metrics.jsonl"
        for _, ev in iter_json_lines(metrics) if metrics.is_file() else []:
            if ev.get("event") == "epoch":
                e = epochs.setdefault(int(ev["epoch"]), {"epoch": int(ev["epoch"]), "success_rate": None})
                e.update(train_loss=ev.get("train_loss"), val_loss=ev.get("val_loss"),
                         train_s=ev.get("train_s"), tokens_per_s=ev.get("tokens_per_s"))
            elif ev.get("event") == "eval":
                epochs.setdefault(int(ev["epoch"]), {"epoch": int(ev["epoch"])})["success_rate"] = ev["success_rate"]
        summary.append({"model": model, "kind": kind, "seed": seed, "dir": _rel(run_dir, out),
                        "checkpoint": _rel(run_dir / done["checkpoint"], out) if "checkpoint" in done else None,
                        "wall_s": done.get("wall_s"), "epochs": [epochs[k] for k in sorted(epochs)]})
    atomic_write_json(out / "training.json", summary)


def _write_training_coverage(cfg: ExperimentConfig, out: Path, data: dict[str, Path], banks: dict[str, Path]) -> None:
    """data/train-coverage.json: of the target (expert) actions of ExpRAG-LoRA's training examples, the
    share that appears verbatim among the actions of the memory retrieved for that example, with the
    retrieval training uses (leakage filter, K, budget; the budget counted as chars/4, not the tokenizer)."""
    from exprag.bank import load_bank
    from exprag.train.config import config_from_dict
    from exprag.train.data import retrieve_memories
    from exprag.trajectory import read_jsonl

    path = out / "data" / "train-coverage.json"
    if path.is_file():
        return
    tcfg = config_from_dict({**cfg.train, "trajectories": ["-"]}, f"{cfg.name}.train")
    trajs = read_jsonl(data["train-easy"])
    found = total = 0
    memory = cfg.memory(cfg.main_k, "static")
    for t, hits in zip(trajs, retrieve_memories(load_bank(banks["easy"]), trajs, memory, tcfg.leakage)):
        seen = {a for h in hits for a in h.trajectory.actions()}
        found += sum(a in seen for a in t.actions())
        total += len(t.actions())
    atomic_write_json(path, {"examples": len(trajs), "found": found, "expert_actions": total,
                             "fraction": round(found / total, 4) if total else None})


# ---- provenance ---------------------------------------------------------------------------------------
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _commit() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "neon", "asimd")


def cpu_info() -> dict[str, Any]:
    """The CPU model and its vector extensions (from /proc/cpuinfo): CPU timings differ several-fold
    between an AVX2-only and an AVX-512/AMX machine, so every recorded timing names them."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or None,
            "cpu_vector": [f for f in _VECTOR_FLAGS if f in flags]}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), **cpu_info(), "gpu": None, "torch_threads": None}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return info


def _start_info(cfg: ExperimentConfig, out: Path, command: str) -> dict[str, Any]:
    """experiment.json: kept across resumptions (first start, time spent summed over the runs)."""
    path = out / "experiment.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    runs = old.get("runs", [])
    runs.append({"started": _now(), "command": command, "commit": _commit(), "machine": machine_info()})
    info = {
        "name": cfg.name, "env": cfg.env, "models": cfg.models, "command": command or old.get("command", ""),
        "commit": runs[-1]["commit"], "machine": runs[-1]["machine"],
        "started": old.get("started", runs[-1]["started"]), "finished": None,
        "duration_s": old.get("duration_s", 0.0), "stages": old.get("stages", {}),
        "config": _config_record(cfg),
        "runs": runs,
    }
    atomic_write_json(path, info)
    return info


def _config_record(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as experiment.json holds it: grid blocks and hypotheses keep the file field
    names ``splits`` / ``banks`` / ``split`` for the task groups and memory sources."""
    grid = [{_OLD_AXIS_KEYS.get(k, k): v for k, v in dataclasses.asdict(b).items()} for b in cfg.grid]
    hyps = [{("split" if k == "group" else k): v for k, v in h.items()} for h in cfg.hypotheses]
    return {**dataclasses.asdict(cfg), "grid": grid, "hypotheses": hyps}


def _save_info(out: Path, info: dict[str, Any], t0: float) -> None:
    """``t0``: the clock reading at which this experiment's summed duration was zero."""
    info["duration_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "experiment.json", info)
