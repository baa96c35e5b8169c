"""Do a bank's task-type labels tell its procedures apart? Checked at build time, without a model.

``procedure`` scoring learns its term weights from the stored ``task_type``. That only helps when the
labels follow the procedures: a bank whose trajectories all carry one label, or a user's own data
labelled by something else (a source, a date, a random id), teaches weights that are noise. Such a
bank falls back to label-free weights (every word the same weight), and the manifest says so.

The check: do same-label keys share vocabulary better than chance? The statistic is the mean, over
the keys, of the highest learned weight among a key's words (does the key hold a word that tells its
label apart?). It is computed with the bank's labels and with ``PERMUTATIONS`` random shuffles of
them; the labels are kept when theirs beats every shuffle and is ``MIN_Z`` standard deviations above
the shuffles' mean (docs/retrieval-quality.md has the margins measured on the benchmarks' banks).
Nearest-neighbour label agreement was tried first and rejected: in a small bank whose task texts
overlap in objects and receptacles across types, the nearest key is of another type even when the
labels are right.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

MIN_Z = 3.0
PERMUTATIONS = 20
MAX_KEYS = 5000  # larger banks are checked on a random sample of their keys
FALLBACK = "uniform"  # the label-free term weights a bank falls back to (every word weighs the same)


@dataclass(frozen=True)
class LabelCheck:
    useful: bool
    distinct_types: int
    score: float | None  # mean over keys of their best word's weight, learned from the labels
    chance: float | None  # the same with shuffled labels (mean of the shuffles)
    z: float | None  # (score - chance) / the shuffles' standard deviation
    keys_checked: int
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
    n_types = len(set(labels))
    if n_types < 2:
        return LabelCheck(False, n_types, None, None, None, len(texts),
                          "one task type: the labels cannot tell procedures apart")
    rng = random.Random(seed)
    idx = list(range(len(texts)))
    if len(idx) > MAX_KEYS:
        idx = sorted(rng.sample(idx, MAX_KEYS))
    texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    score = _best_word_weight(texts, labels)
    shuffled = []
    for _ in range(PERMUTATIONS):
        perm = list(labels)
        rng.shuffle(perm)
        shuffled.append(_best_word_weight(texts, perm))
    chance, sd = float(np.mean(shuffled)), max(float(np.std(shuffled)), 1e-3)
    z = (score - chance) / sd
    useful = z >= MIN_Z and score > max(shuffled)  # the max: a small bank's shuffles have heavy tails
    why = (f"keys' best label-telling word weighs {score:.3f} on average against {chance:.3f} with "
           f"shuffled labels ({z:.1f} standard deviations; labels are used from {MIN_Z})")
    if not useful:
        why = "labels do not follow the key texts: " + why
    return LabelCheck(useful, n_types, round(score, 4), round(chance, 4), round(z, 2), len(texts), why)


def _best_word_weight(texts: Sequence[str], labels: Sequence[str]) -> float:
    from exprag.bank.procedure import TermWeights, default_alpha, procedure_tokens

    w = TermWeights.learn(texts, list(labels), default_alpha(len(texts))).weights
    return float(np.mean([max((w.get(t, 0.0) for t in procedure_tokens(x)), default=0.0) for x in texts]))
