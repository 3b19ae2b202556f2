"""The C++ extension's primitive on the GPU: the mechanism on a trivial elementwise kernel, then
the fused kernel through it under mx.compile and inside one CUDA graph of many launches.

Skipped (with the reason) where MLX has no CUDA backend or the extension is not built
(`fusedqk build-ext`); the fused kernel's full bitwise matrix runs through the primitive in
tests/test_kernel_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from fusedqk.kernels import cuda_ext, qkv_norm_rope
from fusedqk.toggle import kernel_call

EXT, WHY = cuda_ext.load() if mx.cuda.is_available() else (None, "no CUDA backend")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend"),
    pytest.mark.skipif(EXT is None, reason=f"the C++ extension is unavailable: {WHY}"),
]

# Doubles each element of a (B, N) bfloat16 array, one block of 256 threads per 256 columns:
# exact in bfloat16, so the result must equal x * 2 bit for bit.
DOUBLE = r"""
#include <cuda_bf16.h>
namespace mlx::core::cu {
__global__ void fusedqk_test_double(const __nv_bfloat16* x, __nv_bfloat16* out) {
  const int i = blockIdx.y * N + blockIdx.x * 256 + threadIdx.x;
  out[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.0f);
}
}
"""
N = 1024


def double_kernel(poison: bool = False):
    source = f"constexpr int N = {N};\n" + DOUBLE
    return EXT.Kernel("mlx::core::cu::fusedqk_test_double", source, N // 256, 256, 8, [[N]],
                      "bfloat16", poison)


def test_trivial_primitive_is_bitwise_right_direct_compiled_and_graphed():
    kernel = double_kernel()
    x = mx.random.normal((3, N)).astype(mx.bfloat16)
    want = x * 2
    direct = kernel([x])[0]
    compiled = mx.compile(lambda a: kernel([a])[0])(x)
    # Forty launches in one evaluation: MLX records them into one CUDA graph.
    chained = x
    for _ in range(40):
        chained = kernel([chained])[0]
    mx.eval(want, direct, compiled, chained)
    assert kernel.cubin_bytes > 0
    assert mx.array_equal(direct, want).item()
    assert mx.array_equal(compiled, want).item()
    assert mx.array_equal(chained, x * (2.0 ** 40)).item()


def test_poison_fills_unwritten_outputs():
    source = f"constexpr int N = {N};\n" + DOUBLE.replace("out[i] =", "if (i % 2) out[i] =")
    kernel = EXT.Kernel("mlx::core::cu::fusedqk_test_double", source, N // 256, 256, 8, [[N]],
                        "bfloat16", True)
    out = kernel([mx.ones((1, N), dtype=mx.bfloat16)])[0]
    assert mx.isnan(out[0, ::2]).all().item() and (out[0, 1::2] == 2).all().item()


def test_batch_beyond_the_limit_is_refused():
    with pytest.raises(ValueError, match=r"batch 9 is outside 1\.\.8"):
        double_kernel()([mx.zeros((9, N), dtype=mx.bfloat16)])


def test_fused_kernel_through_the_primitive_under_compile_and_in_one_graph(monkeypatch):
    from test_kernel_gpu import SHAPES, concatenated, make_case

    monkeypatch.setenv("FUSEDQK_KERNEL_CALL", "primitive")
    layout, x, ws, norms = make_case(SHAPES["qwen3-8b"], 4, 64, mx.bfloat16, 1, 21)
    inputs = [x, *concatenated(ws), *norms, mx.array([77], dtype=mx.int32)]
    want = qkv_norm_rope.reference_block(x, ws, norms, layout, 77)
    kernel = qkv_norm_rope.QKVNormRope(layout, mx.bfloat16, "cuda", call=kernel_call("cuda")[0])
    assert kernel.call == "primitive"
    compiled = mx.compile(kernel.__call__)(*inputs, qkv_norm_rope.new_counters(layout))
    # Thirty-six layers' launches in one evaluation, each with its own counters (as decode does).
    layers = [kernel(*inputs, qkv_norm_rope.new_counters(layout)) for _ in range(36)]
    mx.eval(want, compiled, layers)
    for got in (compiled, *layers):
        for g, w in zip(got, want, strict=True):
            assert mx.array_equal(g, w).item()



def made() -> int:
    """Modules this process made ready: compiled by NVRTC or loaded from the disk copy."""
    return EXT.compilations() + EXT.disk_loads()


def test_one_compilation_serves_every_kernel_of_one_source():
    # A model builds one Kernel per layer, all with the same source: NVRTC must run once, not
    # once per layer (28-48 layers at ~1.4 s each on an H200 was a fresh process's first token).
    tag = f"constexpr int N = {N};\n// {__name__} one-compilation\n"
    before = made()
    kernels = [EXT.Kernel("mlx::core::cu::fusedqk_test_double", tag + DOUBLE, N // 256, 256, 8,
                          [[N]], "bfloat16") for _ in range(6)]
    x = mx.ones((1, N), dtype=mx.bfloat16)
    outs = [k([x])[0] for k in kernels]
    mx.eval(outs)
    assert made() - before == 1
    assert all(k.cubin_bytes == kernels[0].cubin_bytes > 0 for k in kernels)
    assert all(mx.array_equal(o, x * 2).item() for o in outs)
    other = EXT.Kernel("mlx::core::cu::fusedqk_test_double", tag + "// another source\n" + DOUBLE,
                       N // 256, 256, 8, [[N]], "bfloat16")
    mx.eval(other([x])[0])
    assert made() - before == 2


# One process: compile or load the doubling kernel (source argv[1], width argv[2]), check it,
# print how it was made.
DISK_PROBE = r"""
import sys
import mlx.core as mx
from fusedqk.kernels import cuda_ext
ext = cuda_ext.require()
n = int(sys.argv[2])
k = ext.Kernel("mlx::core::cu::fusedqk_test_double", sys.argv[1], n // 256, 256, 8, [[n]],
               "bfloat16")
x = mx.arange(n, dtype=mx.bfloat16).reshape(1, n)
assert mx.array_equal(k([x])[0], x * 2).item()
print(ext.compilations(), ext.disk_loads())
"""


def test_a_later_process_loads_the_kernel_from_disk_and_a_damaged_copy_is_compiled_again(tmp_path):
    env = {**os.environ, "MLX_PTX_CACHE_DIR": str(tmp_path)}
    source = f"constexpr int N = {N};\n// disk copy {tmp_path}\n" + DOUBLE

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", DISK_PROBE, source, str(N)], env=env,
                              capture_output=True, text=True, check=True).stdout.split()

    assert run() == ["1", "0"]  # compiled, and written beside MLX's own kernels
    files = list((tmp_path / "fusedqk").glob("*.cubin"))
    assert len(files) == 1 and not list((tmp_path / "fusedqk").glob("*.tmp*"))
    assert run() == ["0", "1"]  # loaded, not compiled
    files[0].write_bytes(files[0].read_bytes()[:-100])  # a torn file is a miss, not a crash
    assert run() == ["1", "0"]
    assert run() == ["0", "1"]  # and it was written again, whole
