"""Retrieval quality: does retrieval hand the agent trajectories of the query's task type?

For held-out query trajectories (never in the bank), static or dynamic retrieval runs without any
task-type filter, and we count how often the top-1 / any of the top-K / all of the top-K share the
query's task type — overall, per task type, with the confusion of top-1 types, and the same on the
queries with no exact-text twin in the bank (large banks hide failures behind twins). Also: the
exact-duplicate rate (queries whose text is a bank key) and the copy rate (queries whose K slots hold
two trajectories with the same task text: near-copies that show the agent one task twice).

Queries are either held-out trajectories or **text queries**: JSON lines ``{"task_type", "text",
"source"?}``, a task as a user would write it (the paraphrase sets shipped under
``exprag/data/paraphrases/``), scored the same way (static retrieval of the text alone).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from exprag.bank.procedure import text_key
from exprag.bank.retriever import Filters, Hit, Retriever
from exprag.bank.store import Bank, static_key
from exprag.errors import DataFormatError
from exprag.trajectory import Trajectory

PARAPHRASES_DIR = Path(__file__).resolve().parent.parent / "data" / "paraphrases"


@dataclass(frozen=True)
class TextQuery:
    """A task written as free text, with the task type a right retrieval shows (never read by retrieval)."""

    task_type: str
    text: str
    source: str | None = None  # the templated task text it paraphrases, if any


def is_text_query_file(path: str | Path) -> bool:
    """True when the file's first record is a text query (``text`` and ``task_type``, no ``messages``)."""
    from exprag.io import iter_json_lines

    for _, obj in iter_json_lines(path):
        return isinstance(obj, dict) and "text" in obj and "task_type" in obj and "messages" not in obj
    return False


def read_text_queries(*paths: str | Path) -> list[TextQuery]:
    from exprag.io import iter_json_lines

    out = []
    for p in paths:
        for where, obj in iter_json_lines(p):
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: a text query must be a JSON object")
            for f in ("task_type", "text"):
                if not isinstance(obj.get(f), str) or not obj[f].strip():
                    raise DataFormatError(f"{where}: field {f!r} must be a non-empty string")
            src = obj.get("source")
            if src is not None and not isinstance(src, str):
                raise DataFormatError(f"{where}: field 'source' must be a string")
            out.append(TextQuery(obj["task_type"], obj["text"], src))
    return out


def paraphrase_file(env: str, split: str) -> Path:
    """The shipped hand-written paraphrases: ``split`` is ``dev`` (for tuning) or ``test`` (for reporting)."""
    return PARAPHRASES_DIR / f"{env}.{split}.jsonl"


@dataclass
class Rates:
    n: int = 0
    top1: int = 0
    any_k: int = 0
    all_k: int = 0

    def add(self, types: list[str], want: str) -> None:
        self.n += 1
        self.top1 += bool(types) and types[0] == want
        self.any_k += want in types
        self.all_k += bool(types) and all(t == want for t in types)

    def as_dict(self) -> dict[str, Any]:
        f = (lambda x: round(x / self.n, 4)) if self.n else (lambda x: None)
        return {"n": self.n, "top1": f(self.top1), "any_at_k": f(self.any_k), "all_at_k": f(self.all_k)}


@dataclass
class Subset:
    """Rates, per-type rates and the top-1 confusion of one set of queries."""

    rates: Rates = field(default_factory=Rates)
    per_type: dict[str, Rates] = field(default_factory=lambda: defaultdict(Rates))
    confusion: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # query type -> top-1 type

    def add(self, types: list[str], want: str) -> None:
        self.rates.add(types, want)
        self.per_type[want].add(types, want)
        self.confusion[want][types[0] if types else "<none>"] += 1


