"""Do a bank's task-type labels tell its procedures apart? Checked at build time, without a model.

``procedure`` scoring learns its term weights from the stored ``task_type``. That only helps when the
labels follow the procedures: a bank whose trajectories all carry one label, or a user's own data
labelled by something else (a source, a date, a random id), teaches weights that are noise. Such a
bank falls back to label-free weights (inverse document frequency), and the manifest says so.

The check: each key's nearest other key under a label-free lexical similarity (IDF-weighted cosine
of the key's words); how often do the two share a label, against how often two keys drawn at random
do (``chance``)? ``lift = (agreement - chance) / (1 - chance)``: about 0 for labels that have nothing
to do with the text, 0.6-1 on the benchmarks' own labels. Labels are kept when the lift is at least
``MIN_LIFT`` and the agreement is above chance by ``MIN_Z`` binomial standard errors (a small bank's
agreement is noisy).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

MIN_LIFT = 0.3
MIN_Z = 3.0
MAX_PROBES = 2000  # keys checked against the whole bank (a random sample of larger banks)
FALLBACK = "idf"  # the label-free term weights a bank falls back to


@dataclass(frozen=True)
class LabelCheck:
    useful: bool
    distinct_types: int
    agreement: float | None  # share of keys whose nearest neighbour has their label
    chance: float | None  # the same for two random keys
    lift: float | None
    probes: int
    reason: str

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.useful:
            d["fallback"] = FALLBACK
        return d


def check_labels(texts: Sequence[str], labels: Sequence[str], seed: int = 0) -> LabelCheck:
    """Whether ``labels`` (one per key text) separate the keys' procedures; see the module doc."""
    if len(texts) != len(labels):
        raise ValueError("one label per key text")
    counts = np.unique(np.asarray(list(labels), dtype=object), return_counts=True)[1]
    n, n_types = len(texts), len(counts)
    if n_types < 2:
        return LabelCheck(False, n_types, None, None, None, 0,
                          "one task type: the labels cannot tell procedures apart")
    # the chance that a key's neighbour shares its label when labels are unrelated to the text
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    probes = list(range(n))
    if n > MAX_PROBES:
        probes = sorted(random.Random(seed).sample(probes, MAX_PROBES))
    agreement = _neighbour_agreement(texts, labels, probes)
    lift = (agreement - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    z = (agreement - chance) / math.sqrt(max(chance * (1.0 - chance), 1e-12) / len(probes))
    useful = lift >= MIN_LIFT and z >= MIN_Z
    why = (f"nearest keys share a label {agreement:.2f} of the time against {chance:.2f} by chance "
           f"(lift {lift:.2f}, z {z:.1f}; labels are used when lift >= {MIN_LIFT} and z >= {MIN_Z})")
    if not useful:
        why = "labels do not follow the key texts: " + why
    return LabelCheck(useful, n_types, round(agreement, 4), round(chance, 4), round(lift, 4), len(probes), why)


def _neighbour_agreement(texts: Sequence[str], labels: Sequence[str], probes: list[int]) -> float:
    """Mean, over the probes, of the share of their nearest other keys (ties shared) with their label."""
    from exprag.bank.procedure import ProcedureIndex, TermWeights

    weights = TermWeights.learn(texts, [""] * len(texts), alpha=1.0)  # one label: IDF, label-free
    index = ProcedureIndex(list(texts), weights, None, 0.0, False)
    lab = np.asarray(list(labels), dtype=object)
    total = 0.0
    for start in range(0, len(probes), 256):
        chunk = probes[start:start + 256]
        s = index.lexical([texts[i] for i in chunk])
        s[np.arange(len(chunk)), chunk] = -np.inf  # never the key itself
        for row, i in zip(s, chunk):
            best = row.max()
            near = np.flatnonzero(row >= best - 1e-6) if best > 0 else np.flatnonzero(row > -np.inf)
            total += float(np.mean(lab[near] == lab[i]))
    return total / len(probes)
