
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
#ifdef FUSEDQK_WRITES_CACHE
  // k and v go straight into the layer's KV cache buffers (B, KV, cache_len, D), at the cache's
  // offset: the cache write mlx-lm would do with two slice updates after the call. The offset
  // comes by value: read from `positions` by every warp, it made each wait ~11 µs on the load
  // (Nsight Compute, H200, 2026-12-03).
  const size_t kv_slots = (size_t)cache_len, kv_slot = (size_t)cache_slot;
#else
  const size_t kv_slots = 1, kv_slot = 0;  // k_out and v_out are (B, KV, 1, D)
#endif

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
        v_out[(((size_t)b * KV + vrow / D) * kv_slots + kv_slot) * D + vrow % D] = val;
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
                  : k_out + (((size_t)b * KV + (head_id - H)) * kv_slots + kv_slot) * D;
    dst[i] = from_f32<T>(rx1);
    dst[i + HALF] = from_f32<T>(rx2);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch
