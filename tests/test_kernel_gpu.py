"""The fused kernel against the graph path's own ops, bitwise, on fresh random inputs.

Runs where MLX has a GPU backend with a kernel (CUDA, Metal); skipped elsewhere with the reason.
Outputs are poisoned with NaN before each launch, so an element the kernel never writes fails.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import numpy as np
import pytest

from fusedqk.kernels import cuda_ext, qkv_norm_rope
from fusedqk.kernels.qkv_norm_rope import QKVLayout, reference_block
from fusedqk.toggle import ENV_KERNEL_CALL, kernel_call

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (mx.cuda.is_available() or mx.metal.is_available()),
                       reason="needs MLX's CUDA or Metal backend; this machine has only the CPU"),
]

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}
BACKEND = "cuda" if mx.cuda.is_available() else "metal"
# On CUDA every test runs once per way of calling the kernel: mx.fast.cuda_kernel, and the C++
# primitive where it is built (the same kernel source; both must be bitwise the graph path).
CALLS = ((["cuda_kernel"] + (["primitive"] if cuda_ext.load()[0] else []))
         if BACKEND == "cuda" else ["metal_kernel"])


@pytest.fixture(autouse=True, params=CALLS)
def each_kernel_call(request, monkeypatch):
    if BACKEND == "cuda":
        monkeypatch.setenv(ENV_KERNEL_CALL, request.param)
    return request.param

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


def run_both(shape, bits, group_size, dtype_name, batch, seed=0, offset=None, counters=None):
    """(kernel outputs, graph outputs) for one fresh random case."""
    dtype = DTYPES[dtype_name]
    layout, x, ws, norms = make_case(shape, bits, group_size, dtype, batch, seed)
    offset = offset if offset is not None else 17 + 131 * seed
    want = reference_block(x, ws, norms, layout, offset)
    w, s, bias = concatenated(ws)
    if counters is None:
        counters = qkv_norm_rope.new_counters(layout)
    kernel = qkv_norm_rope.QKVNormRope(layout, dtype, BACKEND, call=kernel_call(BACKEND)[0])
    assert kernel.call == os.environ.get(ENV_KERNEL_CALL, "metal_kernel")
    got = kernel(x, w, s, bias, norms[0], norms[1], mx.full((batch,), offset, dtype=mx.int32),
                 counters, poison=True)
    mx.eval(want, got)
    return got, want


def check(*case, **kw):
    got, want = run_both(*case, **kw)
    for name, g, r in zip("qkv", got, want, strict=True):
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert not mx.any(mx.isnan(g)).item(), f"{name}: unwritten (NaN-poisoned) elements remain"
        equal, max_ulp = ulp_stats(g, r)
        assert equal == 1.0, f"{name}: {equal:.4%} bitwise equal, max {max_ulp} ulp"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_bits_groups_dtypes(bits, group_size, dtype):
    check(SHAPES["qwen3-0.6b"], bits, group_size, dtype, batch=1, seed=bits * group_size)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_model_and_odd_shapes(shape):
    check(SHAPES[shape], 4, 64, "bfloat16", batch=1, seed=3)


@pytest.mark.parametrize("batch", [2, 7])
def test_batch(batch):
    check(SHAPES["qwen3-30b-a3b"], 4, 64, "bfloat16", batch=batch, seed=batch)


def test_batch_8_differs_by_rounding_only():
    """At 8 rows MLX 0.32.4's graph path leaves its mat-vec (qmv) for a tiled matmul that sums in
    another order, so bitwise equality is not to be had; the kernel stays within rounding."""
    got, want = run_both(SHAPES["qwen3-30b-a3b"], 4, 64, "bfloat16", batch=8, seed=8)
    for name, g, r in zip("qkv", got, want, strict=True):
        equal, max_ulp = ulp_stats(g, r)
        rel = (mx.linalg.norm((g - r).astype(mx.float32)) / mx.linalg.norm(r.astype(mx.float32)))
        print(f"batch 8 {name}: {equal:.2%} bitwise equal, max {max_ulp:.1f} ulp, rel {rel.item():.2e}")
        assert not mx.any(mx.isnan(g)).item()
        assert rel.item() < 1e-2


def test_positions_are_inputs_not_constants():
    """A new position must reuse the compiled kernel and stay bitwise right (no baked offset)."""
    for offset in (0, 1, 4095, 40000):
        check(SHAPES["qwen3-0.6b"], 4, 64, "bfloat16", batch=1, seed=11, offset=offset)


def test_counters_reset_between_launches():
    """One counter array through several launches: each must leave it at zero again, or the
    next launch would normalise a head before all its rows exist."""
    layout = make_case(SHAPES["qwen3-8b"], 4, 64, mx.bfloat16, 1, 0)[0]
    counters = qkv_norm_rope.new_counters(layout)
    for seed in range(3):
        check(SHAPES["qwen3-8b"], 4, 64, "bfloat16", batch=2, seed=seed, counters=counters)
        assert not mx.any(counters).item()


def test_launch_only_has_the_kernels_outputs_and_writes_none():
    """blockbench's launch floor: the same launch and outputs as the kernel, with no work in it
    (every poisoned element stays NaN), so its time is the launch's alone."""
    dtype = mx.bfloat16
    layout, x, ws, norms = make_case(SHAPES["qwen3-8b"], 4, 64, dtype, 2, 5)
    call = kernel_call(BACKEND)[0]
    full = qkv_norm_rope.QKVNormRope(layout, dtype, BACKEND, call=call)
    empty = qkv_norm_rope.QKVNormRope(layout, dtype, BACKEND, launch_only=True, call=call)
    assert (empty.template, empty.grid_x, empty.threads) == (full.template, full.grid_x, full.threads)
    inputs = [x, *concatenated(ws), *norms,
              mx.array([3, 9], dtype=mx.int32), qkv_norm_rope.new_counters(layout)]
    got = empty(*inputs, poison=True)
    want = full(*inputs)
    mx.eval(got, want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert mx.all(mx.isnan(g)).item()
