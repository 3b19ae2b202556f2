"""fusedqk.stats against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusedqk import stats


def test_identical_paths_give_speedup_one_with_a_zero_width_ci():
    s = stats.speedup_ci([1.0] * 10, p_value=1.0)
    assert (s.point, s.lo, s.hi, s.rounds) == (1.0, 1.0, 1.0, 10)


def test_a_constant_round_speedup_is_recovered_exactly():
    s = stats.speedup_ci([1.1] * 9, p_value=0.01)
    assert s.point == pytest.approx(1.1) and s.lo == pytest.approx(1.1) and s.hi == pytest.approx(1.1)


def test_point_is_the_geometric_mean_of_the_rounds():
    s = stats.speedup_ci([2, 1, 2, 2, 0.09], p_value=0.5)
    assert s.point == pytest.approx((2 * 1 * 2 * 2 * 0.09) ** (1 / 5))
    assert s.lo <= s.point <= s.hi


def test_round_speedup_pairs_turns_and_drops_a_pair_that_straddles_a_host_change():
    # The host is fast for three turns, then 1.7x slower; both paths' turn k share its state,
    # except turn 3, where the graph turn ran fast and the fused turn already slow.
    state = np.array([1.0, 1.0, 1.0, 1.7, 1.7, 1.7, 1.7])
    graph = 0.012 * state
    fused = graph / 1.2
    fused[3] = 0.012 * 1.0 * 1.7 / 1.2
    graph[3] = 0.012 * 1.0
    assert stats.round_speedup(graph.tolist(), fused.tolist()) == pytest.approx(1.2)
    # Whole-trial totals would mix the states: not 1.2.
    assert abs(graph.sum() / fused.sum() - 1.2) > 0.02


def test_drift_between_rounds_does_not_widen_the_ci():
    rng = np.random.default_rng(1)
    per_round = []
    for drift in rng.uniform(0.7, 1.3, 30):  # rounds 30% apart, turns paired within a round
        graph = 0.01 * drift * rng.uniform(0.9, 1.1, 32)
        per_round.append(stats.round_speedup(graph.tolist(), (graph / 1.1).tolist()))
    s = stats.speedup_ci(per_round, p_value=0.01)
    assert s.point == pytest.approx(1.1) and s.relative_half_width < 1e-9


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
