
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
