"""fusedqk.stats against answers worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_halves_known_answers():
    assert stats.halves([1.2] * 7) is None  # under 2 x MIN_HALF_ROUNDS rounds
    steady = stats.halves([1.2] * 8)
    assert steady.first == steady.second == pytest.approx((1.2, 1.2, 1.2))
    assert not steady.disjoint and stats.drift_warnings("kernel", steady) == []
    step = stats.halves([1.0] * 4 + [2.0] * 5)  # 9 rounds: 4 in the first half, 5 in the second
    assert step.first == pytest.approx((1.0, 1.0, 1.0)) and step.second == pytest.approx((2.0,) * 3)
    assert step.disjoint and step.as_dict()["disjoint"] is True
    (warning,) = stats.drift_warnings("kernel", step)
    assert "first half of the rounds 1.000 [1.000, 1.000], second half 2.000" in warning


def test_halves_on_archived_h100_rounds():
    """Run 703a49a8e9-kernel: qwen3-8b's speedup moved with the host's state (1.07 -> 1.17),
    qwen3-30b-a3b's did not."""
    import pandas as pd

    from fusedqk.bench import round_speedups

    run = Path("results/cuda-nvidia-h100-80gb-hbm3/20261127-703a49a8e9-kernel")
    moved = {}
    for model in ("qwen3-8b", "qwen3-30b-a3b"):
        tokens = pd.read_csv(run / model / "bench" / "tokens.csv")
        (rounds,) = round_speedups(tokens, 4, ["graph", "kernel"]).values()
        moved[model] = stats.halves(rounds)
    assert moved["qwen3-8b"].disjoint
    assert moved["qwen3-8b"].first[0] == pytest.approx(1.070, abs=5e-4)
    assert moved["qwen3-8b"].second[0] == pytest.approx(1.171, abs=5e-4)
    assert not moved["qwen3-30b-a3b"].disjoint


def test_host_states_split_by_graph_speed_not_by_time():
    # Fast and slow rounds alternate: the halves in time agree, the split by host speed does not.
    graph_s = [0.005, 0.008] * 5
    rounds = [1.05, 1.35] * 5
    assert not stats.halves(rounds).disjoint
    states = stats.host_states(rounds, graph_s)
    assert states.first == pytest.approx((1.05,) * 3) and states.second == pytest.approx((1.35,) * 3)
    (warning,) = stats.host_state_warnings("kernel", states)
    assert "1.050 [1.050, 1.050] in the half of the rounds where both paths decoded fastest" in warning
    assert stats.host_states(rounds[:7], graph_s[:7]) is None
    with pytest.raises(ValueError, match="one graph time per round"):
        stats.host_states(rounds, graph_s[:-1])
    steady = stats.host_states([1.2] * 8, [0.005] * 8)
    assert not steady.disjoint and stats.host_state_warnings("kernel", steady) == []


def test_host_states_do_not_see_a_host_effect_in_each_paths_own_noise():
    # A constant 1.15 speedup, a host state both paths share, and noise of 15 % per request
    # that each path draws on its own (as a server's requests do): sorting by graph's time
    # alone would find the rounds where graph was lucky, whose speedups are low by that luck.
    rng = np.random.default_rng(7)
    host = rng.lognormal(0, 0.1, 400)
    graph_s = 0.005 * host * rng.lognormal(0, 0.15, 400)
    fused_s = 0.005 / 1.15 * host * rng.lognormal(0, 0.15, 400)
    rounds = (graph_s / fused_s).tolist()
    states = stats.host_states(rounds, graph_s.tolist())
    assert not states.disjoint
    assert states.first[0] == pytest.approx(1.15, rel=0.04)
    assert states.second[0] == pytest.approx(1.15, rel=0.04)
    by_graph = np.argsort(graph_s)[:200]
    assert np.exp(np.log(np.asarray(rounds)[by_graph]).mean()) < 1.06  # the bias it avoids


def test_host_states_on_archived_h100_rounds():
    """Run 703a49a8e9-kernel: qwen3-8b's kernel gained 6 % in its fast rounds and 18 % in its
    slow ones; qwen3-30b-a3b's speedup did not follow the host."""
    import pandas as pd

    from fusedqk.bench import round_speedups

    run = Path("results/cuda-nvidia-h100-80gb-hbm3/20261127-703a49a8e9-kernel")
    states = {}
    for model in ("qwen3-8b", "qwen3-30b-a3b"):
        tokens = pd.read_csv(run / model / "bench" / "tokens.csv")
        (rounds,) = round_speedups(tokens, 4, ["graph", "kernel"]).values()
        graph_s = tokens[tokens.path == "graph"].groupby("round").latency_s.mean().tolist()
        states[model] = stats.host_states(rounds, graph_s)
    assert states["qwen3-8b"].disjoint
    assert states["qwen3-8b"].first[0] == pytest.approx(1.069, abs=5e-4)
    assert states["qwen3-8b"].second[0] == pytest.approx(1.172, abs=5e-4)
    assert not states["qwen3-30b-a3b"].disjoint
