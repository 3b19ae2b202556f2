"""Three speedup statistics on archived runs' raw samples, same rounds, same bootstrap:

- ratio of medians: median(fused tok/s) / median(graph tok/s) over rounds (sessions 1-3);
- per-round ratio: geometric mean over rounds of fused / graph tok/s in the round (session 4's
  first step);
- turn-paired: geometric mean over rounds of the median over turns of graph / fused turn time
  (``fusedqk.stats``, what the bench reports now).

    python tools/compare_speedup_estimators.py results/cuda-*/2026*
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fusedqk import stats
from fusedqk.bench import round_speedups


def ratio_of_medians(graph: np.ndarray, fused: np.ndarray, n_boot: int = 10_000) -> stats.Speedup:
    idx = np.random.default_rng(0).integers(0, graph.size, size=(n_boot, graph.size))
    boots = np.median(fused[idx], axis=1) / np.median(graph[idx], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return stats.Speedup(float(np.median(fused) / np.median(graph)), float(lo), float(hi),
                         0.95, float("nan"), graph.size)


def turn_paired(tokens: pd.DataFrame, chunk: int, path: str) -> stats.Speedup:
    (per_round,) = round_speedups(tokens, chunk, ["graph", path]).values()
    return stats.speedup_ci(per_round, p_value=float("nan"))


def cell(s: stats.Speedup) -> str:
    return f"{s.point:.3f} [{s.lo:.3f}, {s.hi:.3f}] | {s.relative_half_width:.2%}"


def main(runs: list[Path]) -> None:
    print("| run | model | path | rounds | C | ratio of medians | half-width | per-round ratio | "
          "half-width | turn-paired | half-width |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        trials = pd.read_csv(run / "trials.csv")
        for (model, path), sub in trials[trials.path != "graph"].groupby(["model", "path"]):
            by_round = trials[trials.model == model].pivot(index="round", columns="path",
                                                           values="decode_tok_s")
            g, f = by_round["graph"].to_numpy(), by_round[path].to_numpy()
            # Runs before turns existed ran each trial as one turn.
            chunk = int(sub["chunk_tokens" if "chunk_tokens" in sub else "generation_tokens"].iloc[0])
            tokens = pd.read_csv(run / model / "bench" / "tokens.csv")
            print(f"| {run.name} | {model} | {path} | {g.size} | {chunk} | "
                  f"{cell(ratio_of_medians(g, f))} | "
                  f"{cell(stats.speedup_ci((f / g).tolist(), p_value=float('nan')))} | "
                  f"{cell(turn_paired(tokens, chunk, path))} |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
