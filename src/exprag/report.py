"""The experiment report: markdown tables shaped like the paper's (docs/method.md#method-grid) and PNG plots,
read from one or more experiment run directories::

    experiment.json   what ran, where, how long, with which resolved config (its ``main_k`` included)
    results.jsonl     one row per evaluated cell (model x method x task group x memory source x K x mode x
                      seed; the row fields ``split`` and ``bank``, docs/method.md#glossary)
    training.json     the adapters trained, with their per-epoch losses and rollout success (optional)

Cells of several run directories are merged (models become columns); seeds of a cell are pooled by
summing counts, and every interval is a Wilson interval recomputed from the pooled counts.

Every method is evaluated on the same tasks, so the comparisons that matter are also tested paired:
episodes are matched by (model, seed, task group, task id) and an exact McNemar test is run on the
discordant pairs (``exprag.stats.mcnemar_p``).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from exprag.errors import DataFormatError
from exprag.evaluate import read_results
from exprag.io import atomic_write_text, check_output_dir, iter_json_lines
from exprag.methods import DIAGNOSTIC_SOURCES, GROUPS, METHODS, SOURCES
from exprag.stats import Stratum, mcnemar_p, wilson  # noqa: F401  (exprag.report.mcnemar_p: replay and older callers)
from exprag.validate import check_type

PLOTS = ("success_by_method.png", "success_vs_k.png", "robustness.png", "training_curves.png")
# The main table prefers static retrieval; a group evaluated in one mode only (e.g. no retrieval) uses it.
_MODE_PREFERENCE = ("static", None, "dynamic")
_DASH = "–"


@dataclass(frozen=True)
class Cell:
    """One row of results.jsonl, reduced to what the report reads."""

    model: str
    method: str
    group: str  # the task group under test (the row's `split`)
    source: str  # the memory source (the row's `bank`): one of SOURCES, or "none" for a method without retrieval
    k: int | None
    mode: str | None
    seed: int | None  # None for frozen-model methods
    n: int
    successes: int
    per_type: dict[str, tuple[int, int]]  # task type -> (successes, n)
    main_k: int  # the K of its experiment's main grid
    steps: float = 0.0  # episode steps in all (n x mean steps): the weight of the valid-action rate
    valid_action_rate: float | None = None  # share of steps whose action the env accepted
    retriever: str | None = None  # a grid block's own retriever (its key); None = the experiment's
    retriever_info: dict[str, Any] | None = None  # scoring, encoder (requested / used), fallback
    episodes: dict[str, bool] | None = None  # success per task id; None in rows that predate it
    coverage: tuple[int, int] | None = None  # expert actions found verbatim in the memory, of all


@dataclass
class Experiment:
    dir: Path
    meta: dict[str, Any]  # experiment.json as written by the runner
    cells: list[Cell]
    training: list[dict[str, Any]]


@dataclass(frozen=True)
class Pooled:
    """Counts summed over the seeds (and cells) of one table entry."""

    successes: int
    n: int
    seeds: int  # distinct seeds pooled; 0 for frozen-model methods

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else math.nan

    def text(self) -> str:
        return f"{100 * self.rate:.1f} ({self.successes}/{self.n})" if self.n else _DASH

    def ci_text(self) -> str:
        lo, hi = wilson(self.successes, self.n)
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]" if self.n else _DASH

    def yerr(self) -> tuple[float, float]:
        """Distances (percentage points) from the rate to the Wilson bounds, for error bars."""
        lo, hi = wilson(self.successes, self.n)
        return max(0.0, 100 * (self.rate - lo)), max(0.0, 100 * (hi - self.rate))


@dataclass
class ReportResult:
    report: Path
    plots: list[Path]

    @property
    def paths(self) -> list[Path]:
        return [self.report, *self.plots]


# ----------------------------------------------------------------------------------------- reading


def _get(obj: dict, name: str, where: str, types: type | tuple[type, ...], *, nullable: bool = False,
         prefix: str = "") -> Any:
    if name not in obj:
        raise DataFormatError(f"{where}: field '{prefix}{name}' missing")
    value = obj[name]
    if value is None and nullable:
        return None
    return check_type(value, types, where, prefix + name, python_names=True)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read_meta(path: Path) -> dict[str, Any]:
    meta = _load_json(path)
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for name, types in (("name", str), ("env", str), ("models", list), ("command", str), ("config", dict)):
        _get(meta, name, str(path), types)
    _get(meta["config"], "main_k", str(path), int, prefix="config.")
    return meta


def _read_cell(obj: Any, where: str, main_k: int) -> tuple[str, Cell]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    get = lambda name, types, **kw: _get(obj, name, where, types, **kw)  # noqa: E731
    cell_id, model, method, group, source = (get(f, str) for f in ("cell", "model", "method", "split", "bank"))
    for name, value, allowed in (("method", method, tuple(METHODS)), ("split", group, GROUPS),
                                 ("bank", source, (*SOURCES, "none"))):
        if value not in allowed:
            raise DataFormatError(f"{where}: field '{name}' is {value!r}, expected one of {', '.join(allowed)}")
    # k / mode / seed are null for methods they do not apply to; an absent key reads the same.
    opt = {f: obj.get(f) for f in ("k", "mode", "seed")}
    k, mode, seed = (_get(opt, f, where, t, nullable=True) for f, t in (("k", int), ("mode", str), ("seed", int)))
    if mode not in _MODE_PREFERENCE:
        raise DataFormatError(f"{where}: field 'mode' is {mode!r}, expected static, dynamic or null")
    n, successes = get("n", int), get("successes", int)
    get("success_rate", (int, float))  # recomputed from the counts; checked so a truncated row is caught
    if not 0 <= successes <= n:
        raise DataFormatError(f"{where}: field 'successes' is {successes}, expected 0..n={n}")
    per_type = {}
    for t, block in (get("per_type", dict, nullable=True) or {}).items():
        if not isinstance(block, dict):
            raise DataFormatError(f"{where}: field 'per_type.{t}' must be an object")
        per_type[t] = (_get(block, "successes", where, int, prefix=f"per_type.{t}."),
                       _get(block, "n", where, int, prefix=f"per_type.{t}."))
    mean_steps = obj.get("mean_steps")
    valid = obj.get("valid_action_rate")
    steps = n * mean_steps if isinstance(mean_steps, (int, float)) else 0.0
    valid = float(valid) if isinstance(valid, (int, float)) and not isinstance(valid, bool) else None
    retriever = _get(obj, "retriever", where, str, nullable=True) if "retriever" in obj else None
    info = _get(obj, "retriever_info", where, dict, nullable=True) if "retriever_info" in obj else None
    episodes = _get(obj, "episodes", where, dict, nullable=True) if "episodes" in obj else None
    for task, ok in (episodes or {}).items():
        if not isinstance(ok, bool):
            raise DataFormatError(f"{where}: field 'episodes.{task}' must be true or false, got {ok!r}")
    cov = obj.get("expert_action_coverage")
    coverage = None
    if isinstance(cov, dict):
        coverage = (_get(cov, "found", where, int, prefix="expert_action_coverage."),
                    _get(cov, "expert_actions", where, int, prefix="expert_action_coverage."))
    return cell_id, Cell(model, method, group, source, k, mode, seed, n, successes, per_type, main_k, steps, valid,
                         retriever, info, episodes, coverage)


def _read_cells(path: Path, main_k: int) -> list[Cell]:
    cells: dict[str, Cell] = {}
    for where, obj in iter_json_lines(path):
        cell_id, cell = _read_cell(obj, where, main_k)
        if cell.episodes is None and isinstance(obj.get("run_dir"), str):
            cell = replace(cell, episodes=_cell_dir_episodes(path.parent / obj["run_dir"], cell.n))
        cells[cell_id] = cell  # a cell re-evaluated on resume: its last line is its result
    return list(cells.values())


def _cell_dir_episodes(cell_dir: Path, n: int) -> dict[str, bool] | None:
    """Per-episode outcomes of a row written before rows carried them, from its cell's own episode
    file when the run directory still has it and it holds exactly the row's ``n`` episodes."""
    rows = read_results(cell_dir / "results.jsonl")
    got = {str(r["task_id"]): bool(r["success"]) for r in rows
           if isinstance(r, dict) and "task_id" in r and isinstance(r.get("success"), bool)}
    return got if len(got) == n and len(rows) == n else None


