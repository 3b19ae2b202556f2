"""The speedup statistic before and after session 4, on archived runs' raw trials: the ratio of
the paths' medians over rounds (bootstrap resampling rounds) against the geometric mean of the
per-round ratios (``fusedqk.stats.speedup_ci``). Same rounds, same seed, same resamples count.

    python tools/compare_speedup_estimators.py results/cuda-*/2026*
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fusedqk import stats


def ratio_of_medians(graph: np.ndarray, fused: np.ndarray, n_boot: int = 10_000) -> tuple:
    idx = np.random.default_rng(0).integers(0, graph.size, size=(n_boot, graph.size))
    boots = np.median(fused[idx], axis=1) / np.median(graph[idx], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(np.median(fused) / np.median(graph)), float(lo), float(hi)


def main(runs: list[Path]) -> None:
    print("| run | model | path | rounds | ratio of medians [95% CI] | half-width | "
          "geometric mean of round ratios [95% CI] | half-width |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        trials = pd.read_csv(run / "trials.csv")
        for (model, path), _ in trials[trials.path != "graph"].groupby(["model", "path"]):
            by_round = trials[trials.model == model].pivot(index="round", columns="path",
                                                           values="decode_tok_s")
            g, f = by_round["graph"].to_numpy(), by_round[path].to_numpy()
            point, lo, hi = ratio_of_medians(g, f)
            s = stats.speedup_ci(g.tolist(), f.tolist())
            print(f"| {run.name} | {model} | {path} | {g.size} | {point:.3f} [{lo:.3f}, {hi:.3f}] | "
                  f"{(hi - lo) / 2 / point:.2%} | {s.point:.3f} [{s.lo:.3f}, {s.hi:.3f}] | "
                  f"{s.relative_half_width:.2%} |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
