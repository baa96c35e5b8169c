"""The project's statistics, exact and dependency-free (math only): the Wilson interval of a success
rate, the exact McNemar test of two arms played on the same games, its power, and the pooled test over
independent strata (training seeds, each on its own games).

Paired outcomes of arms A and B on n games: ``b`` games A won and B lost, ``c`` games A lost and B won
(the discordant pairs); the games both won or both lost say nothing about the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: well-behaved at 0%, 100% and small n."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under no difference, each of the ``b + c`` discordant pairs
    goes either way with probability 1/2, so p = 2 P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1.
    Integer arithmetic (math.comb): exact, and no statistics package needed."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def _binom_pmf(k: int, n: int, p: float) -> float:
    # in logs: math.comb(n, k) overflows a float from n ~ 1030
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    log = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
           + k * math.log(p) + (n - k) * math.log1p(-p))
    return math.exp(log)


@lru_cache(maxsize=4096)
def mcnemar_critical(d: int, alpha: float = 0.05) -> int | None:
    """The smallest b with ``mcnemar_p(b, d - b) < alpha`` among ``d`` discordant pairs (b > d / 2; the
    test is symmetric, so c >= the same value rejects too), or None when no split of d pairs can."""
    # mcnemar_p(d - m, m) = 2 sum_{i <= m} C(d, i) / 2^d grows with m: add terms until it reaches alpha
    total, tail, comb, best = 2 ** d, 0, 1, None
    for m in range((d + 1) // 2):  # m = min(b, c) < d / 2
        tail += comb
        if 2 * tail / total >= alpha:
            break
        best = m
        comb = comb * (d - m) // (m + 1)
    return None if best is None else d - best


def mcnemar_power(p_b: float, p_c: float, n: int, alpha: float = 0.05, *, support_only: bool = True) -> float:
    """Power of the exact two-sided McNemar test at ``alpha`` (reject when p < alpha) on ``n``
    independent pairs, where a pair is discordant in A's favour with probability ``p_b`` and in B's
    with ``p_c``. Exact, no simulation: the number D of discordant pairs is Binomial(n, p_b + p_c);
    given D = d, the pairs in A's favour are Binomial(d, p_b / (p_b + p_c)), and the conditional exact
    test rejects from ``mcnemar_critical(d)``. ``support_only``: count only rejections with b > c (a
    hypothesis "A beats B" supported); False counts a rejection either way."""
    if not (0.0 <= p_b <= 1.0 and 0.0 <= p_c <= 1.0 and p_b + p_c <= 1.0):
        raise ValueError(f"discordant probabilities must be in [0, 1] with a sum <= 1, got p_b={p_b}, p_c={p_c}")
    if n < 0:
        raise ValueError(f"n must be >= 0 pairs, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    q = p_b + p_c
    if q == 0.0:
        return 0.0
    share = p_b / q
    power = 0.0
    for d in range(n + 1):
        weight = _binom_pmf(d, n, q)
        k = mcnemar_critical(d, alpha) if weight > 0.0 else None  # 0.0: below float range, negligible
        if k is None:
            continue
        reject = sum(_binom_pmf(j, d, share) for j in range(k, d + 1))  # b >= k
        if not support_only:
            reject += sum(_binom_pmf(j, d, share) for j in range(0, d - k + 1))  # c >= k
        power += weight * reject
    return power


def discordant_probs(p_a: float, p_b: float) -> tuple[float, float]:
    """(P(A wins, B loses), P(A loses, B wins)) of one game when the two arms succeed independently
    with probabilities ``p_a`` and ``p_b`` (a planning assumption: on the same game they correlate)."""
    for name, v in (("p_a", p_a), ("p_b", p_b)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
    return p_a * (1 - p_b), p_b * (1 - p_a)


@dataclass(frozen=True)
class Stratum:
    """A paired comparison of A and B on the games of one stratum (e.g. one training seed, its own games)."""

    name: str
    n: int  # pairs
    a_successes: int
    b_successes: int
    b: int  # A won, B lost
    c: int  # A lost, B won

    def __post_init__(self) -> None:
        both = self.a_successes - self.b
        if min(self.n, self.a_successes, self.b_successes, self.b, self.c) < 0 or both < 0 \
                or both != self.b_successes - self.c or both + self.b + self.c > self.n:
            raise ValueError(f"stratum {self.name!r}: inconsistent paired counts n={self.n}, A={self.a_successes}, "
                             f"B={self.b_successes}, b={self.b}, c={self.c} (need A - b = B - c >= 0 and "
                             f"A + c <= n)")

    @property
    def p(self) -> float:
        return mcnemar_p(self.b, self.c)

    @property
    def difference(self) -> float:
        """A's success rate minus B's."""
        return (self.a_successes - self.b_successes) / self.n if self.n else 0.0


def pool(strata: list[Stratum], name: str = "pooled") -> Stratum:
    """The strata as one: counts summed. With independent pairs (every stratum on its own games) the
    exact McNemar test of the pooled discordant counts is valid, so ``pool(strata).p`` is the pooled test."""
    if not strata:
        raise ValueError("pool: no strata")
    return Stratum(name, sum(s.n for s in strata), sum(s.a_successes for s in strata),
                   sum(s.b_successes for s in strata), sum(s.b for s in strata), sum(s.c for s in strata))


def spread(strata: list[Stratum]) -> tuple[float, float]:
    """(smallest, largest) per-stratum difference in success rate, A minus B: the seed-level spread."""
    if not strata:
        raise ValueError("spread: no strata")
    diffs = [s.difference for s in strata]
    return min(diffs), max(diffs)


def strata_table(strata: list[Stratum], a: str = "A", b: str = "B") -> list[str]:
    """A markdown table: each stratum's rates (Wilson 95% intervals), discordant pairs and exact p side by
    side, then the pooled row (its p is the pooled test) and the spread of the per-stratum differences."""
    def rate(k: int, n: int) -> str:
        lo, hi = wilson(k, n)
        return f"{k}/{n} ({100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}])" if n else "-"

    rows = [f"| stratum | pairs | {a} | {b} | b ({a} only) | c ({b} only) | exact McNemar p |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in [*strata, pool(strata)] if len(strata) > 1 else strata:
        rows.append(f"| {s.name} | {s.n} | {rate(s.a_successes, s.n)} | {rate(s.b_successes, s.n)} | {s.b} | {s.c} "
                    f"| {s.p:.4g} |")
    if len(strata) > 1:
        lo, hi = spread(strata)
        rows.append(f"\nPer-stratum difference {a} - {b}: {100 * lo:+.1f} to {100 * hi:+.1f} points.")
    return rows
