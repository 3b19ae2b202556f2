"""Median of every Nsight Compute metric per kernel, from ncu --csv files: one table per file, a
column per kernel (the name up to its template arguments, shortened to its last part).

    python tools/ncu_metrics.py kv-ncu-all.csv kv-ncu-none.csv
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ncu_summary import read  # run as tools/ncu_metrics.py: tools/ is on sys.path


def short_name(kernel: str) -> str:
    """fusedqk's kernels differ only at the end of their names (``..._kv``): keep the end."""
    base = kernel.split("(")[0]
    return ("kernel_kv" if base.endswith("_kv") else "kernel") if "fusedqk" in base else base[-40:]


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        units: dict[str, str] = {}
        for row in read(path):
            try:
                value = float(row["Metric Value"].replace(",", ""))
            except (KeyError, ValueError):
                continue
            values[row["Metric Name"]][short_name(row["Kernel Name"])].append(value)
            units[row["Metric Name"]] = row.get("Metric Unit", "")
        kernels = sorted({k for per in values.values() for k in per})
        print(f"\n{path.name}\n")
        print("| metric | unit | " + " | ".join(f"{k} (median of n)" for k in kernels) + " |")
        print("|---|---|" + "---|" * len(kernels))
        for metric, per in sorted(values.items()):
            cells = [f"{statistics.median(per[k]):.4g} ({len(per[k])})" if per[k] else "—"
                     for k in kernels]
            print(f"| {metric} | {units[metric]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
