"""One-launch decode kernel: QKV projection + per-head RMSNorm of q and k + RoPE (NeoX pairing).

What is fused, for one decode step (one token per sequence, batch B):

    qkv = x @ dequant(W_qkv)^T            # affine-quantized, bits 4 or 8, group 32/64/128
    q, k, v = split(qkv)                   # (B, H*D), (B, KV*D), (B, KV*D)
    q = rope(rms_norm(q per head, q_norm)) # written as (B, H, 1, D)
    k = rope(rms_norm(k per head, k_norm)) # written as (B, KV, 1, D)
    v = v                                  # written as (B, KV, 1, D)

Design (CUDA): blocks of 8 warps; each warp computes ``RPW`` output rows (1: more warps in
flight beat more loads per warp, measured on the H100), each row with MLX's
own quantized mat-vec lane layout and accumulation order (lane t of step r takes the E contiguous
elements at t*E + r*32*E; partial sums in the activation dtype for 4-bit, fp32 for 8-bit; lanes
summed in fp32 by ``cg::reduce``), so the projection is bitwise the graph path's. All loads of a
row are issued before the first multiply, for memory-level parallelism. A head spans several
blocks: v rows are written straight out; q/k rows go to a scratch output, and the last block to
finish a head (a per-layer atomic counter, reset by that block) applies RMSNorm and RoPE to the
head, again in MLX's order. One launch per layer per step; positions are an input array, so a
new position never recompiles and the launch fits MLX's CUDA graphs.

The Metal twin has the same contract and rounding points; it gives each head one threadgroup
(Metal has no portable device-scope fence for a last-threadgroup pattern). It has not been run
on a Mac yet: see docs/kernels.md.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from fusedqk.errors import UserError
from fusedqk.kernels import cuda_ext
from fusedqk.toggle import ENV_KERNEL_CALL, parse_kernel_call

WARPS = 8
# Rows per warp. One row per warp (more blocks, more warps in flight) beat 2 and 4 on every seed
# model on the H100 (tools/probe_kernel_parts.py, docs/perf-log.md), bitwise the same.
ROWS_PER_WARP = 1
MAX_BATCH = 8
HEAD_DIMS = (64, 128, 256)
MAX_HIDDEN = 16384  # x is staged in shared memory (2 bytes each)


@dataclass(frozen=True)
class QKVLayout:
    """Everything about one attention layer that the fused call needs besides its arrays."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    bits: int
    group_size: int
    rope_base: float

    @property
    def rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


# --- the plain-ops references ------------------------------------------------------------------

def reference_block(x: mx.array, ws, norms, layout: QKVLayout, offset: int):
    """The graph path's ops, as mlx-lm runs them: three quantized mat-vecs over the separate
    q/k/v weights ``ws`` ((weight, scales, biases) each), two ``fast.rms_norm``, two
    ``fast.rope``. The kernel must match it bit for bit (tests/test_kernel_gpu.py)."""
    b = x.shape[0]
    outs = []
    for (w, s, bias), heads in zip(ws, (layout.n_heads, layout.n_kv_heads, layout.n_kv_heads),
                                   strict=True):
        y = mx.quantized_matmul(x, w, s, bias, transpose=True, group_size=layout.group_size,
                                bits=layout.bits)
        outs.append(y.reshape(b, 1, heads, layout.head_dim))
    q, k, v = outs
    q = mx.fast.rms_norm(q, norms[0], layout.eps).transpose(0, 2, 1, 3)
    k = mx.fast.rms_norm(k, norms[1], layout.eps).transpose(0, 2, 1, 3)
    rope = dict(dims=layout.head_dim, traditional=False, base=layout.rope_base, scale=1.0,
                offset=offset)
    return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v.transpose(0, 2, 1, 3)