@dataclass
class QualityReport:
    k: int
    mode: str
    encoder: dict[str, Any]
    retrieval: dict[str, Any] = field(default_factory=dict)
    all: Subset = field(default_factory=Subset)
    twinless: Subset = field(default_factory=Subset)
    exact_duplicates: int = 0
    copies: int = 0
    skipped_in_bank: int = 0

    def add(self, task_type: str, hits: Sequence[Hit], twin: bool) -> None:
        """One query's hits, counted on all queries and, unless the query has an exact-text ``twin``
        in the bank, on the twinless ones; two hits of the same task text count as a copy."""
        types = [h.trajectory.task_type for h in hits]
        self.all.add(types, task_type)
        if twin:
            self.exact_duplicates += 1
        else:
            self.twinless.add(types, task_type)
        texts = [text_key(h.trajectory.task) for h in hits]
        self.copies += len(set(texts)) < len(texts)

    def as_dict(self) -> dict[str, Any]:
        n = self.all.rates.n
        return {
            "k": self.k, "mode": self.mode, "encoder": self.encoder, "retrieval": self.retrieval,
            "overall": self.all.rates.as_dict(),
            "no_twin": self.twinless.rates.as_dict(),
            "exact_duplicate_rate": round(self.exact_duplicates / n, 4) if n else None,
            "copy_rate": round(self.copies / n, 4) if n else None,
            "skipped_queries_in_bank": self.skipped_in_bank,
            "per_type": {t: r.as_dict() for t, r in sorted(self.all.per_type.items())},
            "confusion": _confusion(self.all),
            "no_twin_per_type": {t: r.as_dict() for t, r in sorted(self.twinless.per_type.items())},
            "no_twin_confusion": _confusion(self.twinless),
        }

    def markdown(self) -> str:
        d = self.as_dict()
        scoring = (self.retrieval or {}).get("scoring", "?")
        types = sorted(set(d["per_type"]) | set(d["no_twin_per_type"]))
        none = {"n": 0, "top1": None, "any_at_k": None, "all_at_k": None}
        lines = [
            f"# Retrieval quality ({self.mode}, k={self.k}, encoder {self.encoder.get('name')}, scoring {scoring})",
            "",
            "| queries | n | top-1 | any@k | all@k |",
            "|---|---|---|---|---|",
            _row("all", d["overall"]),
            _row("no exact-text twin in bank", d["no_twin"]),
            "",
            f"Exact-duplicate rate (query task text equals a bank key): {_fmt(d['exact_duplicate_rate'])}  ",
            f"Copy rate (two of the k slots hold the same task text): {_fmt(d['copy_rate'])}",
            "",
            "| task type | n | top-1 | any@k | all@k | no-twin n | no-twin top-1 | no-twin any@k | no-twin all@k |",
            "|---|---|---|---|---|---|---|---|---|",
            *[_row(t, d["per_type"].get(t, none), d["no_twin_per_type"].get(t, none)) for t in types],
            "",
        ]
        for title, conf in (("Confusion, all queries", d["confusion"]),
                            ("Confusion, queries with no twin", d["no_twin_confusion"])):
            lines += [f"{title} (query type → top-1 type when wrong, count):", ""]
            wrong = [(t, {u: v for u, v in c.items() if u != t}) for t, c in conf.items()]
            wrong = [(t, w) for t, w in wrong if w]
            lines += [f"- {t} → " + ", ".join(f"{u} ({v})" for u, v in w.items()) for t, w in wrong] or ["- none"]
            lines.append("")
        if len(types) <= 12 and d["confusion"]:
            cols = sorted({u for c in d["confusion"].values() for u in c} | set(types))
            lines += ["Confusion matrix, all queries (rows: query type, columns: top-1 type):", "",
                      "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {t} | " + " | ".join(str(d["confusion"].get(t, {}).get(u, 0)) for u in cols) + " |"
                      for t in types if t in d["confusion"]]
            lines.append("")
        return "\n".join(lines)


def _confusion(sub: Subset) -> dict[str, dict[str, int]]:
    return {t: dict(c.most_common()) for t, c in sorted(sub.confusion.items())}


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _row(name: str, r: dict[str, Any], nt: dict[str, Any] | None = None) -> str:
    cells = [name, str(r["n"]), _fmt(r["top1"]), _fmt(r["any_at_k"]), _fmt(r["all_at_k"])]
    if nt is not None:
        cells += [str(nt["n"]), _fmt(nt["top1"]), _fmt(nt["any_at_k"]), _fmt(nt["all_at_k"])]
    return "| " + " | ".join(cells) + " |"


def evaluate_retrieval(bank: Bank, queries: list[Trajectory], *, k: int = 2, mode: str = "static",
                       batch_size: int = 256) -> QualityReport:
    """Queries whose id is in the bank are skipped (they would retrieve themselves)."""
    report = QualityReport(k=k, mode=mode, encoder=bank.manifest.get("encoder", {}),
                           retrieval=bank.retrieval.to_manifest())
    bank_ids = {t.id for t in bank.trajectories}
    bank_keys = {static_key(t) for t in bank.trajectories}
    held_out = [q for q in queries if q.id not in bank_ids]
    report.skipped_in_bank = len(queries) - len(held_out)
    retriever = Retriever(bank)
    for start in range(0, len(held_out), batch_size):
        chunk = held_out[start:start + batch_size]
        # Same game / variation in the bank would be a leak of the answer, not retrieval skill.
        hits = retriever.retrieve_batch(
            [(q.task, _history(q) if mode == "dynamic" else None) for q in chunk], k=k, mode=mode,
            filters=[Filters(exclude_task_ids={q.task_id}) for q in chunk],
        )
        for q, hs in zip(chunk, hits):
            report.add(q.task_type, hs, twin=static_key(q) in bank_keys)
    return report


def evaluate_text_queries(bank: Bank, queries: list[TextQuery], *, k: int = 2,
                          batch_size: int = 256) -> QualityReport:
    """Static retrieval of each query's text alone, no filter; rates as for trajectory queries (a text
    equal to a bank key counts as an exact duplicate)."""
    report = QualityReport(k=k, mode="static", encoder=bank.manifest.get("encoder", {}),
                           retrieval=bank.retrieval.to_manifest())
    bank_keys = {text_key(t.task) for t in bank.trajectories}
    retriever = Retriever(bank)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        hits = retriever.retrieve_batch([(q.text, None) for q in chunk], k=k, mode="static")
        for q, hs in zip(chunk, hits):
            report.add(q.task_type, hs, twin=text_key(q.text) in bank_keys)
    return report


def _history(q: Trajectory, steps: int = 2) -> list[dict[str, str]]:
    """A dynamic query sees the start of the episode: the first observation and ``steps`` steps."""
    return q.episode_messages()[: 1 + 2 * steps]
