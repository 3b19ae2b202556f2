"""Summarise Nsight Compute CSVs from tools/device.sh (one per model, tools/kernel_time.py under
ncu): the device time of one layer's block per path, and of each kernel in it.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from kernel_time import LAUNCHES  # run as tools/ncu_summary.py: tools/ is on sys.path


def read(path: Path) -> list[dict]:
    """ncu's CSV rows (after its log lines); a .gz file is read through gzip."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode(errors="replace")
    start = text.find('"ID"')
    return list(csv.DictReader(io.StringIO(text[start:]))) if start >= 0 else []


def to_us(value: str, unit: str) -> float:
    v = float(value.replace(",", ""))
    return {"nsecond": v / 1e3, "ns": v / 1e3, "usecond": v, "us": v, "msecond": v * 1e3}.get(unit, v)


def main(paths: list[str]) -> None:
    print("| model | path | kernel | launches per block | median µs each | µs per layer block |")
    print("|---|---|---|---|---|---|")
    for p in map(Path, paths):
        m = re.match(r"ncu-(.+)\.csv", p.name)
        times: dict[str, list[float]] = defaultdict(list)
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                times[row["Kernel Name"].split("(")[0]].append(
                    to_us(row["Metric Value"], row.get("Metric Unit", "ns")))
        blocks = {"kernel": 0.0, "graph": 0.0}
        for name, t in sorted(times.items()):
            path = "kernel" if "fusedqk" in name else "graph"
            per_block = len(t) // LAUNCHES
            med = statistics.median(t)
            blocks[path] += med * per_block
            short = "fusedqk_qkv_norm_rope" if path == "kernel" else name.split()[-1][:40]
            print(f"| {m[1]} | {path} | `{short}` | {per_block} | {med:.2f} | |")
        for path, total in blocks.items():
            print(f"| {m[1]} | {path} | **all** | | | **{total:.2f}** |")


if __name__ == "__main__":
    main(sys.argv[1:])