@functools.cache
def composite(layout: QKVLayout):
    """The same ops over the concatenated QKV weight, under one ``mx.compile`` (compiled once per
    layout): fewer Python → C++ crossings, the same GPU work and rounding as the graph path."""
    h, kv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim

    def qkv_norm_rope_composite(x, w, scales, biases, q_norm, k_norm, offset):
        b = x.shape[0]
        qkv = mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                  group_size=layout.group_size, bits=layout.bits)
        q, k, v = mx.split(qkv, [h * d, (h + kv) * d], axis=-1)
        q = mx.fast.rms_norm(q.reshape(b, 1, h, d), q_norm, layout.eps).transpose(0, 2, 1, 3)
        k = mx.fast.rms_norm(k.reshape(b, 1, kv, d), k_norm, layout.eps).transpose(0, 2, 1, 3)
        v = v.reshape(b, 1, kv, d).transpose(0, 2, 1, 3)
        rope = functools.partial(mx.fast.rope, dims=d, traditional=False,
                                 base=layout.rope_base, scale=1.0, offset=offset)
        return rope(q), rope(k), v

    return mx.compile(qkv_norm_rope_composite)


# --- the kernel ----------------------------------------------------------------------------------

CUDA_HEADER = r"""
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;

__device__ __forceinline__ float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32(float v) { return __float2half(v); }
template <typename T> struct pair_of;
template <> struct pair_of<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr unsigned int MAGIC_BITS = 0x43004300u;  // (128.0, 128.0)
  __device__ static type neg_magic() { return __floats2bfloat162_rn(-128.0f, -128.0f); }
  __device__ static type lows(type a, type b) { return __lows2bfloat162(a, b); }
  __device__ static type highs(type a, type b) { return __highs2bfloat162(a, b); }
  __device__ static type zero() { return __floats2bfloat162_rn(0.0f, 0.0f); }
  __device__ static type splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  __device__ static __nv_bfloat16 lo(type v) { return __low2bfloat16(v); }
  __device__ static __nv_bfloat16 hi(type v) { return __high2bfloat16(v); }
};
template <> struct pair_of<__half> {
  using type = __half2;
  static constexpr unsigned int MAGIC_BITS = 0x64006400u;  // (1024.0, 1024.0)
  __device__ static type neg_magic() { return __floats2half2_rn(-1024.0f, -1024.0f); }
  __device__ static type lows(type a, type b) { return __lows2half2(a, b); }
  __device__ static type highs(type a, type b) { return __highs2half2(a, b); }
  __device__ static type zero() { return __floats2half2_rn(0.0f, 0.0f); }
  __device__ static type splat(__half v) { return __half2half2(v); }
  __device__ static __half lo(type v) { return __low2half(v); }
  __device__ static __half hi(type v) { return __high2half(v); }
};
"""

