"""Which block shape, and what the norm + RoPE tail costs: device time of kernel variants.

Run under Nsight Compute (tools/device.sh parts); each variant is launched LAUNCHES times on one
layer's real shapes (4-bit, group 64, bf16) and checked bitwise against the graph path:

- ``w<W>r<R>``: W warps per block (one block per head), each warp loading R of its rows at once.
  The per-row arithmetic and its order do not depend on the shape, so every one must be bitwise
  equal to the graph path; the product's choice (``cuda_block_shape``) is marked.
- ``notail``: the product's shape without the norm + RoPE tail (every block returns after its
  projections): what the mat-vec alone costs.

    ncu --csv --metrics gpu__time_duration.sum -k regex:fusedqk python tools/probe_kernel_parts.py qwen3-8b
    python tools/probe_kernel_parts.py --summarize ncu-parts-*.csv
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from kernel_time import LAUNCHES, graph_block, layer_case  # tools/, beside this script
from ncu_summary import read, to_us

from fusedqk.kernels import qkv_norm_rope as k

TAIL = "  if (is_v) return;  // the whole block: v heads need no norm"
SHAPES = [(32, 1), (32, 2), (32, 4), (16, 1), (16, 2), (16, 4), (8, 1), (8, 2), (8, 4)]


def main(model: str) -> None:
    case = layer_case(model)
    lay = case.layout
    chosen = k.cuda_block_shape(lay)
    want = [np.array(o.astype(mx.float32)) for o in graph_block(case, 5)]
    pos = mx.array([5], mx.int32)
    args = (case.x, case.w, case.scales, case.biases, case.norm, case.norm, pos)
    variants = {f"w{w}r{r}": (w, r, k.CUDA_SOURCE) for w, r in SHAPES if lay.head_dim % (w * r) == 0}
    assert TAIL in k.CUDA_SOURCE
    variants["notail"] = (*chosen, k.CUDA_SOURCE.replace(TAIL, "  return;"))
    for name, (warps, rpw, source) in variants.items():
        kernel = k.QKVNormRope(lay, mx.bfloat16, "cuda", block_shape=(warps, rpw))
        header = k.cuda_header(lay.eps, math.log2(lay.rope_base), warps * 32)
        # The variant's own name: ncu tells variants apart by it.
        kernel.kernel = mx.fast.cuda_kernel(
            name=k.kernel_name(header + source, stem=name), input_names=k.INPUT_NAMES,
            output_names=k.OUTPUT_NAMES, source=source, header=header)
        for _ in range(LAUNCHES):
            out = kernel(*args)
            mx.eval(out)
        if name != "notail":
            same = all(np.array_equal(np.array(g.astype(mx.float32)), r)
                       for g, r in zip(out, want, strict=True))
            mark = " (cuda_block_shape's choice)" if (warps, rpw) == chosen else ""
            print(f"{model} {name}{mark}: bitwise equal to the graph path: {same}", file=sys.stderr)


def summarize(paths: list[str]) -> None:
    print("| model | variant | median µs (of LAUNCHES launches) |\n|---|---|---|")
    for p in map(Path, paths):
        model = re.match(r"ncu-parts-(.+)\.csv", p.name)[1]
        times: dict[str, list[float]] = {}
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                name = re.search(r"fusedqk_(w\d+r\d+|notail)", row["Kernel Name"])[1]
                times.setdefault(name, []).append(to_us(row["Metric Value"], row.get("Metric Unit", "ns")))
        for name, t in sorted(times.items()):
            print(f"| {model} | {name} | {statistics.median(t):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2:])
    else:
        main(sys.argv[1])
