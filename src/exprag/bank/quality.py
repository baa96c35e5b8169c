"""Retrieval quality: does retrieval hand the agent trajectories of the query's task type?

For held-out query trajectories (never in the bank), static or dynamic retrieval runs without any
task-type filter, and we count how often the top-1 / any of the top-K / all of the top-K share the
query's task type — overall, per task type, and on queries with no exact-text twin in the bank.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from exprag.bank.retriever import Filters, Retriever
from exprag.bank.store import Bank, static_key
from exprag.trajectory import Trajectory


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
class QualityReport:
    k: int
    mode: str
    encoder: dict[str, Any]
    overall: Rates = field(default_factory=Rates)
    no_twin: Rates = field(default_factory=Rates)
    per_type: dict[str, Rates] = field(default_factory=lambda: defaultdict(Rates))
    confusion: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # query type -> top-1 type
    exact_duplicates: int = 0
    skipped_in_bank: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = self.overall.n
        return {
            "k": self.k, "mode": self.mode, "encoder": self.encoder,
            "overall": self.overall.as_dict(),
            "no_twin": self.no_twin.as_dict(),
            "exact_duplicate_rate": round(self.exact_duplicates / n, 4) if n else None,
            "skipped_queries_in_bank": self.skipped_in_bank,
            "per_type": {t: r.as_dict() for t, r in sorted(self.per_type.items())},
            "confusion": {t: dict(c.most_common()) for t, c in sorted(self.confusion.items())},
        }

    def markdown(self) -> str:
        d = self.as_dict()
        lines = [
            f"# Retrieval quality ({self.mode}, k={self.k}, encoder {self.encoder.get('name')})",
            "",
            "| queries | n | top-1 | any@k | all@k |",
            "|---|---|---|---|---|",
            _row("all", d["overall"]),
            _row("no exact-text twin in bank", d["no_twin"]),
            "",
            f"Exact-duplicate rate (query task text equals a bank key): {d['exact_duplicate_rate']}",
            "",
            "| task type | n | top-1 | any@k | all@k |",
            "|---|---|---|---|---|",
            *[_row(t, r) for t, r in d["per_type"].items()],
            "",
            "Confusion (query type → top-1 type, count):",
            "",
        ]
        for t, c in d["confusion"].items():
            wrong = {u: v for u, v in c.items() if u != t}
            if wrong:
                lines.append(f"- {t} → " + ", ".join(f"{u} ({v})" for u, v in wrong.items()))
        return "\n".join(lines) + "\n"


def _row(name: str, r: dict[str, Any]) -> str:
    def fmt(x):
        return "–" if x is None else f"{x:.3f}"

    return f"| {name} | {r['n']} | {fmt(r['top1'])} | {fmt(r['any_at_k'])} | {fmt(r['all_at_k'])} |"


def evaluate_retrieval(bank: Bank, queries: list[Trajectory], *, k: int = 2, mode: str = "static",
                       batch_size: int = 256) -> QualityReport:
    """Queries whose id is in the bank are skipped (they would retrieve themselves)."""
    report = QualityReport(k=k, mode=mode, encoder=bank.manifest.get("encoder", {}))
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
            types = [h.trajectory.task_type for h in hs]
            twin = static_key(q) in bank_keys
            report.overall.add(types, q.task_type)
            report.per_type[q.task_type].add(types, q.task_type)
            if twin:
                report.exact_duplicates += 1
            else:
                report.no_twin.add(types, q.task_type)
            report.confusion[q.task_type][types[0] if types else "<none>"] += 1
    return report


def _history(q: Trajectory, steps: int = 2) -> list[dict[str, str]]:
    """A dynamic query sees the start of the episode: the first observation and ``steps`` steps."""
    return q.episode_messages()[: 1 + 2 * steps]
