"""Statistics for paired, interleaved benchmark rounds.

The speedup of a fused path pairs its steps with the graph path's as closely in time as the
bench runs them. Within a round the two paths take turns of a few tokens back to back, so turn
k of one path and turn k of the other saw nearly the same host. A round's speedup is the median,
over its turns, of graph turn time / fused turn time (the median drops the few pairs that
straddle a change of the host's speed); the speedup is the geometric mean of the rounds', with a
95% confidence interval from a bootstrap over rounds. On the H100 its CI was 1.1-3.7x narrower
than that of a per-round ratio of tok/s (most on a noisy host) and 2.7-8x narrower than that of
a ratio of the two paths' medians, with points within 1.5% of both (docs/perf-log.md, 2026-11-26).
Stability warnings follow pyperf's spirit. One more, for a speedup that is not one number: the
rounds' first and second halves are summarised alike, and disjoint intervals mean the speedup
moved during the run. On the H100 it did: qwen3-8b's kernel gained 2-9% per round while the host
was fast and 25-30% while it was slow (docs/perf-log.md, 2026-11-27), so one run's interval covers
the mix of host states it saw, not another run's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

ESTIMATOR = ("geometric mean over rounds of each round's median, over its turns, of graph turn "
             "time / fused turn time (the paths' turns run back to back); 95% CI: bootstrap "
             "over rounds")
CV_WARN = 0.05
MIN_ROUNDS = 9
MIN_TRIAL_S = 0.1
MIN_HALF_ROUNDS = 4  # the halves are compared from 2 x 4 rounds on


@dataclass(frozen=True)
class Speedup:
    point: float
    lo: float
    hi: float
    level: float
    p_value: float  # two-sided Mann-Whitney U, fused vs graph tok/s
    rounds: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def relative_half_width(self) -> float:
        return self.half_width / self.point

    def as_dict(self) -> dict:
        return asdict(self)


def round_speedup(graph_turn_s: list[float], fused_turn_s: list[float]) -> float:
    """One round's speedup: the median over turns of graph / fused turn time (turn k of each)."""
    g, f = np.asarray(graph_turn_s, float), np.asarray(fused_turn_s, float)
    if g.shape != f.shape or g.size == 0:
        raise ValueError("graph and fused need the same, non-zero number of turns")
    return float(np.exp(np.median(np.log(g / f))))


