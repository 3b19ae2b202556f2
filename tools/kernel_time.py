"""One layer's QKV + norm + RoPE block, launched a few times per path, for Nsight Compute.

    ncu --clock-control none --csv --metrics gpu__time_duration.sum \\
        -k "regex:fusedqk|qmv|rms_norm|rope" python tools/kernel_time.py qwen3-8b

Each launch is evaluated on its own, so every kernel ncu sees belongs to one known path: first
LAUNCHES kernel-path launches, then LAUNCHES graph-path blocks. Inputs are random weights in the
model's real shapes (no model is built, so no other kernel runs).
"""

from __future__ import annotations

import sys

import mlx.core as mx

from fusedqk.attention import QKVLayout
from fusedqk.kernels.qkv_norm_rope import QKVNormRope, new_counters
from fusedqk.models import get_spec

LAUNCHES = 5


def main(model: str) -> None:
    c = get_spec(model).config
    layout = QKVLayout(hidden=c["hidden_size"], n_heads=c["num_attention_heads"],
                       n_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                       eps=c["rms_norm_eps"], bits=4, group_size=64, rope_base=c["rope_theta"])
    dt = mx.bfloat16
    w, s, b = mx.quantize(mx.random.normal((layout.rows, layout.hidden)) * 0.02, 64, 4)
    s, b = s.astype(dt), b.astype(dt)
    qn = mx.ones((layout.head_dim,), dt)
    x = mx.random.normal((1, 1, layout.hidden)).astype(dt)
    pos = mx.array([5], mx.int32)
    kernel, counters = QKVNormRope(layout, dt, "cuda"), new_counters(layout)
    nq, nk = layout.n_heads * layout.head_dim, layout.n_kv_heads * layout.head_dim
    parts = [(w[a:z], s[a:z], b[a:z]) for a, z in ((0, nq), (nq, nq + nk), (nq + nk, layout.rows))]
    mx.eval(w, s, b, x, parts)
    for _ in range(LAUNCHES):
        mx.eval(kernel(x, w, s, b, qn, qn, pos, counters))
    for _ in range(LAUNCHES):
        q, k, v = (mx.quantized_matmul(x, *p, transpose=True, group_size=64, bits=4) for p in parts)
        q = mx.fast.rms_norm(q.reshape(1, 1, layout.n_heads, -1), qn, 1e-6).transpose(0, 2, 1, 3)
        k = mx.fast.rms_norm(k.reshape(1, 1, layout.n_kv_heads, -1), qn, 1e-6).transpose(0, 2, 1, 3)
        rope = dict(dims=layout.head_dim, traditional=False, base=layout.rope_base, scale=1.0, offset=5)
        mx.eval(mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v)


if __name__ == "__main__":
    main(sys.argv[1])