# Template constants: T, K (hidden), H, KV, D, BITS, GS, RPW (rows per warp), NQK (q+k rows).
# Inputs: x (B,1,K), w (N, K*BITS/32) uint32, scales/biases (N, K/GS), q_norm/k_norm (D),
# positions (B,) int32, counters (MAX_BATCH * (H+KV)) uint32, persistent, zero.
CUDA_SOURCE = r"""
  constexpr int E = (BITS <= 4) ? 16 : 8;          // elements per lane per step (MLX qmv)
  constexpr int PER_WARP = 32 * E;
  constexpr int STEPS = K / PER_WARP;
  constexpr int REST = K % PER_WARP;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS = K / GS;
  constexpr int ROWS_PER_BLOCK = 8 * RPW;
  constexpr int BLOCKS_PER_HEAD = D / ROWS_PER_BLOCK;
  constexpr int HALF = D / 2;

  __shared__ T head[D];
  __shared__ float shared_norm;
  __shared__ bool last_block;

  auto block = cg::this_thread_block();
  auto warp = cg::tiled_partition<32>(block);
  const int b = blockIdx.y;
  const int lane = warp.thread_rank();
  const int row0 = blockIdx.x * ROWS_PER_BLOCK;

  const T* xrow = x + (size_t)b * K;

  // Issue every weight, scale and bias load of this warp's rows before any arithmetic.
  constexpr int NSTEP = STEPS + (REST ? 1 : 0);
  uint2 wv[RPW][NSTEP];
  T sc[RPW][NSTEP], bi[RPW][NSTEP];
  #pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + warp.meta_group_rank() * RPW + r;
    const uint2* wrow = reinterpret_cast<const uint2*>(w + (size_t)row * WORDS_PER_ROW);
    #pragma unroll
    for (int s = 0; s < NSTEP; ++s) {
      int idx = (s < STEPS) ? lane * E + s * PER_WARP : lane * E + K - REST;
      bool live = (s < STEPS) || (idx < K);
      if (live) {
        wv[r][s] = wrow[idx * BITS / 64];
        sc[r][s] = scales[(size_t)row * GROUPS + idx / GS];
        bi[r][s] = biases[(size_t)row * GROUPS + idx / GS];
      }
    }
  }

  // Per-lane partial sums, one per element slot as MLX keeps them: pairs of the activation
  // dtype for 4-bit (each half rounds exactly as a scalar op would), fp32 for 8-bit.
  using T2 = typename pair_of<T>::type;
  T2 acc2[RPW][E / 2];
  float accf[RPW][E];
  #pragma unroll
  for (int r = 0; r < RPW; ++r) {
    #pragma unroll
    for (int j = 0; j < E / 2; ++j) acc2[r][j] = pair_of<T>::zero();
    #pragma unroll
    for (int i = 0; i < E; ++i) accf[r][i] = 0.0f;
  }
  #pragma unroll
  for (int s = 0; s < NSTEP; ++s) {
    const int idx = (s < STEPS) ? lane * E + s * PER_WARP : lane * E + K - REST;
    if ((s < STEPS) || (idx < K)) {
      // This lane's E activations for the step: 16-byte loads, shared by all RPW rows.
      uint4 xv[E * sizeof(T) / 16];
      #pragma unroll
      for (int v = 0; v < E * (int)sizeof(T) / 16; ++v) {
        xv[v] = __ldg(reinterpret_cast<const uint4*>(xrow + idx) + v);
      }
      const T2* x2 = reinterpret_cast<const T2*>(xv);
      // 4-bit: each 32-bit word holds elements 8k..8k+7 as nibbles; one LOP3 extracts nibbles m
      // and m+4, so pair m of word k is elements (8k+m, 8k+m+4): arrange x the same way.
      T2 xp[E / 2];
      #pragma unroll
      for (int k = 0; k < E / 8; ++k) {
        xp[4 * k + 0] = pair_of<T>::lows(x2[4 * k], x2[4 * k + 2]);
        xp[4 * k + 1] = pair_of<T>::highs(x2[4 * k], x2[4 * k + 2]);
        xp[4 * k + 2] = pair_of<T>::lows(x2[4 * k + 1], x2[4 * k + 3]);
        xp[4 * k + 3] = pair_of<T>::highs(x2[4 * k + 1], x2[4 * k + 3]);
      }
      #pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const unsigned int words[2] = {wv[r][s].x, wv[r][s].y};
        if constexpr (BITS == 4) {
          const T2 scale2 = pair_of<T>::splat(sc[r][s]), bias2 = pair_of<T>::splat(bi[r][s]);
          // (Measured on an H100: fma(MAGIC + q, scale, -MAGIC * scale) is NOT bitwise
          // round(q * scale), so the code is made exact first and then multiplied, as MLX does.)
          const T2 magic2 = __hneg2(pair_of<T>::neg_magic());
          #pragma unroll
          for (int k = 0; k < E / 8; ++k) {
            #pragma unroll
            for (int m = 0; m < 4; ++m) {
              const unsigned int bits2 = ((words[k] >> (4 * m)) & 0x000F000Fu) | pair_of<T>::MAGIC_BITS;
              T2 code;
              memcpy(&code, &bits2, sizeof(code));  // a bit cast (no aliasing through pointers)
              // Dequantize in the activation dtype: round(round(q * scale) + bias).
              const T2 wdq = __hadd2(__hmul2(__hsub2(code, magic2), scale2), bias2);
              acc2[r][4 * k + m] = __hfma2(xp[4 * k + m], wdq, acc2[r][4 * k + m]);
            }
          }
        } else {
          const T* xs = reinterpret_cast<const T*>(xv);
          #pragma unroll
          for (int i = 0; i < E; ++i) {
            const unsigned int q = (words[i / 4] >> (8 * (i % 4))) & 0xFFu;
            const T wdq = __hadd(__hmul(from_f32<T>((float)q), sc[r][s]), bi[r][s]);
            accf[r][i] = fmaf(f32(xs[i]), f32(wdq), accf[r][i]);
          }
        }
      }
    }
  }

  #pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + warp.meta_group_rank() * RPW + r;
    // The lane's slots summed in fp32 in index order, then across lanes (MLX's order).
    float sum = 0.0f;
    #pragma unroll
    for (int i = 0; i < E && BITS == 4; ++i) {  // element i sits in pair (i/8)*4 + i%4
      const T2 p = acc2[r][(i / 8) * 4 + i % 4];
      sum += f32((i % 8) < 4 ? pair_of<T>::lo(p) : pair_of<T>::hi(p));
    }
    #pragma unroll
    for (int i = 0; i < E && BITS != 4; ++i) sum += accf[r][i];
    sum = cg::reduce(warp, sum, cg::plus<float>());
    if (lane == 0) {
      const T val = from_f32<T>(sum);
      if (row >= NQK) {
        const int vrow = row - NQK;
        v_out[(size_t)b * KV * D + vrow] = val;
      } else {
        proj[(size_t)b * NQK + row] = val;
      }
    }
  }
  if (row0 >= NQK) return;  // v heads need no norm: done

  // The last block to finish a q/k head normalises and rotates it.
  const int head_id = row0 / D;
  unsigned int* counter = const_cast<unsigned int*>(counters) + b * (H + KV) + head_id;
  block.sync();
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned int done = atomicAdd(counter, 1u);
    last_block = (done == BLOCKS_PER_HEAD - 1);
  }
  block.sync();
  if (!last_block) return;
  __threadfence();

  const T* src = proj + (size_t)b * NQK + (size_t)head_id * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) head[i] = __ldcg(src + i);
  block.sync();

  // RMSNorm as MLX's rms_norm_small: thread t sums the squares of 8 contiguous elements
  // (16 bytes) in fp32, then one cooperative-groups reduce (the other warps hold zeros).
  if (warp.meta_group_rank() == 0) {
    constexpr int NR = 16 / sizeof(T);
    float part = 0.0f;
    if (lane * NR < D) {
      #pragma unroll
      for (int j = 0; j < NR; ++j) {
        float t = f32(head[lane * NR + j]);
        part += t * t;
      }
    }
    part = cg::reduce(warp, part, cg::plus<float>());
    if (lane == 0) shared_norm = rsqrt(part / (float)D + EPS);
  }
  block.sync();

  const bool is_q = head_id < H;
  const T* gamma = is_q ? q_norm : k_norm;
  const int pos = positions[b];
  for (int i = threadIdx.x; i < HALF; i += blockDim.x) {
    const float normalizer = shared_norm;
    const T n1 = __hmul(gamma[i], from_f32<T>(f32(head[i]) * normalizer));
    const T n2 = __hmul(gamma[i + HALF], from_f32<T>(f32(head[i + HALF]) * normalizer));
    // RoPE as MLX's rope kernel: inv_freq = exp2(-d * log2(base)), theta in fp32.
    const float d = static_cast<float>(i) / static_cast<float>(HALF);
    const float inv_freq = exp2f(-d * LOG2_BASE);
    const float L = 1.0f * static_cast<float>(pos);
    const float theta = L * inv_freq;
    const float c = cosf(theta);
    const float s = sinf(theta);
    const float x1 = f32(n1);
    const float x2 = f32(n2);
    const float rx1 = x1 * c - x2 * s;
    const float rx2 = x1 * s + x2 * c;
    T* dst = is_q ? q_out + ((size_t)b * H + head_id) * D
                  : k_out + ((size_t)b * KV + (head_id - H)) * D;
    dst[i] = from_f32<T>(rx1);
    dst[i + HALF] = from_f32<T>(rx2);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch
"""

