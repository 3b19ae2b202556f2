"""Statistics for paired, interleaved benchmark rounds.

The speedup of a fused path is the geometric mean, over rounds, of fused tok/s / graph tok/s in
the same round. Its 95% confidence interval comes from a bootstrap over rounds. The ratio is
taken inside each round because both paths of a round share the host's drift, which the ratio
cancels; a ratio of the two paths' medians over rounds keeps it (on the H100 the round-to-round
spread of one path was 12-15% while the within-round ratio moved by 2-3%: docs/perf-log.md,
session 4). Stability warnings follow pyperf's spirit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

ESTIMATOR = ("geometric mean over rounds of fused/graph decode tok/s in the same round; "
             "95% CI: bootstrap over rounds")
CV_WARN = 0.05
MIN_ROUNDS = 9
MIN_TRIAL_S = 0.1


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


def speedup_ci(graph: list[float], fused: list[float], *, level: float = 0.95,
               n_boot: int = 10_000, seed: int = 0) -> Speedup:
    """Geometric mean of the per-round ratios fused/graph, with a bootstrap CI over rounds;
    ``graph[i]`` and ``fused[i]`` are round i's tok/s."""
    g, f = np.asarray(graph, float), np.asarray(fused, float)
    if g.shape != f.shape or g.size == 0:
        raise ValueError("graph and fused need the same, non-zero number of rounds")
    log_ratio = np.log(f / g)
    point = float(np.exp(log_ratio.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, g.size, size=(n_boot, g.size))
    means = np.exp(log_ratio[idx].mean(axis=1))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    p = mann_whitney_p(g, f)
    return Speedup(point, float(lo), float(hi), level, p, int(g.size))


def mann_whitney_p(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.all(a == a[0]) and np.all(b == b[0]) and a[0] == b[0]:
        return 1.0
    return float(sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)


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
