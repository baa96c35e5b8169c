"""exprag.stats on known tables: the exact McNemar test, its power against a brute-force enumeration,
the pooled test over independent strata, and the Wilson interval's single home."""

from __future__ import annotations

import itertools

import pytest

from exprag import stats
from exprag.stats import (Stratum, discordant_probs, mcnemar_critical, mcnemar_p, mcnemar_power, pool, spread,
                          strata_table, wilson)


def test_mcnemar_known_tables_and_single_home():
    assert mcnemar_p(5, 0) == mcnemar_p(0, 5) == 0.0625
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(6, 0) == 0.03125
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_p(-1, 2)
    from exprag import evaluate, report

    assert report.mcnemar_p is stats.mcnemar_p and evaluate.wilson is stats.wilson
    assert wilson(5, 50) == (0.0435, 0.2136)  # results/replication-cpu: ExpRAG-LoRA 5/50, CI [4.3, 21.4]
    assert wilson(0, 50) == (0.0, 0.0714)


def test_critical_values():
    assert mcnemar_critical(5) is None  # 5 to 0 is p = 0.0625: five discordant pairs can never reject
    assert mcnemar_critical(6) == 6
    assert mcnemar_critical(10) == 9  # 9:1 p = 0.0215; 8:2 p = 0.109
    for d in range(1, 40):
        k = mcnemar_critical(d)
        if k is not None:
            assert mcnemar_p(k, d - k) < 0.05 <= mcnemar_p(k - 1, d - k + 1) or k - 1 <= d // 2


def _brute_power(p_b: float, p_c: float, n: int, alpha: float, support_only: bool) -> float:
    """Every sequence of n pairs, each discordant for A (prob p_b), for B (p_c) or concordant."""
    probs = {"b": p_b, "c": p_c, "=": 1 - p_b - p_c}
    total = 0.0
    for seq in itertools.product("bc=", repeat=n):
        b, c = seq.count("b"), seq.count("c")
        if mcnemar_p(b, c) < alpha and (b > c or not support_only):
            pr = 1.0
            for s in seq:
                pr *= probs[s]
            total += pr
    return total


@pytest.mark.parametrize("p_b, p_c, n", [(0.3, 0.05, 8), (0.2, 0.2, 7), (0.5, 0.0, 6), (0.1, 0.4, 8)])
@pytest.mark.parametrize("support_only", [True, False])
def test_power_matches_brute_force(p_b, p_c, n, support_only):
    want = _brute_power(p_b, p_c, n, 0.05, support_only)
    assert mcnemar_power(p_b, p_c, n, 0.05, support_only=support_only) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_power_of_the_confirmatory_design():
    """The numbers the pre-registration quotes: ExpRAG-LoRA 6%, LoRA 0.5%, independent arms."""
    p_b, p_c = discordant_probs(0.06, 0.005)
    assert (p_b, p_c) == pytest.approx((0.06 * 0.995, 0.005 * 0.94))
    power = {n: round(mcnemar_power(p_b, p_c, n), 3) for n in (50, 100, 150, 200, 250)}
    assert power == {50: 0.063, 100: 0.426, 150: 0.73, 200: 0.883, 250: 0.953}
    assert mcnemar_power(p_b, p_c, 200, support_only=False) - mcnemar_power(p_b, p_c, 200) < 1e-4
    assert mcnemar_power(0.0, 0.0, 100) == 0.0
    assert mcnemar_power(0.1, 0.1, 0) == 0.0
    with pytest.raises(ValueError, match="sum <= 1"):
        mcnemar_power(0.7, 0.4, 10)
    assert mcnemar_power(0.05, 0.05, 1500) < 0.05  # no overflow at large n; the size stays below alpha


def test_pooled_strata():
    s2025 = Stratum("s2025", 50, 5, 0, 5, 0)
    s2026 = Stratum("s2026", 100, 7, 2, 6, 1)
    s2027 = Stratum("s2027", 100, 3, 3, 2, 2)
    both = pool([s2026, s2027], "confirm")
    assert (both.n, both.a_successes, both.b_successes, both.b, both.c) == (200, 10, 5, 8, 3)
    assert both.p == mcnemar_p(8, 3) == pytest.approx(0.2265625)
    assert pool([s2025, s2026, s2027]).p == mcnemar_p(13, 3)
    assert spread([s2025, s2026, s2027]) == (0.0, 0.1)
    table = strata_table([s2026, s2027], "ExpRAG-LoRA", "LoRA")
    assert table[2].startswith("| s2026 | 100 | 7/100 (7.0% [") and table[2].endswith("| 6 | 1 | 0.125 |")
    assert table[4].startswith("| pooled | 200 | 10/200") and table[4].endswith("| 8 | 3 | 0.2266 |")
    assert "+0.0 to +5.0 points" in table[5]
    with pytest.raises(ValueError, match="inconsistent paired counts"):
        Stratum("bad", 10, 2, 0, 1, 0)  # A won 2 but only 1 discordant, so B won one: B = 0 is impossible
    with pytest.raises(ValueError, match="no strata"):
        pool([])