METAL_SOURCE = r"""
  // One threadgroup per (head, sequence); simdgroup g computes rows g, g+NSG, ... of the head.
  constexpr int E = (BITS <= 4) ? 16 : 8;
  constexpr int PER_SIMD = 32 * E;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS = K / GS;
  constexpr int HALF = D / 2;
  constexpr int NSG = 8;

  threadgroup T head[D];
  threadgroup float partial[NSG];

  const uint b = threadgroup_position_in_grid.y;
  const uint head_id = threadgroup_position_in_grid.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const device T* xb = x + b * K;

  for (uint r = sg; r < D; r += NSG) {
    const uint row = head_id * D + r;
    const device uint8_t* wrow = (const device uint8_t*)(w + row * WORDS_PER_ROW);
    float sum = 0.0f;
    for (uint idx = lane * E; idx < K; idx += PER_SIMD) {
      const T scale = scales[row * GROUPS + idx / GS];
      const T bias = biases[row * GROUPS + idx / GS];
      for (uint i = 0; i < E; ++i) {
        const uint bit = (idx + i) * BITS;
        const uint q = (wrow[bit / 8] >> (bit % 8)) & ((1u << BITS) - 1u);
        const T wdq = T(q) * scale + bias;
        sum += float(xb[idx + i]) * float(wdq);
      }
    }
    sum = simd_sum(sum);
    if (lane == 0) {
      const T val = T(sum);
      if (row >= NQK) {
        v_out[b * KV * D + (row - NQK)] = val;
      } else {
        head[r] = val;
      }
    }
  }
  if (head_id * D >= NQK) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);

  float part = 0.0f;
  for (uint i = thread_index_in_threadgroup; i < D; i += NSG * 32) {
    const float t = float(head[i]);
    part += t * t;
  }
  part = simd_sum(part);
  if (lane == 0) partial[sg] = part;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint g = 0; g < NSG; ++g) total += partial[g];
  const float normalizer = metal::precise::rsqrt(total / float(D) + EPS);

  const bool is_q = head_id < H;
  const device T* gamma = is_q ? q_norm : k_norm;
  const int pos = positions[b];
  for (uint i = thread_index_in_threadgroup; i < HALF; i += NSG * 32) {
    const T n1 = gamma[i] * T(float(head[i]) * normalizer);
    const T n2 = gamma[i + HALF] * T(float(head[i + HALF]) * normalizer);
    const float d = float(i) / float(HALF);
    const float theta = float(pos) * metal::exp2(-d * LOG2_BASE);
    const float c = metal::precise::cos(theta);
    const float s = metal::precise::sin(theta);
    const float x1 = float(n1), x2 = float(n2);
    device T* dst = is_q ? q_out + (b * H + head_id) * D : k_out + (b * KV + head_id - H) * D;
    dst[i] = T(x1 * c - x2 * s);
    dst[i + HALF] = T(x1 * s + x2 * c);
  }
"""


