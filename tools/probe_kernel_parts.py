"""Where do the fused kernel's ~11-16 µs go? Device time of variants, for Nsight Compute.

Run under ncu (tools/device.sh parts); each variant is a separately named kernel, launched
LAUNCHES times on one layer's real shapes:

- ``rpw<N>``: the shipped kernel with N rows per warp (fewer rows per warp means more blocks and
  more warps in flight; the per-row arithmetic and its order do not change, so the outputs must
  stay bitwise equal, which this probe checks);
- ``notail``: the shipped RPW without the norm + RoPE tail (each block returns after writing its
  projections): what the mat-vec alone costs, and so what the tail costs;
- ``pipe<N>``: N rows per warp, the next row's loads issued before the current row computes
  (session 7, below); bitwise checked like ``rpw<N>``;
- ``loadonly8`` / ``loadonly16``: the mat-vec's loads alone (session 7, below).

(Session 5's ``minb<N>`` launch-bound variants are in this file up to commit 00f5475.)

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


# A software pipeline (session 7): each warp takes RPW consecutive rows one after another and
# issues the next row's loads before it computes the current one, so a warp's loads stay in
# flight while it computes (the shipped kernel loads, computes, exits: an SM's warps all wait,
# then all compute). Each row's arithmetic and order are the shipped kernel's, so the outputs
# must be bitwise equal. The tail (last block of a head) is the shipped one.
PIPELINED_MATVEC = r"""
  constexpr int E = (BITS <= 4) ? 16 : 8;
  constexpr int PER_WARP = 32 * E;
  constexpr int STEPS = K / PER_WARP;
  constexpr int REST = K % PER_WARP;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS = K / GS;
  constexpr int ROWS_PER_BLOCK = 8 * RPW;
  constexpr int BLOCKS_PER_HEAD = D / ROWS_PER_BLOCK;
  constexpr int HALF = D / 2;
  constexpr int NSTEP = STEPS + (REST ? 1 : 0);

  __shared__ T head[D];
  __shared__ float shared_norm;
  __shared__ bool last_block;

  auto block = cg::this_thread_block();
  auto warp = cg::tiled_partition<32>(block);
  const int b = blockIdx.y;
  const int lane = warp.thread_rank();
  const int row0 = blockIdx.x * ROWS_PER_BLOCK;
  const T* xrow = x + (size_t)b * K;
  using T2 = typename pair_of<T>::type;

  struct RowLoads { uint2 wv[NSTEP]; T sc[NSTEP]; T bi[NSTEP]; };
  auto load_row = [&](int row, RowLoads& L) {
    const uint2* wrow = reinterpret_cast<const uint2*>(w + (size_t)row * WORDS_PER_ROW);
    #pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
      const int idx = (s < STEPS) ? lane * E + s * PER_WARP : lane * E + K - REST;
      if ((s < STEPS) || (idx < K)) {
        L.wv[s] = wrow[idx * BITS / 64];
        L.sc[s] = scales[(size_t)row * GROUPS + idx / GS];
        L.bi[s] = biases[(size_t)row * GROUPS + idx / GS];
      }
    }
  };
  // One row's dot product in the shipped kernel's order: per-slot partial sums over the steps,
  // the slots summed in fp32 in index order (the cross-lane reduce follows).
  auto row_sum = [&](const RowLoads& L) -> float {
    T2 acc2[E / 2];
    float accf[E];
    #pragma unroll
    for (int j = 0; j < E / 2; ++j) acc2[j] = pair_of<T>::zero();
    #pragma unroll
    for (int i = 0; i < E; ++i) accf[i] = 0.0f;
    #pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
      const int idx = (s < STEPS) ? lane * E + s * PER_WARP : lane * E + K - REST;
      if ((s < STEPS) || (idx < K)) {
        uint4 xv[E * sizeof(T) / 16];
        #pragma unroll
        for (int v = 0; v < E * (int)sizeof(T) / 16; ++v) {
          xv[v] = __ldg(reinterpret_cast<const uint4*>(xrow + idx) + v);
        }
        const T2* x2 = reinterpret_cast<const T2*>(xv);
        T2 xp[E / 2];
        #pragma unroll
        for (int k = 0; k < E / 8; ++k) {
          xp[4 * k + 0] = pair_of<T>::lows(x2[4 * k], x2[4 * k + 2]);
          xp[4 * k + 1] = pair_of<T>::highs(x2[4 * k], x2[4 * k + 2]);
          xp[4 * k + 2] = pair_of<T>::lows(x2[4 * k + 1], x2[4 * k + 3]);
          xp[4 * k + 3] = pair_of<T>::highs(x2[4 * k + 1], x2[4 * k + 3]);
        }
        const unsigned int words[2] = {L.wv[s].x, L.wv[s].y};
        if constexpr (BITS == 4) {
          const T2 scale2 = pair_of<T>::splat(L.sc[s]), bias2 = pair_of<T>::splat(L.bi[s]);
          const T2 magic2 = __hneg2(pair_of<T>::neg_magic());
          #pragma unroll
          for (int k = 0; k < E / 8; ++k) {
            #pragma unroll
            for (int m = 0; m < 4; ++m) {
              const unsigned int bits2 = ((words[k] >> (4 * m)) & 0x000F000Fu) | pair_of<T>::MAGIC_BITS;
              T2 code;
              memcpy(&code, &bits2, sizeof(code));
              const T2 wdq = __hadd2(__hmul2(__hsub2(code, magic2), scale2), bias2);
              acc2[4 * k + m] = __hfma2(xp[4 * k + m], wdq, acc2[4 * k + m]);
            }
          }
        } else {
          const T* xs = reinterpret_cast<const T*>(xv);
          #pragma unroll
          for (int i = 0; i < E; ++i) {
            const unsigned int q = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
            const T wdq = __hadd(__hmul(from_f32<T>((float)q), L.sc[s]), L.bi[s]);
            accf[i] = fmaf(f32(xs[i]), f32(wdq), accf[i]);
          }
        }
      }
    }
    float sum = 0.0f;
    #pragma unroll
    for (int i = 0; i < E && BITS == 4; ++i) {
      const T2 p = acc2[(i / 8) * 4 + i % 4];
      sum += f32((i % 8) < 4 ? pair_of<T>::lo(p) : pair_of<T>::hi(p));
    }
    #pragma unroll
    for (int i = 0; i < E && BITS != 4; ++i) sum += accf[i];
    return sum;
  };

  const int first_row = row0 + warp.meta_group_rank() * RPW;
  RowLoads cur, nxt;
  load_row(first_row, cur);
  #pragma unroll
  for (int r = 0; r < RPW; ++r) {
    if (r + 1 < RPW) load_row(first_row + r + 1, nxt);  // in flight while this row computes
    const float sum = cg::reduce(warp, row_sum(cur), cg::plus<float>());
    const int row = first_row + r;
    if (lane == 0) {
      const T val = from_f32<T>(sum);
      if (row >= NQK) {
        v_out[(size_t)b * KV * D + row - NQK] = val;
      } else {
        proj[(size_t)b * NQK + row] = val;
      }
    }
    if (r + 1 < RPW) cur = nxt;
  }
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
    pipelined = PIPELINED_MATVEC + k.CUDA_SOURCE[k.CUDA_SOURCE.index(TAIL):]
    variants |= {f"pipe{r}": (pipelined, r, "") for r in (2, 4, 8) if lay.head_dim % (WARPS * r) == 0}
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
        if name.startswith(("rpw", "pipe")):
            same = all(np.array_equal(a, b) for a, b in zip(o, ref, strict=True))
            print(f"{model} {name}: bitwise equal to rpw{shipped} (shipped): {same}", file=sys.stderr)


def summarize(paths: list[str]) -> None:
    print("| model | variant | median µs (of LAUNCHES launches) |\n|---|---|---|")
    for p in map(Path, paths):
        model = re.match(r"ncu-parts-(.+)\.csv", p.name)[1]
        times: dict[str, list[float]] = {}
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                name = re.search(r"fusedqk_(rpw\d|pipe\d|notail|loadonly\d+)", row["Kernel Name"])[1]
                times.setdefault(name, []).append(to_us(row["Metric Value"], row.get("Metric Unit", "ns")))
        for name, t in sorted(times.items()):
            print(f"| {model} | {name} | {statistics.median(t):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2:])
    else:
        main(sys.argv[1])
