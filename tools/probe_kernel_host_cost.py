"""What does one fused-kernel call cost the host, and does ``mx.compile`` take it away? (device tool)

The block benchmark is host-bound: the kernel path's time per layer stays near 25-40 us whatever
the model, while the kernel runs 10-16 us. This probe times, for one layer's real shapes, the
host work of building a call (no evaluation) and the time of LAYERS calls built and evaluated
together, for: the kernel called as fusedqk calls it, the same call under ``mx.compile``, the
graph path's seven ops, and the composite. It also checks that the compiled call's outputs are
bitwise the plain call's.

    python tools/probe_kernel_host_cost.py [model ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from fusedqk.attention import QKVLayout, _composite
from fusedqk.kernels.qkv_norm_rope import QKVNormRope, new_counters
from fusedqk.models import get_spec

LAYERS, REPS = 28, 50


def _median_us(fn, reps: int = REPS) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times[5:])


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
    pos, offset = mx.array([100], mx.int32), mx.array(100, mx.int32)
    kernel = QKVNormRope(layout, dt, "cuda")
    counters = [new_counters(layout) for _ in range(LAYERS)]
    compiled = mx.compile(kernel.__call__)
    composite = _composite(layout)
    h, kv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim
    nq, nk = h * d, kv * d
    parts = [(w[a:z], s[a:z], b[a:z]) for a, z in ((0, nq), (nq, nq + nk), (nq + nk, layout.rows))]
    mx.eval(w, s, b, x, qn, pos, offset, counters, parts)

    def graph_call(i: int):
        (wq, sq, bq), (wk, sk, bk), (wv, sv, bv) = parts
        mm = lambda w_, s_, b_: mx.quantized_matmul(  # noqa: E731
            x, w_, scales=s_, biases=b_, transpose=True, group_size=64, bits=4)
        q = mx.fast.rms_norm(mm(wq, sq, bq).reshape(1, 1, h, d), qn, layout.eps)
        k = mx.fast.rms_norm(mm(wk, sk, bk).reshape(1, 1, kv, d), qn, layout.eps)
        v = mm(wv, sv, bv).reshape(1, 1, kv, d).transpose(0, 2, 1, 3)
        rope = lambda t: mx.fast.rope(t.transpose(0, 2, 1, 3), d, traditional=False,  # noqa: E731
                                      base=layout.rope_base, scale=1.0, offset=offset)
        return rope(q), rope(k), v

    calls = {
        "graph (7 ops)": graph_call,
        "composite (mx.compile)": lambda i: composite(x, w, s, b, qn, qn, offset),
        "kernel (as fusedqk calls it)": lambda i: kernel(x, w, s, b, qn, qn, pos, counters[i]),
        "kernel under mx.compile": lambda i: compiled(x, w, s, b, qn, qn, pos, counters[i]),
    }
    plain, comp = calls["kernel (as fusedqk calls it)"](0), calls["kernel under mx.compile"](1)
    mx.eval(plain, comp)
    same = all(np.array_equal(np.array(p.astype(mx.float32)), np.array(q.astype(mx.float32)))
               for p, q in zip(plain, comp, strict=True))
    print(f"\n{model}: one layer's shapes, {LAYERS} calls per block, median of {REPS}; "
          f"compiled kernel bitwise equal to plain: {same}")
    print("| call | build µs/call (host, no eval) | block µs (build + eval of all calls) | µs/call |")
    print("|---|---|---|---|")
    for name, fn in calls.items():
        for _ in range(3):
            mx.eval([fn(i) for i in range(LAYERS)])
        build = _median_us(lambda fn=fn: [fn(i) for i in range(LAYERS)]) / LAYERS
        block = _median_us(lambda fn=fn: mx.eval([fn(i) for i in range(LAYERS)]))
        print(f"| {name} | {build:.1f} | {block:.0f} | {block / LAYERS:.1f} |", flush=True)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"]:
        main(name)
