"""Why kernel_kv's launch takes longer on the GPU than the plain kernel's: the same fused
kernel, one layer's inputs in a seed model's real shapes, launched once per layer (as a decode
step does) into cache buffers made in different ways, each variant timed as the block benchmark
times a block (median of repeated evaluations, µs per launch).

    python tools/kv_probe.py [MODEL] [--reps 50]

Variants:
  kernel          the plain kernel (k and v to fresh (B, KV, 1, D) outputs)
  kv-zeros-256    kernel_kv into mx.zeros buffers of 256 positions (the block benchmark's)
  kv-zeros-1      kernel_kv into mx.zeros buffers of 1 position (the plain kernel's size)
  kv-random-256   kernel_kv into buffers filled on the GPU with random values
  kv-host-256     kernel_kv into buffers made from a NumPy array (written by the CPU first)
Every kernel_kv variant writes position 0, so only where and how its buffers were made differ.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from fusedqk.blockbench import interleaved_us
from fusedqk.kernels.qkv_norm_rope import QKVNormRope, new_counters
from fusedqk.toggle import kernel_call

LAYERS = 28
POSITIONS = 256


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="qwen3-0.6b")
    parser.add_argument("--reps", type=int, default=50)
    return parser


def main() -> None:
    from kernel_time import layer_case  # tools/ is on sys.path when run as a script

    args = setup_arg_parser().parse_args()
    case = layer_case(args.model)
    lay = case.layout
    kernel = QKVNormRope(lay, mx.bfloat16, "cuda", call=kernel_call("cuda")[0])
    if not kernel.writes_cache:
        raise SystemExit("kernel_kv needs the C++ primitive (fusedqk build-ext)")
    inputs = (case.x, case.w, case.scales, case.biases, case.norm, case.norm)
    position = mx.array([0], mx.int32)
    shape = (1, lay.n_kv_heads, POSITIONS, lay.head_dim)
    makers = {
        "kv-zeros-256": lambda: mx.zeros(shape, mx.bfloat16),
        "kv-zeros-1": lambda: mx.zeros((*shape[:2], 1, shape[3]), mx.bfloat16),
        "kv-random-256": lambda: mx.random.normal(shape).astype(mx.bfloat16),
        # Bits set by NumPy, viewed as bfloat16: the buffer MLX filled from host memory.
        "kv-host-256": lambda: mx.array(np.zeros(shape, np.uint16)).view(mx.bfloat16),
    }
    counters = {name: [new_counters(lay) for _ in range(LAYERS)] for name in ["kernel", *makers]}
    caches = {name: [(make(), make()) for _ in range(LAYERS)] for name, make in makers.items()}
    mx.eval(caches)

    def plain():
        return [kernel(*inputs, position, c) for c in counters["kernel"]]

    def writing(name: str):
        def block():
            return [kernel.with_cache(*inputs, position, c, k, v, 1)
                    for c, (k, v) in zip(counters[name], caches[name], strict=True)]
        return block

    blocks = {"kernel": plain, **{name: writing(name) for name in makers}}
    timed = interleaved_us(blocks, args.reps, 5)
    print(f"| {args.model}: variant | µs per launch (median) | p10 | p90 |")
    print("|---|---|---|---|")
    for name, t in timed.items():
        print(f"| {name} | {t.median / LAYERS:.2f} | {t.p10 / LAYERS:.2f} | {t.p90 / LAYERS:.2f} |")


if __name__ == "__main__":
    main()
