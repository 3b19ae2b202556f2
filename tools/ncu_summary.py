"""Summarise Nsight Compute CSVs from tools/device.sh: device time per kernel name and per token.

Each CSV profiles one `fusedqk blockbench --paths P --reps 1 --warmup 0` run (one block of all
layers). Prints a markdown table.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

BLOCKS = 1  # evaluations of the whole block that ncu saw (reps=1, warmup=0)


def read(path: Path) -> list[dict]:
    text = path.read_text(errors="replace")
    start = text.find('"ID"')
    return list(csv.DictReader(io.StringIO(text[start:]))) if start >= 0 else []


def main(paths: list[str]) -> None:
    print("| model | path | kernel | launches | median µs | total µs per block |")
    print("|---|---|---|---|---|---|")
    for p in map(Path, paths):
        m = re.match(r"ncu-(.+)-(kernel|graph)\.csv", p.name)
        if not m:
            continue
        times = defaultdict(list)
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                value = float(row["Metric Value"].replace(",", ""))
                unit = row.get("Metric Unit", "nsecond")
                us = value / 1000 if unit.startswith("n") else value if unit.startswith("u") else value * 1000
                name = row["Kernel Name"].split("(")[0][:48]
                times[name].append(us)
        for name, t in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            t.sort()
            print(f"| {m[1]} | {m[2]} | {name} | {len(t)} | {t[len(t) // 2]:.2f} | "
                  f"{sum(t) / BLOCKS:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