def has_kernel(backend: str) -> bool:
    return backend in ("cuda", "metal")


def kernel_blocker(backend: str, layout: QKVLayout, dtype: mx.Dtype) -> str | None:
    """Why the kernel cannot run this layer here (then ``composite`` runs), or None."""
    if not has_kernel(backend):
        return f"no fused kernel for backend {backend} (kernels exist for cuda and metal)"
    if dtype not in (mx.bfloat16, mx.float16):
        return f"activation dtype {dtype} (the kernel takes bfloat16 or float16)"
    if layout.head_dim not in HEAD_DIMS:
        return f"head_dim {layout.head_dim} (the kernel takes {HEAD_DIMS})"
    if layout.bits not in (4, 8) or layout.group_size not in (32, 64, 128):
        return f"{layout.bits}-bit group {layout.group_size} (the kernel takes 4/8-bit, 32/64/128)"
    if layout.hidden % 16 or layout.hidden > MAX_HIDDEN:
        return f"hidden size {layout.hidden} (a multiple of 16 up to {MAX_HIDDEN})"
    return None


def _float_literal(value: float) -> str:
    """The float32 nearest ``value`` as an exact C++ hex literal."""
    return float(np.float32(value)).hex() + "f"


def _kernel_name(eps: float, log2_base: float, launch_only: bool) -> str:
    kind = "launch_only" if launch_only else "qkv_norm_rope"
    return f"fusedqk_{kind}_{abs(hash((eps, log2_base))):x}"


CUDA_INPUTS = ("x", "w", "scales", "biases", "q_norm", "k_norm", "positions", "counters")
CUDA_OUTPUTS = ("q_out", "k_out", "v_out", "proj")
CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}
DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16"}


def _cuda_header(eps: float, log2_base: float) -> str:
    return CUDA_HEADER + (f"constexpr float EPS = {_float_literal(eps)};\n"
                          f"constexpr float LOG2_BASE = {_float_literal(log2_base)};\n")


