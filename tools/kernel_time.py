"""One layer's QKV + norm + RoPE block, launched a few times per path, for Nsight Compute.

    ncu --clock-control none --csv --metrics gpu__time_duration.sum \\
        -k "regex:fusedqk|qmv|rms_norm|rope" python tools/kernel_time.py qwen3-8b

Each launch is evaluated on its own, so every kernel ncu sees belongs to one known path: first
LAUNCHES kernel-path launches, then LAUNCHES graph-path blocks. Inputs are random weights in the
model's real shapes (no model is built, so no other kernel runs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx

from fusedqk.kernels.qkv_norm_rope import QKVLayout, QKVNormRope, new_counters
from fusedqk.models import get_spec
from fusedqk.toggle import kernel_call

LAUNCHES = 5


@dataclass
class LayerCase:
    """One attention layer's QKV block inputs in a seed model's real shapes (4-bit, g64, bf16)."""

    layout: QKVLayout
    x: mx.array
    w: mx.array
    scales: mx.array
    biases: mx.array
    norm: mx.array  # q_norm and k_norm weights (ones)
    parts: list[tuple[mx.array, mx.array, mx.array]]  # the q, k, v rows of (w, scales, biases)


def layer_case(model: str) -> LayerCase:
    c = get_spec(model).config
    layout = QKVLayout(hidden=c["hidden_size"], n_heads=c["num_attention_heads"],
                       n_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                       eps=c["rms_norm_eps"], bits=4, group_size=64, rope_base=c["rope_theta"])
    dt = mx.bfloat16
    w, s, b = mx.quantize(mx.random.normal((layout.rows, layout.hidden)) * 0.02, 64, 4)
    s, b = s.astype(dt), b.astype(dt)
    nq, nk = layout.n_heads * layout.head_dim, layout.n_kv_heads * layout.head_dim
    parts = [(w[a:z], s[a:z], b[a:z]) for a, z in ((0, nq), (nq, nq + nk), (nq + nk, layout.rows))]
    case = LayerCase(layout, mx.random.normal((1, 1, layout.hidden)).astype(dt), w, s, b,
                     mx.ones((layout.head_dim,), dt), parts)
    mx.eval(case.x, case.w, case.scales, case.biases, case.norm, case.parts)
    return case


def graph_block(case: LayerCase, offset: int | mx.array):
    """The graph path's seven ops: three mat-vecs, two RMSNorms, two RoPEs."""
    lay, n = case.layout, case.norm
    q, k, v = (mx.quantized_matmul(case.x, *p, transpose=True, group_size=64, bits=4)
               for p in case.parts)
    q = mx.fast.rms_norm(q.reshape(1, 1, lay.n_heads, -1), n, lay.eps).transpose(0, 2, 1, 3)
    k = mx.fast.rms_norm(k.reshape(1, 1, lay.n_kv_heads, -1), n, lay.eps).transpose(0, 2, 1, 3)
    v = v.reshape(1, 1, lay.n_kv_heads, -1).transpose(0, 2, 1, 3)
    rope = dict(dims=lay.head_dim, traditional=False, base=lay.rope_base, scale=1.0, offset=offset)
    return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v


def main(model: str) -> None:
    case = layer_case(model)
    kernel = QKVNormRope(case.layout, mx.bfloat16, "cuda", call=kernel_call("cuda")[0])
    counters = new_counters(case.layout)
    pos = mx.array([5], mx.int32)
    args = (case.x, case.w, case.scales, case.biases, case.norm, case.norm)
    for _ in range(LAUNCHES):
        mx.eval(kernel(*args, pos, counters))
    for _ in range(LAUNCHES):
        mx.eval(graph_block(case, 5))


if __name__ == "__main__":
    main(sys.argv[1])
