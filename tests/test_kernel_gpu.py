"""The fused kernel against the graph path's own ops, bitwise, on fresh random inputs.

Runs where MLX has a GPU backend with a kernel (CUDA, Metal); skipped elsewhere with the reason.
Outputs are poisoned with NaN before each launch, so an element the kernel never writes fails.
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
from kernel_cases import DTYPES, SHAPES, concatenated, make_case, ulp_stats

from fusedqk.kernels import cuda_ext, qkv_norm_rope
from fusedqk.kernels.qkv_norm_rope import reference_block
from fusedqk.toggle import ENV_KERNEL_CALL, kernel_call

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (mx.cuda.is_available() or mx.metal.is_available()),
                       reason="needs MLX's CUDA or Metal backend; this machine has only the CPU"),
]

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


def test_graph_path_is_row_by_row_up_to_max_batch():
    """The kernel computes each sequence as MLX's mat-vec computes one row, so it can be bitwise
    the graph path only at batch sizes where the graph path is row by row itself: MAX_BATCH is
    the largest such batch."""
    shape, bits, gs, dtype = SHAPES["qwen3-30b-a3b"], 4, 64, mx.bfloat16
    for batch in range(1, qkv_norm_rope.MAX_BATCH + 1):
        layout, x, ws, norms = make_case(shape, bits, gs, dtype, batch, seed=40 + batch)
        whole = reference_block(x, ws, norms, layout, 33)
        rows = [reference_block(x[i:i + 1], ws, norms, layout, 33) for i in range(batch)]
        for j, name in enumerate("qkv"):
            by_row = mx.concatenate([r[j] for r in rows])
            equal, max_ulp = ulp_stats(whole[j], by_row)
            assert equal == 1.0, (f"batch {batch} {name}: the graph path's batch is {equal:.2%} "
                                  f"its rows' (max {max_ulp} ulp)")
    # One past the limit the graph path sums in another order: if this ever holds, a newer MLX
    # kept its mat-vec longer and MAX_BATCH can grow.
    batch = qkv_norm_rope.MAX_BATCH + 1
    layout, x, ws, norms = make_case(shape, bits, gs, dtype, batch, seed=40 + batch)
    whole = reference_block(x, ws, norms, layout, 33)
    rows = [reference_block(x[i:i + 1], ws, norms, layout, 33) for i in range(batch)]
    fractions = [ulp_stats(whole[j], mx.concatenate([r[j] for r in rows]))[0] for j in range(3)]
    print(f"batch {batch}: the graph path's q, k, v are {fractions} bitwise its rows'")
    assert min(fractions) < 1.0


@pytest.mark.parametrize("batch", range(1, qkv_norm_rope.MAX_BATCH + 1))
def test_every_batch(batch):
    check(SHAPES["qwen3-30b-a3b"], 4, 64, "bfloat16", batch=batch, seed=batch)


@pytest.mark.parametrize("batch", [1, qkv_norm_rope.MAX_BATCH])
@pytest.mark.parametrize("shape", ["qwen3-0.6b", "gqa6-d64", "qwen3-8b"])
def test_largest_batch_on_other_layouts(shape, batch):
    check(SHAPES[shape], 4, 64, "bfloat16", batch=batch, seed=50 + batch)


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
