"""Turn-length sweep summary: how the turn length C trades the speedup's per-round noise against
the bench's wall time. Reads bench directories named <model>-c<C> under one folder, plus
wall.txt lines "<model> <C> <seconds>" (tools/device.sh turns).

    python tools/summarize_turns.py OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def main(out: Path) -> None:
    walls = {(m, int(c)): float(s) for m, c, s in
             (line.split() for line in (out / "wall.txt").read_text().splitlines() if line.strip())}
    print("| model | C | rounds | per-round log-ratio SD | speedup [95% CI] | half-width | "
          "wall s | wall s per round | rounds for 1% | predicted wall s for 1% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, c), wall in sorted(walls.items()):
        run = out / f"{model}-c{c}"
        if not (run / "trials.csv").is_file():
            print(f"| {model} | {c} | failed | | | | {wall:.0f} | | | |")
            continue
        trials = pd.read_csv(run / "trials.csv")
        by_round = trials.pivot(index="round", columns="path", values="decode_tok_s")
        (fused,) = (p for p in by_round.columns if p != "graph")
        sd = float(np.std(np.log(by_round[fused] / by_round["graph"]), ddof=1))
        (sp,) = json.loads((run / "bench.json").read_text())["speedups"]
        hw = (sp["hi"] - sp["lo"]) / 2 / sp["point"]
        n = len(by_round)
        need = max(n, math.ceil(n * (hw / 0.01) ** 2))
        print(f"| {model} | {c} | {n} | {sd:.1%} | {sp['point']:.3f} [{sp['lo']:.3f}, {sp['hi']:.3f}] "
              f"| {hw:.2%} | {wall:.0f} | {wall / n:.1f} | {need} | {wall / n * need:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
