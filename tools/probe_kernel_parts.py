"""Where do the fused kernel's ~11-16 µs go? Device time of variants, for Nsight Compute.

Run under ncu (tools/device.sh parts); each variant is a separately named kernel, launched
LAUNCHES times on one layer's real shapes:

- ``rpw<N>``: the shipped kernel with N rows per warp (fewer rows per warp means more blocks and
  more warps in flight; the per-row arithmetic and its order do not change, so the outputs must
  stay bitwise equal, which this probe checks);
- ``notail``: the shipped RPW without the norm + RoPE tail (each block returns after writing its
  projections): what the mat-vec alone costs, and so what the tail costs;
- ``minb<N>``: the shipped kernel under a launch bound of N blocks per SM (the compiler then
  keeps to 65536 / (N * 256) registers; 8b compiles to 44 registers unbounded, 5 blocks per SM,
  768 blocks in 1.16 waves; at N = 6, 40 registers and one wave, no spill with local nvcc).

    ncu --csv --metrics gpu__time_duration.sum -k regex:fusedqk python tools/probe_kernel_parts.py qwen3-8b
    python tools/probe_kernel_parts.py --summarize ncu-parts-*.csv
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from kernel_time import LAUNCHES, layer_case  # tools/, beside this script
from ncu_summary import read, to_us

from fusedqk.kernels import qkv_norm_rope as k
from fusedqk.kernels.qkv_norm_rope import ROWS_PER_WARP, WARPS, new_counters

TAIL = "  if (row0 >= NQK) return;  // v heads need no norm: done"


def launch_bound(min_blocks: int) -> str:
    """A header tail that bounds the kernel to WARPS * 32 threads and ``min_blocks`` blocks per
    SM. MLX declares the kernel without ``__launch_bounds__``, but CUDA spells ``__global__`` as
    a macro, and NVRTC takes it redefined (session 5): the bound reaches the kernel below."""
    return ("#undef __global__\n#define __global__ __location__(global) "
            f"__launch_bounds__({WARPS * 32}, {min_blocks})\n")


def variant(name: str, source: str, header_tail: str = ""):
    header = (k.CUDA_HEADER + "constexpr float EPS = 1e-6f;\nconstexpr float LOG2_BASE = 19.931568f;\n"
              + header_tail)
    return mx.fast.cuda_kernel(
        name=f"fusedqk_{name}", input_names=["x", "w", "scales", "biases", "q_norm", "k_norm",
                                             "positions", "counters"],
        output_names=["q_out", "k_out", "v_out", "proj"], source=source, header=header)


def main(model: str) -> None:
    case = layer_case(model)
    lay = case.layout
    assert TAIL in k.CUDA_SOURCE
    shipped = ROWS_PER_WARP
    variants = {f"rpw{r}": (k.CUDA_SOURCE, r, "") for r in (1, 2, 4) if lay.head_dim % (WARPS * r) == 0}
    variants["notail"] = (k.CUDA_SOURCE.replace(TAIL, "  return;"), shipped, "")
    # Fewer registers, more resident blocks: qwen3-8b's 768 blocks fit one wave at 6 per SM
    # (measured in session 5: no gain, docs/perf-log.md).
    variants |= {f"minb{n}": (k.CUDA_SOURCE, shipped, launch_bound(n)) for n in (5, 6, 8)}
    h, kv, d = lay.n_heads, lay.n_kv_heads, lay.head_dim
    shapes = [(1, h, 1, d), (1, kv, 1, d), (1, kv, 1, d), (1, (h + kv) * d)]
    pos = mx.array([5], mx.int32)
    outs = {}
    for name, (source, rpw, header_tail) in variants.items():
        kernel, counters = variant(name, source, header_tail), new_counters(lay)
        template = [("T", mx.bfloat16), ("K", lay.hidden), ("H", h), ("KV", kv), ("D", d),
                    ("BITS", 4), ("GS", 64), ("NQK", (h + kv) * d), ("RPW", rpw)]
        for _ in range(LAUNCHES):
            out = kernel(inputs=[case.x, case.w, case.scales, case.biases, case.norm, case.norm,
                                 pos, counters], template=template,
                         grid=(lay.rows // (WARPS * rpw) * WARPS * 32, 1, 1),
                         threadgroup=(WARPS * 32, 1, 1), output_shapes=shapes,
                         output_dtypes=[mx.bfloat16] * 4)
            mx.eval(out)
        outs[name] = [np.array(o.astype(mx.float32)) for o in out[:3]]
    ref = outs[f"rpw{shipped}"]
    for name, o in outs.items():
        if name != "notail":
            same = all(np.array_equal(a, b) for a, b in zip(o, ref, strict=True))
            print(f"{model} {name}: bitwise equal to rpw{shipped} (shipped): {same}", file=sys.stderr)


def summarize(paths: list[str]) -> None:
    print("| model | variant | median µs (of LAUNCHES launches) |\n|---|---|---|")
    for p in map(Path, paths):
        model = re.match(r"ncu-parts-(.+)\.csv", p.name)[1]
        times: dict[str, list[float]] = {}
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                name = re.search(r"fusedqk_(rpw\d|notail|minb\d)", row["Kernel Name"])[1]
                times.setdefault(name, []).append(to_us(row["Metric Value"], row.get("Metric Unit", "ns")))
        for name, t in sorted(times.items()):
            print(f"| {model} | {name} | {statistics.median(t):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2:])
    else:
        main(sys.argv[1])
