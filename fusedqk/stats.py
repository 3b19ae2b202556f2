"""Statistics for paired, interleaved benchmark rounds.

The speedup of a fused path is median(fused tok/s) / median(graph tok/s). Its 95% confidence
interval comes from a bootstrap over rounds, paired: a resample draws whole rounds, so the drift
that both paths of one round shared stays shared. Stability warnings follow pyperf's spirit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

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

    def as_dict(self) -> dict:
        return asdict(self)


def speedup_ci(graph: list[float], fused: list[float], *, level: float = 0.95,
               n_boot: int = 10_000, seed: int = 0) -> Speedup:
    """Median ratio with a paired bootstrap CI; ``graph[i]`` and ``fused[i]`` share round i."""
    g, f = np.asarray(graph, float), np.asarray(fused, float)
    if g.shape != f.shape or g.size == 0:
        raise ValueError("graph and fused need the same, non-zero number of rounds")
    point = float(np.median(f) / np.median(g))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, g.size, size=(n_boot, g.size))
    ratios = np.median(f[idx], axis=1) / np.median(g[idx], axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
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
