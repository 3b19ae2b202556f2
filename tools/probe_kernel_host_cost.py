"""What does one fused-kernel call cost the host, and does ``mx.compile`` take it away? (device tool)

The block benchmark is host-bound: the kernel path's time per layer stays near 25-40 us whatever
the model, while the kernel runs 10-16 us. This probe times, for one layer's real shapes, the
host work of building a call (no evaluation) and the time of LAYERS calls built and evaluated
together, for: the kernel called as fusedqk calls it, the same call under ``mx.compile``, the
graph path's seven ops, and the composite. It also checks that the compiled call's outputs are
bitwise the plain call's. Two floors come last: an empty ``mx.fast.cuda_kernel`` (one input, one
output, one warp) and one built-in op, so the cost of MLX's custom-kernel call itself is seen apart
from this kernel.

    python tools/probe_kernel_host_cost.py [model ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import mlx.core as mx
import numpy as np
from kernel_time import graph_block, layer_case  # tools/, beside this script

from fusedqk.attention import _composite
from fusedqk.kernels.qkv_norm_rope import QKVNormRope, new_counters

LAYERS, REPS = 28, 50


def _median_us(fn, reps: int = REPS) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times[5:])


def main(model: str) -> None:
    case = layer_case(model)
    layout = case.layout
    kernel = QKVNormRope(layout, mx.bfloat16, "cuda")
    counters = [new_counters(layout) for _ in range(LAYERS)]
    mx.eval(counters)
    compiled = mx.compile(kernel.__call__)
    composite = _composite(layout)
    pos, offset = mx.array([100], mx.int32), mx.array(100, mx.int32)
    empty = mx.fast.cuda_kernel(name="fusedqk_probe_empty", input_names=["a"],
                                output_names=["out"], source="if (threadIdx.x == 0) out[0] = a[0];")
    args = (case.x, case.w, case.scales, case.biases, case.norm, case.norm)
    calls = {
        "graph (7 ops)": lambda i: graph_block(case, offset),
        "composite (mx.compile)": lambda i: composite(*args, offset),
        "kernel (as fusedqk calls it)": lambda i: kernel(*args, pos, counters[i]),
        "kernel under mx.compile": lambda i: compiled(*args, pos, counters[i]),
        "empty cuda_kernel (floor of a custom call)": lambda i: empty(
            inputs=[pos], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
            output_dtypes=[mx.int32])[0],
        "one built-in op (x + 1)": lambda i: case.x + 1,
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