@functools.cache
def _cuda_kernel(eps: float, log2_base: float, launch_only: bool):
    return mx.fast.cuda_kernel(
        name=_kernel_name(eps, log2_base, launch_only),
        input_names=list(CUDA_INPUTS),
        output_names=list(CUDA_OUTPUTS),
        source="" if launch_only else CUDA_SOURCE,
        header=_cuda_header(eps, log2_base),
    )


def primitive_source(layout: QKVLayout, dtype: mx.Dtype, template: list[tuple[str, object]],
                     launch_only: bool = False) -> tuple[str, str]:
    """(name expression, source) of the kernel for the C++ primitive: the translation unit that
    ``mx.fast.cuda_kernel`` assembles for the same kernel (header, then the kernel in namespace
    ``mlx::core::cu`` with the inputs' and outputs' pointers as parameters and the template
    constants at the top of the body), so both callers compile the same code, once per layout."""
    t = CUDA_TYPES[dtype]
    types = {"w": "unsigned int", "positions": "int", "counters": "unsigned int"}
    params = [f"const {types.get(n, t)}* {n}" for n in CUDA_INPUTS]
    params += [f"{t}* {n}" for n in CUDA_OUTPUTS]
    consts = "".join(f"  using {k} = {t};\n" if k == "T" else f"  constexpr int {k} = {v};\n"
                     for k, v in template)
    log2_base = math.log2(layout.rope_base)
    shape = "_".join(str(v) for k, v in template if k != "T")
    name = f"{_kernel_name(layout.eps, log2_base, launch_only)}_{DTYPE_NAMES[dtype]}_{shape}"
    source = ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
              + _cuda_header(layout.eps, log2_base)
              + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
              + f"__global__ void {name}(\n    " + ",\n    ".join(params) + ") {\n" + consts
              + "\n" + ("" if launch_only else CUDA_SOURCE) + "\n}\n\n} // namespace mlx::core::cu\n")
    return f"mlx::core::cu::{name}", source


def kernel_call(env: dict[str, str] | None = None) -> tuple[str, str]:
    """How the CUDA kernel is called here, and why: ``primitive`` (the C++ extension, when it is
    built and loads) or ``cuda_kernel`` (``mx.fast.cuda_kernel``), from FUSEDQK_KERNEL_CALL."""
    env = os.environ if env is None else env
    wanted = parse_kernel_call(env.get(ENV_KERNEL_CALL, "auto"))
    if wanted == "cuda_kernel":
        return "cuda_kernel", f"{ENV_KERNEL_CALL}=cuda_kernel"
    module, why = cuda_ext.load()
    if module is not None:
        return "primitive", f"the C++ extension loads ({why})"
    if wanted == "primitive":
        raise UserError(f"{ENV_KERNEL_CALL}=primitive: the extension is unavailable: {why}")
    return "cuda_kernel", f"the C++ extension is unavailable: {why}"


@functools.cache
def _metal_kernel(eps: float, log2_base: float, launch_only: bool):
    header = (f"constant constexpr float EPS = {_float_literal(eps)};\n"
              f"constant constexpr float LOG2_BASE = {_float_literal(log2_base)};\n")
    return mx.fast.metal_kernel(
        name=_kernel_name(eps, log2_base, launch_only),
        input_names=["x", "w", "scales", "biases", "q_norm", "k_norm", "positions"],
        output_names=["q_out", "k_out", "v_out"],
        source="" if launch_only else METAL_SOURCE,
        header=header,
    )


def decode_call(kernel: QKVNormRope):
    """How a decode step calls one layer's kernel. Under mx.compile a call replays its traced
    graph instead of building the custom kernel's primitive again: 7-15% off the kernel block on
    the H100, same bits (docs/perf-log.md). The C++ primitive is built once already: direct."""
    return kernel if kernel.call == "primitive" else mx.compile(kernel.__call__)


def new_counters(layout: QKVLayout) -> mx.array:
    """Zeroed per-head counters for the last-block pattern. Each launch leaves them at zero, so
    one array serves every step of one layer; two launches that may run concurrently (MLX's CUDA
    graphs run independent nodes side by side) must not share one, hence one array per layer."""
    counters = mx.zeros((MAX_BATCH * (layout.n_heads + layout.n_kv_heads),), dtype=mx.uint32)
    mx.eval(counters)
    return counters


