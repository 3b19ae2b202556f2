"""Registers and spills of the CUDA kernel per block shape, without a GPU (needs ``nvcc``).

MLX declares a custom kernel without ``__launch_bounds__`` (the kernel's header adds one, see
``cuda_header``): without a bound a launch can fail, under a tight one the compiler spills.
This script builds the kernel's source the way ``mx.fast.cuda_kernel`` does (without MLX's
device header, which the kernel does not use), compiles it for sm_90 with ``nvcc -Xptxas -v``
(MLX gives NVRTC no other options), and prints registers, spills and whether the block fits.

    python tools/kernel_registers.py            # the product's choice for every covered case
    python tools/kernel_registers.py --all      # every (warps, rows per warp) for the seed shapes
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from fusedqk.attention import QKVLayout
from fusedqk.kernels.qkv_norm_rope import (
    CUDA_SOURCE,
    INPUT_NAMES,
    OUTPUT_NAMES,
    cuda_block_shape,
    cuda_header,
)

REGISTERS_PER_SM = 65536
SEED_SHAPES = {"qwen3-0.6b": (1024, 16, 8), "qwen3-8b": (4096, 32, 8), "qwen3-30b-a3b": (2048, 32, 4)}
INPUT_TYPES = ["T", "uint32_t", "T", "T", "T", "T", "int32_t"]


def kernel_source(layout: QKVLayout, dtype: str, warps: int, rpw: int) -> str:
    params = [f"const {t}* {n}" for t, n in zip(INPUT_TYPES, INPUT_NAMES, strict=True)]
    params += [f"T* {n}" for n in OUTPUT_NAMES]
    consts = dict(K=layout.hidden, H=layout.n_heads, KV=layout.n_kv_heads, D=layout.head_dim,
                  BITS=layout.bits, GS=layout.group_size, NW=warps, RPW=rpw)
    body = "".join(f"  constexpr int {k} = {v};\n" for k, v in consts.items())
    return ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n"
            "#include <cooperative_groups.h>\n" + cuda_header(1e-6, 19.93, warps * 32)
            + f"using T = {dtype};\n__global__ void probe({', '.join(params)}) {{\n"
            + body + CUDA_SOURCE + "}\n")


def compile_stats(source: str) -> tuple[int, int]:
    """(registers per thread, spill bytes) that ptxas reports for sm_90."""
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp, "k.cu")
        cu.write_text(source)
        out = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o",
                              str(Path(tmp, "k.cubin")), str(cu)],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out)[1])
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", out))
    return regs, spills


def layout_of(hidden: int, heads: int, kv: int, d: int = 128, bits: int = 4, gs: int = 64):
    return QKVLayout(hidden=hidden, n_heads=heads, n_kv_heads=kv, head_dim=d, eps=1e-6,
                     bits=bits, group_size=gs, rope_base=1e6)


def main(every_shape: bool) -> None:
    cases = []
    if every_shape:
        for name, shape in SEED_SHAPES.items():
            for warps in (8, 16, 32):
                for rpw in (1, 2, 4, 8):
                    if 128 % (warps * rpw) == 0:
                        cases.append((name, layout_of(*shape), warps, rpw))
    else:
        for bits in (4, 8):
            for hidden in (640, 1024, 2048, 4096, 8192, 16384):
                for d in (64, 128, 256):
                    lay = layout_of(hidden, 8, 2, d, bits)
                    cases.append((f"K={hidden} {bits}-bit D={d}", lay, *cuda_block_shape(lay)))
    print("| case | warps | rows per warp | registers | spill bytes | block fits |")
    print("|---|---|---|---|---|---|")
    for name, lay, warps, rpw in cases:
        regs, spills = compile_stats(kernel_source(lay, "__nv_bfloat16", warps, rpw))
        fits = regs * warps * 32 <= REGISTERS_PER_SM
        print(f"| {name} | {warps} | {rpw} | {regs} | {spills} | {'yes' if fits else 'NO'} |")


if __name__ == "__main__":
    main("--all" in sys.argv[1:])
