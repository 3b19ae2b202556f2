"""The fused kernel's source texts, its layout, and the CUDA translation unit the C++ primitive
compiles: everything about the kernel that is text, without MLX.

Apart from ``qkv_norm_rope.py`` (which builds and calls the kernel through MLX) because MLX's CUDA
build cannot load on a host without the NVIDIA driver, and ``fusedqk doctor`` compiles this very
translation unit with NVRTC there (an image build, a login node) to prove the headers are present.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

WARPS = 8
# Rows per warp. One row per warp (more blocks, more warps in flight) beat 2 and 4 on every seed
# model on the H100 (tools/probe_kernel_parts.py, docs/perf-log.md), bitwise the same.
ROWS_PER_WARP = 1
# The activation dtypes the kernel takes, by MLX's name, and their CUDA types.
CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half"}
CUDA_INPUTS = ("x", "w", "scales", "biases", "q_norm", "k_norm", "positions", "counters")
CUDA_OUTPUTS = ("q_out", "k_out", "v_out", "proj")


@dataclass(frozen=True)
class QKVLayout:
    """Everything about one attention layer that the fused call needs besides its arrays."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    bits: int
    group_size: int
    rope_base: float

    @property
    def rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


# The kernel sources live beside this file (diffable, and read by editors as CUDA and Metal):
# the CUDA header (MLX's utilities, the dtype helpers), the CUDA kernel body and the Metal one.
CUDA_HEADER = _source("qkv_norm_rope.cuh")

# Template constants: T, K (hidden), H, KV, D, BITS, GS, RPW (rows per warp), NQK (q+k rows).
# Inputs: x (B,1,K), w (N, K*BITS/32) uint32, scales/biases (N, K/GS), q_norm/k_norm (D),
# positions (B,) int32, counters (MAX_BATCH * (H+KV)) uint32, persistent, zero.
CUDA_SOURCE = _source("qkv_norm_rope.cu")

METAL_SOURCE = _source("qkv_norm_rope.metal")


def float_literal(value: float) -> str:
    """The float32 nearest ``value`` as an exact C++ hex literal."""
    return float(np.float32(value)).hex() + "f"


def kernel_name(eps: float, log2_base: float, launch_only: bool) -> str:
    kind = "launch_only" if launch_only else "qkv_norm_rope"
    return f"fusedqk_{kind}_{abs(hash((eps, log2_base))):x}"


def cuda_header(eps: float, log2_base: float) -> str:
    return CUDA_HEADER + (f"constexpr float EPS = {float_literal(eps)};\n"
                          f"constexpr float LOG2_BASE = {float_literal(log2_base)};\n")


def shape_constants(layout: QKVLayout) -> list[tuple[str, int]]:
    """The CUDA kernel's integer template constants for one layout (T, the type, comes first)."""
    h, kv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim
    return [("K", layout.hidden), ("H", h), ("KV", kv), ("D", d), ("BITS", layout.bits),
            ("GS", layout.group_size), ("NQK", (h + kv) * d), ("RPW", ROWS_PER_WARP)]


def translation_unit(layout: QKVLayout, dtype_name: str, launch_only: bool = False,
                     writes_cache: bool = False) -> tuple[str, str]:
    """(name expression, source) of the kernel for the C++ primitive: the translation unit that
    ``mx.fast.cuda_kernel`` assembles for the same kernel (header, then the kernel in namespace
    ``mlx::core::cu`` with the inputs' and outputs' pointers as parameters and the template
    constants at the top of the body), so both callers compile the same code, once per layout.
    ``writes_cache``: k_out and v_out are the KV cache's buffers, ``cache_len`` positions long,
    written at position ``cache_slot``, the cache's offset (``FUSEDQK_WRITES_CACHE`` in the body)."""
    import math

    t = CUDA_TYPES[dtype_name]
    types = {"w": "unsigned int", "positions": "int", "counters": "unsigned int"}
    params = [f"const {types.get(n, t)}* {n}" for n in CUDA_INPUTS]
    params += [f"{t}* {n}" for n in CUDA_OUTPUTS]
    if writes_cache:
        params += ["int cache_len", "int cache_slot"]
    constants = shape_constants(layout)
    body_constants = f"  using T = {t};\n" + "".join(f"  constexpr int {k} = {v};\n"
                                                      for k, v in constants)
    log2_base = math.log2(layout.rope_base)
    shape = "_".join(str(v) for _, v in constants)
    name = (f"{kernel_name(layout.eps, log2_base, launch_only)}_{dtype_name}_{shape}"
            + ("_kv" if writes_cache else ""))
    source = ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
              + ("#define FUSEDQK_WRITES_CACHE\n" if writes_cache else "")
              + cuda_header(layout.eps, log2_base)
              + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
              + f"__global__ void {name}(\n    " + ",\n    ".join(params) + ") {\n"
              + body_constants + "\n" + ("" if launch_only else CUDA_SOURCE)
              + "\n}\n\n} // namespace mlx::core::cu\n")
    return f"mlx::core::cu::{name}", source