def _read_training(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a JSON list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict):
            raise DataFormatError(f"{where}: expected a JSON object")
        for name, types in (("model", str), ("kind", str), ("seed", int), ("epochs", list)):
            _get(e, name, where, types)
        for j, ep in enumerate(e["epochs"]):
            if not isinstance(ep, dict):
                raise DataFormatError(f"{where}: field 'epochs[{j}]' must be an object")
            _get(ep, "epoch", where, int, prefix=f"epochs[{j}].")
            for name in ("train_loss", "val_loss", "success_rate"):
                if name in ep:
                    _get(ep, name, where, (int, float), nullable=True, prefix=f"epochs[{j}].")
    return entries


def read_experiment(run_dir: str | Path) -> Experiment:
    run_dir = Path(run_dir)
    meta = _read_meta(run_dir / "experiment.json")
    cells = _read_cells(run_dir / "results.jsonl", meta["config"]["main_k"])
    return Experiment(run_dir, meta, cells, _read_training(run_dir / "training.json"))


# ------------------------------------------------------------------------------------- selecting


def _pool(cells: Iterable[Cell]) -> Pooled | None:
    cells = list(cells)
    if not cells:
        return None
    return Pooled(sum(c.successes for c in cells), sum(c.n for c in cells),
                  len({c.seed for c in cells if c.seed is not None}))