class QKVNormRope:
    """The kernel for one layer layout and activation dtype, with every per-call argument that
    does not depend on the batch size computed once (a decode step calls it once per layer).

    ``launch_only`` gives the same launch (inputs, outputs, grid, block) with an empty body: what
    one launch per layer costs on this machine whatever the kernel does, the launch floor that
    ``fusedqk blockbench`` reports beside the kernel.
    """

    def __init__(self, layout: QKVLayout, dtype: mx.Dtype, backend: str,
                 launch_only: bool = False, call: str | None = None):
        h, kv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim
        self.layout, self.dtype, self.cuda = layout, dtype, backend == "cuda"
        template = [("T", dtype), ("K", layout.hidden), ("H", h), ("KV", kv), ("D", d),
                    ("BITS", layout.bits), ("GS", layout.group_size), ("NQK", (h + kv) * d)]
        log2_base = math.log2(layout.rope_base)
        self.call, self._primitive, self._poisoned = "metal_kernel", None, None
        if self.cuda:
            self.kernel = _cuda_kernel(layout.eps, log2_base, launch_only)
            self.template = [*template, ("RPW", ROWS_PER_WARP)]
            self.grid_x = layout.rows // (WARPS * ROWS_PER_WARP) * WARPS * 32
            self.threads = WARPS * 32
            self.n_outputs = 4
            self.call = call or kernel_call()[0]
            if self.call == "primitive":
                self._primitive_args = self._primitive_spec(launch_only)
                self._primitive = cuda_ext.require().Kernel(*self._primitive_args)
        else:
            self.kernel = _metal_kernel(layout.eps, log2_base, launch_only)
            self.template = template
            self.grid_x, self.threads = (h + 2 * kv) * 256, 256
            self.n_outputs = 3
        self._shapes: dict[int, list[tuple[int, ...]]] = {}

    def _primitive_spec(self, launch_only: bool) -> tuple:
        """The extension Kernel's arguments: name, source, grid x in blocks, threads per block,
        the largest batch, the output shapes after the batch axis, the dtype."""
        h, kv, d = self.layout.n_heads, self.layout.n_kv_heads, self.layout.head_dim
        name, source = primitive_source(self.layout, self.dtype, self.template, launch_only)
        tails = [[h, 1, d], [kv, 1, d], [kv, 1, d], [(h + kv) * d]]
        return (name, source, self.grid_x // self.threads, self.threads, MAX_BATCH, tails,
                DTYPE_NAMES[self.dtype])

    def _out_shapes(self, b: int) -> list[tuple[int, ...]]:
        if b not in self._shapes:
            h, kv, d = self.layout.n_heads, self.layout.n_kv_heads, self.layout.head_dim
            self._shapes[b] = [(b, h, 1, d), (b, kv, 1, d), (b, kv, 1, d), (b, (h + kv) * d)]
        return self._shapes[b][: self.n_outputs]

    def __call__(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                 q_norm: mx.array, k_norm: mx.array, positions: mx.array, counters: mx.array,
                 poison: bool = False) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, H, 1, D), k and v (B, KV, 1, D) for x (B, 1, K) at ``positions`` (B,) int32.

        ``counters`` comes from ``new_counters`` (the Metal version needs none). ``poison`` fills
        the outputs with NaN before the launch (tests use it to catch unwritten elements).
        """
        b = x.shape[0]
        if b > MAX_BATCH:
            raise ValueError(f"the fused kernel takes batch <= {MAX_BATCH}, got {b}")
        inputs = [x, w, scales, biases, q_norm, k_norm, positions]
        if self.cuda:
            inputs.append(counters)
        if self._primitive is not None:
            if poison and self._poisoned is None:
                self._poisoned = cuda_ext.require().Kernel(*self._primitive_args, poison=True)
            outs = (self._poisoned if poison else self._primitive)(inputs)
            return outs[0], outs[1], outs[2]
        outs = self.kernel(
            inputs=inputs, template=self.template, grid=(self.grid_x, b, 1),
            threadgroup=(self.threads, 1, 1), output_shapes=self._out_shapes(b),
            output_dtypes=[self.dtype] * self.n_outputs,
            init_value=float("nan") if poison else None,
        )
        return outs[0], outs[1], outs[2]