def speedup_ci(round_speedups: list[float], *, p_value: float, level: float = 0.95,
               n_boot: int = 10_000, seed: int = 0) -> Speedup:
    """Geometric mean of the rounds' speedups with a bootstrap CI over rounds."""
    log_ratio = np.log(np.asarray(round_speedups, float))
    if log_ratio.size == 0:
        raise ValueError("no rounds")
    point = float(np.exp(log_ratio.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, log_ratio.size, size=(n_boot, log_ratio.size))
    means = np.exp(log_ratio[idx].mean(axis=1))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Speedup(point, float(lo), float(hi), level, p_value, int(log_ratio.size))


@dataclass(frozen=True)
class Halves:
    """The speedup of the first and of the second half of a run's rounds: (point, lo, hi) each,
    as ``speedup_ci`` gives them for the whole run."""

    first: tuple[float, float, float]
    second: tuple[float, float, float]

    @property
    def disjoint(self) -> bool:
        """The two intervals do not overlap: the speedup moved during the run."""
        return self.first[2] < self.second[1] or self.second[2] < self.first[1]

    def as_dict(self) -> dict:
        return {"first": list(self.first), "second": list(self.second), "disjoint": self.disjoint}

    @classmethod
    def from_dict(cls, d: dict) -> Halves:
        return cls(tuple(d["first"]), tuple(d["second"]))


def _split(first: list[float], second: list[float], seed: int) -> Halves:
    def summary(part: list[float]) -> tuple[float, float, float]:
        s = speedup_ci(part, p_value=float("nan"), seed=seed)
        return s.point, s.lo, s.hi

    return Halves(summary(first), summary(second))


def halves(round_speedups: list[float], *, seed: int = 0) -> Halves | None:
    """The first ``n // 2`` rounds against the rest; None under ``2 * MIN_HALF_ROUNDS`` rounds."""
    n = len(round_speedups)
    if n < 2 * MIN_HALF_ROUNDS:
        return None
    return _split(round_speedups[: n // 2], round_speedups[n // 2 :], seed)


def host_states(round_speedups: list[float], graph_round_s: list[float], *,
                seed: int = 0) -> Halves | None:
    """The rounds split by the host's speed instead of by time: ``first`` the half in which the
    host was fastest, ``second`` the rest, each summarised as ``halves`` does. A round's host
    speed is both paths' mean time per token together (their geometric mean, from the graph
    path's ``graph_round_s`` and the round's speedup): sorting by the graph path's time alone
    would put the rounds where graph was fast by chance in the first half, and their speedups
    are low by that same chance (an mlx-lm server bench on an H200, 2026-12-04, 417 rounds with
    per-request CVs of 15-18 %: 0.995 against 1.297 split by graph's time, 1.096 against 1.177
    by both paths', docs/perf-log.md). The fused path saves host work, so where the host's speed
    switches between states the speedup follows it; disjoint intervals say so, and that the
    run's interval is this run's mix of the two. None under ``2 * MIN_HALF_ROUNDS`` rounds."""
    if len(round_speedups) != len(graph_round_s):
        raise ValueError("one graph time per round")
    if len(round_speedups) < 2 * MIN_HALF_ROUNDS:
        return None
    host_s = np.asarray(graph_round_s, float) / np.sqrt(np.asarray(round_speedups, float))
    order = np.argsort(host_s, kind="stable")
    fast = set(order[: len(order) // 2].tolist())
    return _split([r for i, r in enumerate(round_speedups) if i in fast],
                  [r for i, r in enumerate(round_speedups) if i not in fast], seed)


def _interval(part: tuple[float, float, float]) -> str:
    return f"{part[0]:.3f} [{part[1]:.3f}, {part[2]:.3f}]"


# What ``host_states`` sorts the rounds by, recorded beside them (``host_states_by``); results
# written before it sorted by the graph path's time alone, and say so by lacking the field.
HOST_STATES_BY = "both paths"
HOST_STATES_BY_BEFORE = "graph"


def host_state_warnings(path: str, h: Halves | None,
                        split_by: str = HOST_STATES_BY) -> list[str]:
    if h is None or not h.disjoint:
        return []
    return [f"{path}: the speedup follows the host's speed ({_interval(h.first)} in the half of "
            f"the rounds where {split_by} decoded fastest, {_interval(h.second)} in the slower "
            "half): the run's CI is its mix of host states"]


def drift_warnings(path: str, h: Halves | None) -> list[str]:
    if h is None or not h.disjoint:
        return []
    return [f"{path}: the speedup moved during the run (first half of the rounds "
            f"{_interval(h.first)}, second half {_interval(h.second)}): it depends on the host's "
            "state, and the CI covers this run's mix of states, not another run's"]


def scipy_stats():
    """scipy.stats, imported on first use: its import costs ~0.9 s (2-core AMD EPYC), which
    every ``fusedqk`` process would otherwise pay at start-up, though most compute no p-value.
    The benches call it before their first round, so that no round's wall time holds it."""
    from scipy import stats as sps

    return sps


def mann_whitney_p(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.all(a == a[0]) and np.all(b == b[0]) and a[0] == b[0]:
        return 1.0
    return float(scipy_stats().mannwhitneyu(a, b, alternative="two-sided").pvalue)


def paired_p(round_speedups: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of the rounds' log speedups against 0: a paired test,
    each round's two arms ran back to back. 1.0 where every round is exactly even."""
    logs = np.log(np.asarray(round_speedups, float))
    if logs.size < 2 or np.all(logs == 0):
        return 1.0
    return float(scipy_stats().wilcoxon(logs).pvalue)


def cv(values) -> float:
    """Coefficient of variation (sample sd / mean)."""
    v = np.asarray(values, float)
    if v.size < 2 or v.mean() == 0:
        return 0.0
    return float(v.std(ddof=1) / v.mean())


def stability_warnings(path: str, values, rounds: int, trial_s: float) -> list[str]:
    out = []
    c = cv(values)
    if c > CV_WARN:
        out.append(f"{path}: coefficient of variation {c:.1%} > {CV_WARN:.0%}: results are unstable")
    if rounds < MIN_ROUNDS:
        out.append(f"{path}: only {rounds} rounds (< {MIN_ROUNDS}): the CI is wide")
    if trial_s < MIN_TRIAL_S:
        out.append(f"{path}: trials last {trial_s * 1e3:.0f} ms (< {MIN_TRIAL_S * 1e3:.0f} ms): "
                   "timer and launch noise dominate; raise --generation-tokens")
    return out


def rounds_to_decide(s: Speedup, min_gain: float) -> int | None:
    """Rounds that would likely shrink the CI enough to decide (1/sqrt(n) scaling), or None
    when the point estimate sits between 1 and 1 + min_gain, where no round count decides."""
    if s.point >= 1 + min_gain:
        need = s.point - (1 + min_gain)
    elif s.point < 1:
        need = 1 - s.point
    else:
        return None
    if need <= 0 or s.half_width <= 0:
        return s.rounds
    return math.ceil(s.rounds * (s.half_width / need) ** 2)