def _grouped(cells: Iterable[Cell], key: Callable[[Cell], tuple],
             keep: Callable[[Cell], bool] = lambda c: True) -> dict[tuple, list[Cell]]:
    """The kept cells of each key at the main K, in the preferred mode present for that key."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        if keep(c) and (c.k is None or c.k == c.main_k):
            groups[key(c)].append(c)
    for kk, cs in groups.items():
        mode = next(m for m in _MODE_PREFERENCE if any(c.mode == m for c in cs))
        groups[kk] = [c for c in cs if c.mode == mode]
    return dict(groups)


def _depth_groups(cells: list[Cell]) -> dict[tuple, dict[tuple, Pooled]]:
    """(model, method, task group) swept over K or mode (matched memory source) -> {(mode, k): pooled}."""
    groups: dict[tuple, dict[tuple, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c.source == "matched" and c.k is not None:
            groups[c.model, c.method, c.group][c.mode, c.k].append(c)
    return {g: {mk: _pool(cs) for mk, cs in pts.items()} for g, pts in groups.items() if len(pts) >= 2}


# ------------------------------------------------------------------------------------- rendering


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _text(p: Pooled | None) -> str:
    return p.text() if p else _DASH


def _pair(a: Pooled | None, b: Pooled | None, fmt: Callable[[Pooled], str]) -> str:
    if not (a or b):
        return _DASH
    return f"{fmt(a) if a else _DASH} / {fmt(b) if b else _DASH}"


def _hmm(seconds: float | None) -> str:
    if seconds is None:
        return _DASH
    h, m = divmod(round(seconds / 60), 60)
    return f"{h}:{m:02d}"


def _header(exp: Experiment) -> list[str]:
    m, cfg = exp.meta, exp.meta["config"]
    mach = m.get("machine") or {}
    data, ev = cfg.get("data") or {}, cfg.get("eval") or {}
    stages = ", ".join(f"{k.removesuffix('_s')} {_hmm(v)}" for k, v in (m.get("stages") or {}).items())
    show = lambda v: _DASH if v is None else str(v)  # noqa: E731
    return [
        f"### {m['name']}", "",
        f"- env: {m['env']}; models: {', '.join(m['models'])}",
        f"- command: `{m['command']}`",
        f"- commit: {show(m.get('commit'))}",
        f"- machine: {show(mach.get('platform'))}, {show(mach.get('cpus'))} CPUs"
        + (f" ({mach['cpu_model']}; {', '.join(mach.get('cpu_vector') or []) or 'no AVX'})"
           if mach.get("cpu_model") else "") + ", "
        f"GPU {mach.get('gpu') or 'none'}, torch threads {show(mach.get('torch_threads'))}",
        f"- duration (h:mm): {_hmm(m.get('duration_s'))}" + (f" ({stages})" if stages else ""),
        *([f"- resumed: {len(m['runs'])} invocations (start, commit): "
           + "; ".join(f"{r.get('started')} at {r.get('commit')}" for r in m["runs"])]
          if len(m.get("runs") or []) > 1 else []),
        f"- dates: {show(m.get('started'))} → {show(m.get('finished'))}",
        f"- settings: train per type {show(data.get('train_per_type'))}, test per type "
        f"{show(data.get('test_per_type'))}, split {show(data.get('test_split', data.get('split')))}, max steps "
        f"{show(ev.get('max_steps'))}, main K {cfg['main_k']}",
        *(["- task types (the experiment's own task groups): " + "; ".join(
            f"{k} = {', '.join(v)}" for k, v in data["task_types"].items())] if data.get("task_types") else []),
        *_retriever_lines(exp),
        *_hypothesis_lines(cfg.get("hypotheses"), cfg.get("preregistered_at")),
        *_ceiling_lines(exp.dir),
        f"- run directory: {exp.dir}", "",
    ]


CONCLUSION_FILE = "conclusion.md"


def _conclusion_lines(exp: Experiment) -> list[str]:
    """The experiment directory's hand-written ``conclusion.md`` (analysis written after the run), set under
    its own heading so that a re-rendered report keeps it and a reader can tell it from the generated tables."""
    path = exp.dir / CONCLUSION_FILE
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read the conclusion ({e})") from e
    # its own headings are demoted below this section's, so the report's outline stays intact
    body = [("##" + ln) if ln.startswith("#") else ln for ln in text.splitlines()]
    return [f"#### Conclusion of {exp.meta['name']} (written after the run, from `{CONCLUSION_FILE}`)", "",
            *body, ""]


_SCORING_TEXT = {"dense": "dense dot product", "procedure": "procedure-weighted lexical + dense", "bm25": "BM25"}


def _retriever_text(info: dict[str, Any]) -> str:
    scoring, encoder = info.get("scoring"), info.get("encoder_used") or info.get("encoder")
    text = _SCORING_TEXT.get(scoring, str(scoring))
    if scoring == "procedure" and encoder == "bm25":
        text = "procedure-weighted lexical (no dense model)"
    elif scoring != "bm25":
        text += f" over {encoder}"
    if info.get("fallback"):
        text += f" (FALLBACK: {info.get('encoder')} could not be loaded)"
    return text


def _retrievers(exp: Experiment) -> dict[str, dict[str, Any]]:
    """Retriever key ("default" = the experiment's) -> provenance: as the runner recorded it in
    experiment.json, else as the rows carry it."""
    found = {k: v for k, v in (exp.meta.get("retrievers") or {}).items() if isinstance(v, dict)}
    for c in exp.cells:
        if c.retriever_info:
            found.setdefault(c.retriever or "default", c.retriever_info)
    return found


def _retriever_lines(exp: Experiment) -> list[str]:
    found = _retrievers(exp)
    if not found:
        enc = exp.meta["config"].get("encoder") or "minilm"
        return [f"- retriever: not recorded (experiments before retriever choice used procedure scoring over {enc})"]
    lines = []
    for key, info in sorted(found.items(), key=lambda kv: kv[0] != "default"):
        if key == "default":
            lines.append(f"- retriever: {_retriever_text(info)} (every retrieving cell not labelled otherwise)")
        else:
            lines.append(f"- retriever [{key}]: {_retriever_text(info)} (cells labelled [{key}])")
    return lines


def _hypothesis_lines(hyps: Any, commit: Any = None) -> list[str]:
    if not isinstance(hyps, list) or not hyps:
        return []
    lines = [f"- pre-registered hypotheses{f' (written at commit {commit})' if commit else ''}:"]
    for h in hyps:
        if isinstance(h, dict):
            comp = f" (comparison: {h['comparison']})" if h.get("comparison") else ""
            lines.append(f"  - {h.get('id', _DASH)}: {h.get('text', '')}{comp}")
    return lines


def write_report(run_dirs: list[Path], out: Path) -> ReportResult:
    """Read the run directories and write ``out/report.md`` and its PNGs (atomically)."""
    if not run_dirs:
        raise DataFormatError("no run directories given")
    exps = [read_experiment(d) for d in run_dirs]
    out = Path(out)
    check_output_dir(out, "report directory or experiment directory",
                     lambda p: (p / "report.md").is_file() or (p / "experiment.json").is_file())
    every_cell = [c for e in exps for c in e.cells]
    # Diagnostic cells (the oracle memory) get their own section, never a method's table or test.
    diagnostic = [c for c in every_cell if c.source in DIAGNOSTIC_SOURCES]
    cells = [c for c in every_cell if c.source not in DIAGNOSTIC_SOURCES]
    training = [t for e in exps for t in e.training]
    models = list(dict.fromkeys([*(m for e in exps for m in e.meta["models"]), *(c.model for c in cells)]))
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    # Cells of a grid block's own retriever are extra main-table rows, labelled; every other table
    # reads the experiment's retriever only, so that different retrievers are never pooled.
    base = [c for c in cells if c.retriever is None]
    labels = _row_labels(exps, cells)
    row_keys = [(meth, None) for meth in methods] + sorted(
        {(c.method, c.retriever) for c in cells if c.retriever is not None},
        key=lambda mr: (methods.index(mr[0]), mr[1]))

    every = _grouped(cells, lambda c: (c.model, c.method, c.group, c.retriever),
                     lambda c: c.source in ("matched", "none"))
    groups = {(m, x, s): cs for (m, x, s, r), cs in every.items() if r is None}
    main = {kk: _pool(cs) for kk, cs in groups.items()}
    sources: dict[tuple, set[str]] = defaultdict(set)
    for c in base:
        sources[c.model, c.method, c.group].add(c.source)
    robust_keys = {(m, x) for (m, x, _), b in sources.items() if len(b) > 1}
    robust_groups = _grouped(base, lambda c: (c.model, c.method, c.source, c.group),
                             lambda c: (c.model, c.method) in robust_keys)
    robust = {kk: _pool(cs) for kk, cs in robust_groups.items()}
    depth = _depth_groups(base)

    lines = [f"# Report: {', '.join(e.meta['name'] for e in exps)}", "", "## Experiments", ""]
    for e in exps:
        lines += _header(e) + _conclusion_lines(e)

    lines += ["## Success rate (%), easy / hard", ""]
    if not cells:
        lines += ["No evaluated cells yet.", ""]
    else:
        lines += ["Matched memory source (or none), static retrieval where both modes ran, main K; seeds pooled "
                  "(summed successes / summed episodes). Cells: success % (successes/episodes).", ""]
        header = ["method", *(f"{m} (easy / hard)" for m in models)]
        rows, ci_rows, seeded = [], [], []
        pooled = {kk: _pool(cs) for kk, cs in every.items()}
        for meth, r in row_keys:
            label = labels(meth, r)
            got = [(pooled.get((m, meth, "easy", r)), pooled.get((m, meth, "hard", r))) for m in models]
            rows.append([label, *(_pair(a, b, Pooled.text) for a, b in got)])
            ci_rows.append([label, *(_pair(a, b, Pooled.ci_text) for a, b in got)])
            seeded += [f"{label} on {m}: {max(p.seeds for p in ab if p)} seeds"
                       for m, ab in zip(models, got) if any(p and p.seeds > 1 for p in ab)]
        lines += _table(header, rows)
        if seeded:
            lines += ["Pooled over seeds: " + "; ".join(seeded) + ".", ""]
        lines += ["95% Wilson intervals (%), from the pooled counts:", ""] + _table(header, ci_rows)
        valid_rows = [[labels(meth, r), *(" / ".join(_valid_text(every.get((m, meth, s, r), [])) for s in GROUPS)
                                          for m in models)] for meth, r in row_keys]
        if any(c.valid_action_rate is not None for cs in every.values() for c in cs):
            lines += ["Valid-action rate (%): the share of steps whose action the environment accepted "
                      "(same cells, weighted by steps):", ""] + _table(header, valid_rows)

    lines += _paired_section(models, methods, groups, robust_groups)
    lines += _hypotheses_section(exps)
    lines += _diagnostic_section(models, diagnostic)
    lines += _coverage_section(models, every_cell)

    if robust:
        lines += ["## Robustness to the memory source at inference (%)", "",
                  "Matched = the task group's own train bank; mismatched = the other group's; all = both; "
                  "empty = no trajectories.", ""]
        rows = []
        for m in models:
            for meth in methods:
                if (m, meth) in robust_keys:
                    rows += [[m, METHODS[meth].label, src, *(_text(robust.get((m, meth, src, g))) for g in GROUPS)]
                             for src in SOURCES if any((m, meth, src, g) in robust for g in GROUPS)]
        lines += _table(["model", "method", "bank", *GROUPS], rows)  # column names as in results rows

    if depth:
        ks = sorted({k for pts in depth.values() for _, k in pts})
        rows = []
        order = lambda g: (models.index(g[0]), methods.index(g[1]), GROUPS.index(g[2]))  # noqa: E731
        for (m, meth, group), pts in sorted(depth.items(), key=lambda i: order(i[0])):
            for mode in sorted({md for md, _ in pts}, key=_MODE_PREFERENCE.index):
                rows.append([m, METHODS[meth].label, group, mode or _DASH, *(_text(pts.get((mode, k))) for k in ks)])
        lines += ["## Retrieval depth and mode (%), matched memory source", ""]
        lines += _table(["model", "method", "split", "mode", *(f"K={k}" for k in ks)], rows)

    if any(c.per_type for cs in groups.values() for c in cs):
        lines += ["## Per task type (%), main-table cells", ""]
        for m in models:
            for group in GROUPS:
                present = [meth for meth in methods if groups.get((m, meth, group))]
                types = sorted({t for meth in present for c in groups[m, meth, group] for t in c.per_type})
                if not types:
                    continue
                rows = [[t, *(_text(_per_type(groups[m, meth, group], t)) for meth in present)] for t in types]
                lines += [f"### {m}, {group}", ""] + _table(["task type", *(METHODS[x].label for x in present)], rows)

    if training:
        lines += ["## Training", ""] + _training_table(training)

    plots = _plots(out, models, methods, main, robust, robust_keys, depth, training)
    captions = {
        "success_by_method.png": "Success per method, easy vs hard, with 95% Wilson intervals.",
        "success_vs_k.png": "Success vs the number K of retrieved trajectories, per method, task group and mode.",
        "robustness.png": "Success by the memory source read at inference, per task group.",
        "training_curves.png": "Train and validation loss (left) and rollout success (right) per epoch.",
    }
    if plots:
        lines += ["## Figures", ""]
        for p in plots:
            lines += [f"![{captions[p.name]}]({os.path.relpath(p, out)})", "", f"*{captions[p.name]}*", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return ReportResult(report, plots)


def _row_labels(exps: list[Experiment], cells: list[Cell]) -> Callable[[str, str | None], str]:
    """Main-table labels: the method, plus ``[retriever key]`` for a grid block's own retriever and a
    fallback mark when that retriever's encoder could not be loaded."""
    fallback = {key for e in exps for key, info in _retrievers(e).items() if info.get("fallback")}
    fallback |= {c.retriever for c in cells if c.retriever and (c.retriever_info or {}).get("fallback")}

    def label(method: str, retriever: str | None) -> str:
        if retriever is None:
            return METHODS[method].label
        return f"{METHODS[method].label} [{retriever}{', encoder fallback' if retriever in fallback else ''}]"

    return label


# ------------------------------------------------------------------------------ paired statistics

# (A, B): the method and its baseline; the memory-source comparison (matched vs empty) is added per method.
PAIRED = (("exprag_lora", "lora"), ("lora_retrieval", "lora"), ("exprag_frozen", "no_retrieval"))


@dataclass(frozen=True)
class Paired:
    """Episodes of A and B matched by (seed, task id) within one (model, group)."""

    n: int  # pairs
    a_episodes: int  # episodes with a recorded outcome, each side (some may have no partner)
    b_episodes: int
    a_successes: int  # over the pairs
    b_successes: int
    b: int  # A succeeded, B failed
    c: int  # A failed, B succeeded

    @property
    def p(self) -> float:
        return mcnemar_p(self.b, self.c)


def _outcomes(cells: list[Cell]) -> dict[tuple, bool]:
    return {(c.seed, task): ok for c in cells for task, ok in (c.episodes or {}).items()}


def pair_cells(a: list[Cell], b: list[Cell]) -> Paired:
    oa, ob = _outcomes(a), _outcomes(b)
    keys = oa.keys() & ob.keys()
    return Paired(len(keys), len(oa), len(ob), sum(oa[k] for k in keys), sum(ob[k] for k in keys),
                  sum(oa[k] and not ob[k] for k in keys), sum(ob[k] and not oa[k] for k in keys))


def paired_stratum(exp: Experiment, a: str, b: str, group: str, model: str, name: str | None = None) -> Stratum | None:
    """Arms ``a`` vs ``b`` ("method" or "method/source", as hypotheses name them) of one experiment on its
    paired episodes of ``group``, as an ``exprag.stats.Stratum`` (for tests pooled over experiments whose
    games are independent); None when the experiment has no pair of them."""
    ca, cb = _arm_cells(exp.cells, a, group).get(model), _arm_cells(exp.cells, b, group).get(model)
    pr = pair_cells(ca, cb) if ca and cb else None
    if pr is None or not pr.n:
        return None
    return Stratum(name or exp.meta["name"], pr.n, pr.a_successes, pr.b_successes, pr.b, pr.c)


def _paired_section(models: list[str], methods: list[str], groups: dict[tuple, list[Cell]],
                    robust_groups: dict[tuple, list[Cell]]) -> list[str]:
    comparisons = []  # (model, label, group, cells A, cells B)
    for m in models:
        for a, b in PAIRED:
            for s in GROUPS:
                if groups.get((m, a, s)) and groups.get((m, b, s)):
                    comparisons.append((m, f"{METHODS[a].label} vs {METHODS[b].label}", s,
                                        groups[m, a, s], groups[m, b, s]))
        for meth in methods:
            for s in GROUPS:
                if robust_groups.get((m, meth, "matched", s)) and robust_groups.get((m, meth, "empty", s)):
                    comparisons.append((m, f"{METHODS[meth].label}: matched vs empty bank", s,
                                        robust_groups[m, meth, "matched", s], robust_groups[m, meth, "empty", s]))
    if not comparisons:
        return []
    rows = []
    for m, label, s, ca, cb in comparisons:
        pr = pair_cells(ca, cb)
        used = str(pr.n) if pr.n == pr.a_episodes == pr.b_episodes else f"{pr.n} (of {pr.a_episodes} / {pr.b_episodes})"
        if not pr.n:
            rows.append([m, label, s, used, _DASH, _DASH, _DASH, _DASH, _DASH])
            continue
        pa, pb = Pooled(pr.a_successes, pr.n, 0), Pooled(pr.b_successes, pr.n, 0)
        rows.append([m, label, s, used, str(pr.b), str(pr.c), _p_text(pr.p),
                     f"{pa.text()} {pa.ci_text()}", f"{pb.text()} {pb.ci_text()}"])
    return ["## Paired comparisons (exact McNemar)", "",
            "Episodes paired by (model, seed, task group, task id), main-table cells (matched memory source, main K, "
            "static where both modes ran); pairs = episodes both sides ran (of each side's episodes when "
            "some have no partner; 0 when the rows carry no episode outcomes). b = A succeeded and B "
            "failed, c = the reverse; p = exact two-sided McNemar (binomial on b + c, 1/2). Success % "
            "(successes/pairs) and 95% Wilson intervals over the pairs.", ""] + _table(
        ["model", "A vs B", "split", "pairs", "b (A only)", "c (B only)", "McNemar p", "A % [95% CI]",
         "B % [95% CI]"], rows)


def _arm_cells(cells: list[Cell], arm: str, group: str) -> dict[str, list[Cell]]:
    """Per model: the experiment's-retriever cells of a hypothesis arm ("method" or "method/source") at
    the main K, static retrieval where both modes ran."""
    from exprag.experiment import parse_arm

    method, source = parse_arm(arm)
    got = _grouped(cells, lambda c: (c.model,),
                   lambda c: c.retriever is None and (c.method, c.source, c.group) == (method, source, group))
    return {m: cs for (m,), cs in got.items()}


def _hypotheses_section(exps: list[Experiment]) -> list[str]:
    """Each pre-registered hypothesis that names its test (a, b, task group, alternative), evaluated on the
    paired episodes of its experiment: greater = A > B (b > c and p < alpha); not_less = A >= B (not
    significantly worse: not (c > b and p < alpha))."""
    rows = []
    for e in exps:
        cfg = e.meta["config"]
        alpha = float(cfg.get("alpha", 0.05))
        for h in cfg.get("hypotheses") or []:  # experiment.json names the task group `split`
            if not (isinstance(h, dict) and {"a", "b", "split"} <= h.keys()):
                continue
            alt = h.get("alternative", "greater")
            comp = f"{h['a']} {'>' if alt == 'greater' else '>='} {h['b']}, {h['split']}"
            a, b = _arm_cells(e.cells, h["a"], h["split"]), _arm_cells(e.cells, h["b"], h["split"])
            for m in [m for m in e.meta["models"] if m in a and m in b] or [_DASH]:
                pr = pair_cells(a[m], b[m]) if m in a else None
                if pr is None or not pr.n:
                    rows.append([e.meta["name"], str(h["id"]), comp, m, "0", _DASH, _DASH, _DASH,
                                 "not evaluated (no paired episodes)"])
                    continue
                worse = pr.c > pr.b and pr.p < alpha
                ok = (pr.b > pr.c and pr.p < alpha) if alt == "greater" else not worse
                verdict = ("supported" if ok else "not supported") + (" (A significantly worse)" if worse else "")
                rows.append([e.meta["name"], str(h["id"]), comp, m, str(pr.n), str(pr.b), str(pr.c),
                             _p_text(pr.p), verdict])
    if not rows:
        return []
    alphas = sorted({float(e.meta["config"].get("alpha", 0.05)) for e in exps})
    return ["## Hypotheses (pre-registered)", "",
            f"Paired exact McNemar tests at alpha = {', '.join(f'{a:g}' for a in alphas)}, on the episodes both "
            "arms ran (matched memory source unless the arm names one; main K; static where both modes ran). "
            "b = A succeeded and B failed, c = the reverse. A > B is supported when b > c and p < alpha; "
            "A >= B when A is not significantly worse. No correction for multiple tests.", ""] + _table(
        ["experiment", "id", "comparison (A vs B)", "model", "pairs", "b", "c", "McNemar p", "verdict"], rows)


def _diagnostic_section(models: list[str], cells: list[Cell]) -> list[str]:
    if not cells:
        return []
    groups = _grouped(cells, lambda c: (c.model, c.method, c.source, c.group))

    def entry(key: tuple) -> str:
        p = _pool(groups.get(key, []))
        return f"{p.text()} {p.ci_text()}" if p else _DASH

    rows = [[m, METHODS[meth].label, source, *(entry((m, meth, source, s)) for s in GROUPS)]
            for m in models for meth in METHODS for source in DIAGNOSTIC_SOURCES
            if any((m, meth, source, s) in groups for s in GROUPS)]
    return ["## Diagnostic: oracle memory (not a method)", "",
            "The memory holds the expert trajectory of the very test game (deliberately leaky): an upper "
            "bound that tells whether the model can use a memory at all. Never pooled with the methods "
            "nor part of their paired tests. Success % (successes/episodes) [95% Wilson].", ""] + _table(
        ["model", "method", "bank", *GROUPS], rows)


def _coverage_section(models: list[str], cells: list[Cell]) -> list[str]:
    got: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for c in cells:
        if c.coverage and c.retriever is None and (c.k is None or c.k == c.main_k):
            acc = got[c.model, c.method, c.source, c.group]
            acc[0] += c.coverage[0]
            acc[1] += c.coverage[1]
    if not got:
        return []
    order = lambda kk: (models.index(kk[0]) if kk[0] in models else 0, list(METHODS).index(kk[1]),  # noqa: E731
                        SOURCES.index(kk[2]), GROUPS.index(kk[3]))
    rows = [[m, METHODS[meth].label, source + (" (diagnostic)" if source in DIAGNOSTIC_SOURCES else ""), s,
             f"{100 * f / n:.1f} ({f}/{n})" if n else _DASH]
            for (m, meth, source, s), (f, n) in sorted(got.items(), key=lambda i: order(i[0]))]
    return ["## Expert actions in the retrieved memory (test)", "",
            "Of the expert's actions on each evaluated game, the share that appears verbatim among the "
            "actions of the trajectories retrieved into that episode's memory (whole trajectories; main K; "
            "all modes run pooled).", ""] + _table(["model", "method", "bank", "split", "expert actions found %"], rows)


def _ceiling_lines(run_dir: Path) -> list[str]:
    """The expert's success within the step cap on the evaluated games (data/ceiling.json)."""
    path = run_dir / "data" / "ceiling.json"
    if not path.is_file():
        return []
    rec = _load_json(path)
    lines = [f"- expert ceiling: test and dev games the expert solves within {rec.get('expert_ceiling')} x the "
             "step cap" if rec.get("expert_ceiling") is not None else "- expert trajectories of the test games "
             "(oracle memories; no ceiling filter)"]
    for g, v in (rec.get("groups") or {}).items():
        kept = set(v.get("kept") or [])
        games = [x for x in v.get("games") or [] if x.get("task_id") in kept]
        within = sum(bool(x.get("expert_success")) and (x.get("expert_steps") or 0) <= x.get("cap", 0) for x in games)
        dropped = [x for x in v.get("games") or [] if x.get("dropped") and "enough games" not in x["dropped"]]
        pct = f"{100 * within / len(games):.0f}%" if games else _DASH
        longest = max((x.get("expert_steps") or 0 for x in games), default=0)
        lines.append(f"  - {g}: expert success within the cap on the {len(games)} evaluated games: {within}/"
                     f"{len(games)} ({pct}); longest expert {longest} steps; {len(dropped)} games dropped "
                     "(expert fails or too long)")
    train = run_dir / "data" / "train-coverage.json"
    if train.is_file():
        cov = _load_json(train)
        if isinstance(cov, dict) and cov.get("expert_actions"):
            lines.append(f"  - ExpRAG-LoRA training examples: {100 * cov['found'] / cov['expert_actions']:.1f}% "
                         f"({cov['found']}/{cov['expert_actions']}) of the target actions appear verbatim in "
                         "the retrieved memory")
    return lines


def _p_text(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _valid_text(cells: list[Cell]) -> str:
    got = [c for c in cells if c.valid_action_rate is not None and c.steps > 0]
    if not got:
        return _DASH
    return f"{100 * sum(c.valid_action_rate * c.steps for c in got) / sum(c.steps for c in got):.1f}"


def _per_type(cells: list[Cell], task_type: str) -> Pooled | None:
    got = [c.per_type[task_type] for c in cells if task_type in c.per_type]
    return Pooled(sum(s for s, _ in got), sum(n for _, n in got), 0) if got else None


def _num(v: float | None, fmt: str) -> str:
    return _DASH if v is None else format(v, fmt)


def _training_table(training: list[dict[str, Any]]) -> list[str]:
    with_success = any(ep.get("success_rate") is not None for t in training for ep in t["epochs"])
    header = ["adapter", "training steps (h:mm)", "epoch", "train loss", "val loss",
              *(["rollout success (%)"] if with_success else [])]
    rows = []
    for t in training:
        # Time in optimizer steps, summed over epochs (a resumed run's own wall clock would undercount).
        spent = [ep["train_s"] for ep in t["epochs"] if isinstance(ep.get("train_s"), (int, float))]
        name, wall = f"{t['model']} {t['kind']} seed {t['seed']}", _hmm(sum(spent) if spent else t.get("wall_s"))
        for i, ep in enumerate(t["epochs"] or [{}]):
            row = [name if i == 0 else "", wall if i == 0 else "", _num(ep.get("epoch"), "d"),
                   _num(ep.get("train_loss"), ".4f"), _num(ep.get("val_loss"), ".4f")]
            sr = ep.get("success_rate")
            rows.append(row + ([_num(None if sr is None else 100 * sr, ".1f")] if with_success else []))
    return _table(header, rows)


# ----------------------------------------------------------------------------------------- plots


def _figure(panels: int, width: float = 5.0, height: float = 3.8):
    # A bare Agg Figure: no pyplot global state and no backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=150)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _bars(ax: Any, labels: list[str], series: dict[str, list[Pooled | None]]) -> None:
    """Grouped bars (one group per label, one bar per series) with Wilson error bars; gaps stay empty."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        pts = [(x + (i - (len(series) - 1) / 2) * width, p) for x, p in enumerate(values) if p and p.n]
        if pts:
            xs, ps = zip(*pts)
            ax.bar(xs, [100 * p.rate for p in ps], width, label=name,
                   yerr=list(zip(*(p.yerr() for p in ps))), capsize=3)
    ax.set_xticks(range(len(labels)), [textwrap.fill(lab, 14) for lab in labels], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    ax.legend(fontsize=8)


def _plots(out: Path, models: list[str], methods: list[str], main: dict, robust: dict,
           robust_keys: set, depth: dict, training: list[dict[str, Any]]) -> list[Path]:
    written = []
    if main:
        fig, axes = _figure(len(models), width=max(5.0, 1.3 * len(methods)))
        for ax, m in zip(axes, models):
            _bars(ax, [METHODS[x].label for x in methods],
                  {s: [main.get((m, x, s)) for x in methods] for s in GROUPS})
            ax.set_title(f"{m}: success by method")
            ax.set_xlabel("method")
        written.append(_save(fig, out / "success_by_method.png"))

    ks = sorted({k for pts in depth.values() for _, k in pts})
    if len(ks) >= 2:
        dmodels = [m for m in models if any(g[0] == m for g in depth)]
        fig, axes = _figure(len(dmodels))
        for ax, m in zip(axes, dmodels):
            for (gm, meth, group), pts in depth.items():
                if gm != m:
                    continue
                for mode in sorted({md for md, _ in pts}, key=_MODE_PREFERENCE.index):
                    line = sorted((k, p) for (md, k), p in pts.items() if md == mode and p.n)
                    if line:
                        xs, ps = zip(*line)
                        ax.errorbar(xs, [100 * p.rate for p in ps], yerr=list(zip(*(p.yerr() for p in ps))),
                                    marker="o", capsize=3, label=f"{METHODS[meth].label}, {group}, {mode}")
            ax.set_xticks(ks)
            ax.set_ylim(0, 105)
            ax.set_xlabel("K (retrieved trajectories)")
            ax.set_ylabel("success rate (%)")
            ax.set_title(f"{m}: success vs K")
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "success_vs_k.png"))

    if robust:
        pairs = [(m, x) for m in models for x in methods if (m, x) in robust_keys]
        fig, axes = _figure(len(pairs))
        for ax, (m, meth) in zip(axes, pairs):
            sources = [b for b in SOURCES if any((m, meth, b, s) in robust for s in GROUPS)]
            _bars(ax, sources, {s: [robust.get((m, meth, b, s)) for b in sources] for s in GROUPS})
            ax.set_title(f"{m}: {METHODS[meth].label}")
            ax.set_xlabel("memory source at inference")
        written.append(_save(fig, out / "robustness.png"))

    curves = [t for t in training if t["epochs"]]
    if curves:
        fig, axes = _figure(len(curves))
        for ax, t in zip(axes, curves):
            eps = t["epochs"]
            for name, style in (("train_loss", "o-"), ("val_loss", "s--")):
                pts = [(e["epoch"], e[name]) for e in eps if e.get(name) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=name.replace("_", " "))
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title(f"{t['model']}: {t['kind']}, seed {t['seed']}")
            handles, labels = ax.get_legend_handles_labels()
            succ = [(e["epoch"], 100 * e["success_rate"]) for e in eps if e.get("success_rate") is not None]
            if succ:
                ax2 = ax.twinx()
                ax2.plot(*zip(*succ), "^:", color="tab:green", label="rollout success")
                ax2.set_ylim(0, 105)
                ax2.set_ylabel("rollout success rate (%)")
                h2, l2 = ax2.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
            ax.xaxis.get_major_locator().set_params(integer=True)
            if handles:
                ax.legend(handles, labels, fontsize=8)
        written.append(_save(fig, out / "training_curves.png"))

    # A plot this report does not draw must not survive from an earlier report in the same directory.
    for name in set(PLOTS) - {p.name for p in written}:
        (out / name).unlink(missing_ok=True)
    return written
