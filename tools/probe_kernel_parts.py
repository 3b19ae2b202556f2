"""Where do the fused kernel's ~11-16 µs go? Device time of variants, for Nsight Compute.

Run under ncu (tools/device.sh parts); each variant is a separately named kernel, launched
LAUNCHES times on one layer's real shapes:

- ``rpw<N>``: the shipped kernel with N rows per warp (fewer rows per warp means more blocks and
  more warps in flight; the per-row arithmetic and its order do not change, so the outputs must
  stay bitwise equal, which this probe checks);
- ``notail``: the shipped RPW without the norm + RoPE tail (each block returns after writing its
  projections): what the mat-vec alone costs, and so what the tail costs;
- ``loadonly8`` / ``loadonly16``: the mat-vec's loads alone (session 7, below).

Measured and rejected variants, with their results in docs/perf-log.md: session 5's launch
bounds ``minb<N>`` (in this file up to commit 00f5475) and session 7's software pipeline
``pipe<N>`` (in commit 270da1e).

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


# The mat-vec's memory traffic alone (session 7): each warp loads one row's weights, scales and
# biases exactly as the kernel does (8 bytes of weights per lane per step), or with 16-byte
# loads (two steps' bytes per load), folds them into one number and writes it; no x, no
# dequantisation, no tail. How fast this runs says whether the kernel's access pattern or
# its arithmetic keeps the mat-vec (12.0 µs for 8b) from the copy bandwidth (~5.3 µs).
LOAD_ONLY = r"""
  constexpr int E = (BITS <= 4) ? 16 : 8;
  constexpr int PER_WARP = 32 * E;
  constexpr int STEPS = K / PER_WARP;
  constexpr int GROUPS = K / GS;
  constexpr int WIDE = LOAD_BYTES / 8;  // steps' bytes per load: 1 (uint2) or 2 (uint4)
  using Load = typename load_of<WIDE>::type;
  constexpr int NLOAD = STEPS / WIDE;
  auto warp = cg::tiled_partition<32>(cg::this_thread_block());
  const int lane = warp.thread_rank();
  const int row = blockIdx.x * 8 + warp.meta_group_rank();
  const Load* wrow = reinterpret_cast<const Load*>(w + (size_t)row * (K * BITS / 32));
  Load wv[NLOAD];
  T sc[NLOAD], bi[NLOAD];
  #pragma unroll
  for (int s = 0; s < NLOAD; ++s) {
    const int idx = (lane + s * 32) * E * WIDE;
    wv[s] = wrow[lane + s * 32];
    sc[s] = scales[(size_t)row * GROUPS + idx / GS];
    bi[s] = biases[(size_t)row * GROUPS + idx / GS];
  }
  float sum = 0.0f;
  #pragma unroll
  for (int s = 0; s < NLOAD; ++s) {
    const unsigned int* u = reinterpret_cast<const unsigned int*>(&wv[s]);
    unsigned int folded = 0;
    #pragma unroll
    for (int i = 0; i < 2 * WIDE; ++i) folded ^= u[i];
    sum += (float)folded + f32(sc[s]) + f32(bi[s]);
  }
  sum = cg::reduce(warp, sum, cg::plus<float>());
  if (lane == 0) proj[row % NQK] = from_f32<T>(sum);
"""


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
    load_types = ("template <int W> struct load_of { using type = uint2; };\n"
                  "template <> struct load_of<2> { using type = uint4; };\n")
    variants["loadonly8"] = (LOAD_ONLY, 1, load_types + "constexpr int LOAD_BYTES = 8;\n")
    if (lay.hidden // (32 * 16)) % 2 == 0:
        variants["loadonly16"] = (LOAD_ONLY, 1, variants["loadonly8"][2].replace("= 8;", "= 16;"))
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
        if name.startswith("rpw"):
            same = all(np.array_equal(a, b) for a, b in zip(o, ref, strict=True))
            print(f"{model} {name}: bitwise equal to rpw{shipped} (shipped): {same}", file=sys.stderr)


def summarize(paths: list[str]) -> None:
    print("| model | variant | median µs (of LAUNCHES launches) |\n|---|---|---|")
    for p in map(Path, paths):
        model = re.match(r"ncu-parts-(.+)\.csv", p.name)[1]
        times: dict[str, list[float]] = {}
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                name = re.search(r"fusedqk_(rpw\d|notail|loadonly\d+)", row["Kernel Name"])[1]
                times.setdefault(name, []).append(to_us(row["Metric Value"], row.get("Metric Unit", "ns")))
        for name, t in sorted(times.items()):
            print(f"| {model} | {name} | {statistics.median(t):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2:])
    else:
        main(sys.argv[1])
