"""Which formulation of RMSNorm and RoPE is bitwise MLX's on this CUDA build? (device tool)

The fused kernel must round exactly as mx.fast.rms_norm and mx.fast.rope do. This probe runs
small one-purpose kernels in each candidate formulation against MLX's own ops on random inputs
and prints the fraction of bitwise-equal elements per variant. Used once per MLX version; the
result is recorded in docs/perf-log.md and fixed in fusedqk/kernels/qkv_norm_rope.py.
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np

HEADER = r"""
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;
"""

NORM = r"""
  // one block of 32 threads per row of D; lane t reads NR contiguous elements
  auto warp = cg::tiled_partition<32>(cg::this_thread_block());
  const int row = blockIdx.x;
  const int lane = threadIdx.x;
  const T* xr = x + row * D;
  float part = 0.0f;
  for (int j = 0; j < NR; ++j) {
    int i = lane * NR + j;
    if (i < D) { float t = (float)xr[i]; part += t * t; }
  }
  part = cg::reduce(warp, part, cg::plus<float>());
  float normalizer = rsqrt(part / (float)D + 1e-6f);
  for (int i = lane; i < D; i += 32) {
    out[row * D + i] = __hmul(w[i], (T)((float)xr[i] * normalizer));
  }
"""

ROPE = r"""
  const int row = blockIdx.x;
  const int i = threadIdx.x;  // pair index < D/2
  const float d = (float)i / (float)(D / 2);
  const float inv_freq = exp2f(-d * log2base[0]);
  const float theta = (1.0f * (float)pos[0]) * inv_freq;
  const float c = FAST ? __cosf(theta) : cosf(theta);
  const float s = FAST ? __sinf(theta) : sinf(theta);
  const float x1 = (float)x[row * D + i], x2 = (float)x[row * D + i + D / 2];
  float r1, r2;
  if (CONTRACT == 0) { r1 = x1 * c - x2 * s; r2 = x1 * s + x2 * c; }
  if (CONTRACT == 1) { r1 = fmaf(x1, c, -(x2 * s)); r2 = fmaf(x1, s, x2 * c); }
  if (CONTRACT == 2) { r1 = fmaf(-x2, s, x1 * c); r2 = fmaf(x2, c, x1 * s); }
  out[row * D + i] = (T)r1;
  out[row * D + i + D / 2] = (T)r2;
"""


def equal_fraction(a: mx.array, b: mx.array) -> float:
    return float(np.mean(np.array(a.view(mx.int16)) == np.array(b.view(mx.int16))))


def main() -> None:
    norm_k = mx.fast.cuda_kernel("probe_norm", ["x", "w"], ["out"], NORM, HEADER)
    rope_k = mx.fast.cuda_kernel("probe_rope", ["x", "log2base", "pos"], ["out"], ROPE, HEADER)
    rows, d = 64, 128
    print("| probe | dtype | variant | bitwise equal |")
    print("|---|---|---|---|")
    for dtype in (mx.bfloat16, mx.float16):
        x = (mx.random.normal((rows, d)) * 3).astype(dtype)
        w = mx.random.uniform(0.5, 1.5, (d,)).astype(dtype)
        want = mx.fast.rms_norm(x, w, 1e-6)
        for nr in (8, 4):
            got = norm_k(inputs=[x, w], template=[("T", dtype), ("D", d), ("NR", nr)],
                         grid=(rows * 32, 1, 1), threadgroup=(32, 1, 1),
                         output_shapes=[x.shape], output_dtypes=[dtype])[0]
            print(f"| rms_norm | {dtype} | {nr} elements per lane | {equal_fraction(got, want):.4f} |")
        for pos, fast, contract in itertools.product((7, 3000, 40000), (0, 1), (0, 1, 2)):
            want = mx.fast.rope(x.reshape(1, rows, 1, d), d, traditional=False, base=1e6,
                                scale=1.0, offset=pos).reshape(rows, d)
            got = rope_k(inputs=[x, mx.array([math.log2(1e6)], mx.float32),
                                 mx.array([pos], mx.int32)],
                         template=[("T", dtype), ("D", d), ("FAST", fast), ("CONTRACT", contract)],
                         grid=(rows * d // 2, 1, 1), threadgroup=(d // 2, 1, 1),
                         output_shapes=[x.shape], output_dtypes=[dtype])[0]
            print(f"| rope | {dtype} | pos {pos} fast_trig={fast} contract={contract} | "
                  f"{equal_fraction(got, want):.4f} |")


if __name__ == "__main__":
    main()
