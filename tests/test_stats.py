"""fusedqk.stats against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusedqk import stats


def test_identical_paths_give_speedup_one_with_a_zero_width_ci():
    s = stats.speedup_ci([100.0] * 10, [100.0] * 10)
    assert (s.point, s.lo, s.hi) == (1.0, 1.0, 1.0)
    assert s.p_value == 1.0


def test_constant_ratio_is_recovered_exactly_by_the_paired_bootstrap():
    graph = [100, 80, 120, 90, 110, 95, 105, 85, 115]
    fused = [1.1 * g for g in graph]  # every round 10% faster, whatever the drift
    s = stats.speedup_ci(graph, fused)
    assert s.point == pytest.approx(1.1) and s.lo == pytest.approx(1.1) and s.hi == pytest.approx(1.1)


def test_point_is_geometric_mean_of_the_round_ratios():
    s = stats.speedup_ci([1, 2, 3, 4, 100], [2, 2, 6, 8, 9])
    assert s.point == pytest.approx((2 * 1 * 2 * 2 * 0.09) ** (1 / 5))
    assert s.lo <= s.point <= s.hi


def test_drift_shared_by_a_round_cancels_in_the_ci():
    # Rounds drift by +-30% (both paths alike) while the within-round ratio moves by ~1%:
    # the CI must reflect the 1%, not the 30%.
    rng = np.random.default_rng(1)
    drift = rng.uniform(0.7, 1.3, 30)
    graph = 100 * drift
    fused = 110 * drift * rng.normal(1, 0.01, 30)
    s = stats.speedup_ci(graph.tolist(), fused.tolist())
    assert s.point == pytest.approx(1.1, rel=0.01)
    assert s.relative_half_width < 0.006


def test_mann_whitney_known_value():
    # Complete separation of 3 vs 3: exact two-sided p = 2 / C(6,3) = 0.1.
    assert stats.mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_cv():
    assert stats.cv([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(2.138089935 / 5)
    assert stats.cv([5]) == 0.0


def test_warnings():
    w = stats.stability_warnings("graph", [100, 130, 70], rounds=3, trial_s=0.01)
    assert any("coefficient of variation" in x for x in w)
    assert any("only 3 rounds" in x for x in w)
    assert any("trials last" in x for x in w)
    assert stats.stability_warnings("graph", [100, 100.5, 99.5] * 4, rounds=12, trial_s=1) == []


def test_rounds_to_decide():
    s = stats.Speedup(point=1.05, lo=1.00, hi=1.10, level=0.95, p_value=0.1, rounds=10)
    # Half-width 0.05 must shrink to 0.04 (1.05 - 1.01): 10 * (0.05/0.04)^2 = 15.6 -> 16.
    assert stats.rounds_to_decide(s, 0.01) == math.ceil(10 * (0.05 / 0.04) ** 2)
    between = stats.Speedup(1.005, 0.99, 1.02, 0.95, 0.5, 10)
    assert stats.rounds_to_decide(between, 0.01) is None
