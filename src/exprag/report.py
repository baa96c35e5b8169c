"""The experiment report: markdown tables shaped like the paper's (SPEC §6) and PNG plots, read from one
or more experiment run directories::

    experiment.json   what ran, where, how long, with which resolved config (its ``main_k`` included)
    results.jsonl     one row per evaluated cell (model x method x split x bank x K x mode x seed)
    training.json     the adapters trained, with their per-epoch losses and rollout success (optional)

Cells of several run directories are merged (models become columns); seeds of a cell are pooled by
summing counts, and every interval is a Wilson interval recomputed from the pooled counts.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from exprag.errors import DataFormatError
from exprag.evaluate import wilson
from exprag.io import atomic_write_text, check_output_dir, iter_json_lines
from exprag.methods import BANKS, METHODS, SPLITS

PLOTS = ("success_by_method.png", "success_vs_k.png", "robustness.png", "training_curves.png")
# The main table prefers static retrieval; a group evaluated in one mode only (e.g. no retrieval) uses it.
_MODE_PREFERENCE = ("static", None, "dynamic")
_DASH = "–"


@dataclass(frozen=True)
class Cell:
    """One row of results.jsonl, reduced to what the report reads."""

    model: str
    method: str
    split: str
    bank: str  # one of BANKS, or "none" for a method without retrieval
    k: int | None
    mode: str | None
    seed: int | None  # None for frozen-model methods
    n: int
    successes: int
    per_type: dict[str, tuple[int, int]]  # task type -> (successes, n)
    main_k: int  # the K of its experiment's main grid
    steps: float = 0.0  # episode steps in all (n x mean steps): the weight of the valid-action rate
    valid_action_rate: float | None = None  # share of steps whose action the env accepted


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
    # bool is an int to Python, never to a count.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise DataFormatError(f"{where}: field '{prefix}{name}' must be {_tname(types)}, "
                              f"got {type(value).__name__}")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _tname(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _tuple(types))


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
    cell_id, model, method, split, bank = (get(f, str) for f in ("cell", "model", "method", "split", "bank"))
    for name, value, allowed in (("method", method, tuple(METHODS)), ("split", split, SPLITS),
                                 ("bank", bank, (*BANKS, "none"))):
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
    return cell_id, Cell(model, method, split, bank, k, mode, seed, n, successes, per_type, main_k, steps, valid)


def _read_cells(path: Path, main_k: int) -> list[Cell]:
    cells: dict[str, Cell] = {}
    for where, obj in iter_json_lines(path):
        cell_id, cell = _read_cell(obj, where, main_k)
        cells[cell_id] = cell  # a cell re-evaluated on resume: its last line is its result
    return list(cells.values())


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
    """(model, method, split) swept over K or mode (matched bank) -> {(mode, k): pooled}."""
    groups: dict[tuple, dict[tuple, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c.bank == "matched" and c.k is not None:
            groups[c.model, c.method, c.split][c.mode, c.k].append(c)
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
        f"- machine: {show(mach.get('platform'))}, {show(mach.get('cpus'))} CPUs, "
        f"GPU {mach.get('gpu') or 'none'}, torch threads {show(mach.get('torch_threads'))}",
        f"- duration (h:mm): {_hmm(m.get('duration_s'))}" + (f" ({stages})" if stages else ""),
        *([f"- resumed: {len(m['runs'])} invocations (start, commit): "
           + "; ".join(f"{r.get('started')} at {r.get('commit')}" for r in m["runs"])]
          if len(m.get("runs") or []) > 1 else []),
        f"- dates: {show(m.get('started'))} → {show(m.get('finished'))}",
        f"- settings: train per type {show(data.get('train_per_type'))}, test per type "
        f"{show(data.get('test_per_type'))}, split {show(data.get('test_split', data.get('split')))}, max steps "
        f"{show(ev.get('max_steps'))}, main K {cfg['main_k']}",
        f"- run directory: {exp.dir}", "",
    ]


def write_report(run_dirs: list[Path], out: Path) -> ReportResult:
    """Read the run directories and write ``out/report.md`` and its PNGs (atomically)."""
    if not run_dirs:
        raise DataFormatError("no run directories given")
    exps = [read_experiment(d) for d in run_dirs]
    out = Path(out)
    check_output_dir(out, "report directory or experiment directory",
                     lambda p: (p / "report.md").is_file() or (p / "experiment.json").is_file())
    cells = [c for e in exps for c in e.cells]
    training = [t for e in exps for t in e.training]
    models = list(dict.fromkeys([*(m for e in exps for m in e.meta["models"]), *(c.model for c in cells)]))
    methods = [m for m in METHODS if any(c.method == m for c in cells)]

    groups = _grouped(cells, lambda c: (c.model, c.method, c.split), lambda c: c.bank in ("matched", "none"))
    main = {kk: _pool(cs) for kk, cs in groups.items()}
    banks: dict[tuple, set[str]] = defaultdict(set)
    for c in cells:
        banks[c.model, c.method, c.split].add(c.bank)
    robust_keys = {(m, x) for (m, x, _), b in banks.items() if len(b) > 1}
    robust = {kk: _pool(cs) for kk, cs in _grouped(cells, lambda c: (c.model, c.method, c.bank, c.split),
                                                   lambda c: (c.model, c.method) in robust_keys).items()}
    depth = _depth_groups(cells)

    lines = [f"# Report: {', '.join(e.meta['name'] for e in exps)}", "", "## Experiments", ""]
    for e in exps:
        lines += _header(e)

    lines += ["## Success rate (%), easy / hard", ""]
    if not cells:
        lines += ["No evaluated cells yet.", ""]
    else:
        lines += ["Matched bank (or none), static retrieval where both modes ran, main K; seeds pooled "
                  "(summed successes / summed episodes). Cells: success % (successes/episodes).", ""]
        header = ["method", *(f"{m} (easy / hard)" for m in models)]
        rows, ci_rows, seeded = [], [], []
        for meth in methods:
            got = [(main.get((m, meth, "easy")), main.get((m, meth, "hard"))) for m in models]
            rows.append([METHODS[meth].label, *(_pair(a, b, Pooled.text) for a, b in got)])
            ci_rows.append([METHODS[meth].label, *(_pair(a, b, Pooled.ci_text) for a, b in got)])
            seeded += [f"{METHODS[meth].label} on {m}: {max(p.seeds for p in ab if p)} seeds"
                       for m, ab in zip(models, got) if any(p and p.seeds > 1 for p in ab)]
        lines += _table(header, rows)
        if seeded:
            lines += ["Pooled over seeds: " + "; ".join(seeded) + ".", ""]
        lines += ["95% Wilson intervals (%), from the pooled counts:", ""] + _table(header, ci_rows)
        valid_rows = [[METHODS[meth].label, *(" / ".join(_valid_text(groups.get((m, meth, s), [])) for s in SPLITS)
                                              for m in models)] for meth in methods]
        if any(c.valid_action_rate is not None for cs in groups.values() for c in cs):
            lines += ["Valid-action rate (%): the share of steps whose action the environment accepted "
                      "(same cells, weighted by steps):", ""] + _table(header, valid_rows)

    if robust:
        lines += ["## Robustness to the bank at inference (%)", "",
                  "Matched = the split's own train bank; mismatched = the other split's; all = both; "
                  "empty = no trajectories.", ""]
        rows = []
        for m in models:
            for meth in methods:
                if (m, meth) in robust_keys:
                    rows += [[m, METHODS[meth].label, bank, *(_text(robust.get((m, meth, bank, s))) for s in SPLITS)]
                             for bank in BANKS if any((m, meth, bank, s) in robust for s in SPLITS)]
        lines += _table(["model", "method", "bank", *SPLITS], rows)

    if depth:
        ks = sorted({k for pts in depth.values() for _, k in pts})
        rows = []
        order = lambda g: (models.index(g[0]), methods.index(g[1]), SPLITS.index(g[2]))  # noqa: E731
        for (m, meth, split), pts in sorted(depth.items(), key=lambda i: order(i[0])):
            for mode in sorted({md for md, _ in pts}, key=_MODE_PREFERENCE.index):
                rows.append([m, METHODS[meth].label, split, mode or _DASH, *(_text(pts.get((mode, k))) for k in ks)])
        lines += ["## Retrieval depth and mode (%), matched bank", ""]
        lines += _table(["model", "method", "split", "mode", *(f"K={k}" for k in ks)], rows)

    if any(c.per_type for cs in groups.values() for c in cs):
        lines += ["## Per task type (%), main-table cells", ""]
        for m in models:
            for split in SPLITS:
                present = [meth for meth in methods if groups.get((m, meth, split))]
                types = sorted({t for meth in present for c in groups[m, meth, split] for t in c.per_type})
                if not types:
                    continue
                rows = [[t, *(_text(_per_type(groups[m, meth, split], t)) for meth in present)] for t in types]
                lines += [f"### {m}, {split}", ""] + _table(["task type", *(METHODS[x].label for x in present)], rows)

    if training:
        lines += ["## Training", ""] + _training_table(training)

    plots = _plots(out, models, methods, main, robust, robust_keys, depth, training)
    captions = {
        "success_by_method.png": "Success per method, easy vs hard, with 95% Wilson intervals.",
        "success_vs_k.png": "Success vs the number K of retrieved trajectories, per method, split and mode.",
        "robustness.png": "Success by the bank read at inference, per split.",
        "training_curves.png": "Train and validation loss (left) and rollout success (right) per epoch.",
    }
    if plots:
        lines += ["## Figures", ""]
        for p in plots:
            lines += [f"![{captions[p.name]}]({os.path.relpath(p, out)})", "", f"*{captions[p.name]}*", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    return ReportResult(report, plots)


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
                  {s: [main.get((m, x, s)) for x in methods] for s in SPLITS})
            ax.set_title(f"{m}: success by method")
            ax.set_xlabel("method")
        written.append(_save(fig, out / "success_by_method.png"))

    ks = sorted({k for pts in depth.values() for _, k in pts})
    if len(ks) >= 2:
        dmodels = [m for m in models if any(g[0] == m for g in depth)]
        fig, axes = _figure(len(dmodels))
        for ax, m in zip(axes, dmodels):
            for (gm, meth, split), pts in depth.items():
                if gm != m:
                    continue
                for mode in sorted({md for md, _ in pts}, key=_MODE_PREFERENCE.index):
                    line = sorted((k, p) for (md, k), p in pts.items() if md == mode and p.n)
                    if line:
                        xs, ps = zip(*line)
                        ax.errorbar(xs, [100 * p.rate for p in ps], yerr=list(zip(*(p.yerr() for p in ps))),
                                    marker="o", capsize=3, label=f"{METHODS[meth].label}, {split}, {mode}")
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
            banks = [b for b in BANKS if any((m, meth, b, s) in robust for s in SPLITS)]
            _bars(ax, banks, {s: [robust.get((m, meth, b, s)) for b in banks] for s in SPLITS})
            ax.set_title(f"{m}: {METHODS[meth].label}")
            ax.set_xlabel("bank at inference")
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
