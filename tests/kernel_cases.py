"""Fresh random cases for the fused kernel's GPU tests: layouts, weights, inputs, and how
close two outputs are in units of the last place."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from fusedqk.kernels.qkv_norm_rope import QKVLayout

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}

# (hidden, heads, kv_heads, head_dim): the three seed models, and shapes that are none of them
# (odd GQA ratios, head_dim 64/256, a hidden size that leaves a partial last step).
SHAPES = {
    "qwen3-0.6b": (1024, 16, 8, 128),
    "qwen3-8b": (4096, 32, 8, 128),
    "qwen3-30b-a3b": (2048, 32, 4, 128),
    "gqa6-d64": (768, 12, 2, 64),
    "mha-d256": (1536, 4, 4, 256),
    "residue-k640": (640, 5, 1, 128),
}


def make_case(shape, bits, group_size, dtype, batch, seed):
    hidden, h, kv, d = shape
    layout = QKVLayout(hidden=hidden, n_heads=h, n_kv_heads=kv, head_dim=d, eps=1e-6,
                       bits=bits, group_size=group_size, rope_base=1_000_000.0)
    keys = mx.random.split(mx.random.key(seed), 6)
    ws = []
    for i, rows in enumerate((h * d, kv * d, kv * d)):
        w = mx.random.normal((rows, hidden), key=keys[i]) * (1 / math.sqrt(hidden))
        ws.append(tuple(a.astype(dtype) if a.dtype != mx.uint32 else a
                        for a in mx.quantize(w, group_size=group_size, bits=bits)))
    norms = [mx.random.uniform(0.5, 1.5, (d,), key=keys[3 + i]).astype(dtype) for i in range(2)]
    x = mx.random.normal((batch, 1, hidden), key=keys[5]).astype(dtype)
    return layout, x, ws, norms


def concatenated(ws) -> tuple[mx.array, mx.array, mx.array]:
    """The q, k and v projections' (weight, scales, biases) as the kernel takes them: one each."""
    return tuple(mx.concatenate([t[i] for t in ws]) for i in range(3))


def ulp_stats(a: mx.array, b: mx.array) -> tuple[float, float]:
    """(fraction of bitwise-equal elements, max |a - b| in units of the last place of b)."""
    fa, fb = np.array(a.astype(mx.float32)).ravel(), np.array(b.astype(mx.float32)).ravel()
    mantissa_bits = 7 if a.dtype == mx.bfloat16 else 10
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(fb), 1e-30))) - mantissa_bits)
    equal = np.array(a.view(mx.int16)).ravel() == np.array(b.view(mx.int16)).ravel()
    return float(np.mean(equal)), float(np.max(np.abs(fa - fb) / ulp))
