"""One-launch decode kernel: QKV projection + per-head RMSNorm of q and k + RoPE (NeoX pairing).

What is fused, for one decode step (one token per sequence, batch B):

    qkv = x @ dequant(W_qkv)^T            # affine-quantized, bits 4 or 8, group 32/64/128
    q, k, v = split(qkv)                   # (B, H*D), (B, KV*D), (B, KV*D)
    q = rope(rms_norm(q per head, q_norm)) # written as (B, H, 1, D)
    k = rope(rms_norm(k per head, k_norm)) # written as (B, KV, 1, D)
    v = v                                  # written as (B, KV, 1, D)

Design (CUDA): blocks of 8 warps; each warp computes ``RPW`` output rows (1: more warps in
flight beat more loads per warp, measured on the H100), each row with MLX's
own quantized mat-vec lane layout and accumulation order (lane t of step r takes the E contiguous
elements at t*E + r*32*E; partial sums in the activation dtype for 4-bit, fp32 for 8-bit; lanes
summed in fp32 by ``cg::reduce``), so the projection is bitwise the graph path's. All loads of a
row are issued before the first multiply, for memory-level parallelism. A head spans several
blocks: v rows are written straight out; q/k rows go to a scratch output, and the last block to
finish a head (a per-layer atomic counter, reset by that block) applies RMSNorm and RoPE to the
head, again in MLX's order. One launch per layer per step; positions are an input array, so a
new position never recompiles and the launch fits MLX's CUDA graphs.

The Metal twin has the same contract and rounding points; it gives each head one threadgroup
(Metal has no portable device-scope fence for a last-threadgroup pattern). It has not been run
on a Mac yet: see docs/kernels.md.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from fusedqk.kernels import cuda_ext
from fusedqk.kernels.cuda_source import (
    CUDA_INPUTS,
    CUDA_OUTPUTS,
    CUDA_SOURCE,
    METAL_SOURCE,
    ROWS_PER_WARP,
    WARPS,
    QKVLayout,
    cuda_header,
    float_literal,
    kernel_name,
    shape_constants,
    translation_unit,
)

# The largest decode batch the kernel takes: the largest at which MLX 0.32.4's graph path still
# computes the projections row by row with its mat-vec (at 8 rows it switches to a tiled matmul
# that sums in another order, so no row-by-row kernel is bitwise it there; tests/test_kernel_gpu.py
# checks both sides of the limit). Larger decode batches take the graph path (fusedqk.attention).
MAX_BATCH = 7
HEAD_DIMS = (64, 128, 256)
MAX_HIDDEN = 16384  # x is staged in shared memory (2 bytes each)


# --- the plain-ops references ------------------------------------------------------------------

def reference_block(x: mx.array, ws, norms, layout: QKVLayout, offset: int):
    """The graph path's ops, as mlx-lm runs them: three quantized mat-vecs over the separate
    q/k/v weights ``ws`` ((weight, scales, biases) each), two ``fast.rms_norm``, two
    ``fast.rope``. The kernel must match it bit for bit (tests/test_kernel_gpu.py)."""
    b = x.shape[0]
    outs = []
    for (w, s, bias), heads in zip(ws, (layout.n_heads, layout.n_kv_heads, layout.n_kv_heads),
                                   strict=True):
        y = mx.quantized_matmul(x, w, s, bias, transpose=True, group_size=layout.group_size,
                                bits=layout.bits)
        outs.append(y.reshape(b, 1, heads, layout.head_dim))
    q, k, v = outs
    q = mx.fast.rms_norm(q, norms[0], layout.eps).transpose(0, 2, 1, 3)
    k = mx.fast.rms_norm(k, norms[1], layout.eps).transpose(0, 2, 1, 3)
    rope = dict(dims=layout.head_dim, traditional=False, base=layout.rope_base, scale=1.0,
                offset=offset)
    return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v.transpose(0, 2, 1, 3)


@functools.cache
def composite(layout: QKVLayout):
    """The same ops over the concatenated QKV weight, under one ``mx.compile`` (compiled once per
    layout): fewer Python → C++ crossings, the same GPU work and rounding as the graph path."""
    h, kv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim

    def qkv_norm_rope_composite(x, w, scales, biases, q_norm, k_norm, offset):
        b = x.shape[0]
        qkv = mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                  group_size=layout.group_size, bits=layout.bits)
        q, k, v = mx.split(qkv, [h * d, (h + kv) * d], axis=-1)
        q = mx.fast.rms_norm(q.reshape(b, 1, h, d), q_norm, layout.eps).transpose(0, 2, 1, 3)
        k = mx.fast.rms_norm(k.reshape(b, 1, kv, d), k_norm, layout.eps).transpose(0, 2, 1, 3)
        v = v.reshape(b, 1, kv, d).transpose(0, 2, 1, 3)
        rope = functools.partial(mx.fast.rope, dims=d, traditional=False,
                                 base=layout.rope_base, scale=1.0, offset=offset)
        return rope(q), rope(k), v

    return mx.compile(qkv_norm_rope_composite)


# --- the kernel ----------------------------------------------------------------------------------


def has_kernel(backend: str) -> bool:
    return backend in ("cuda", "metal")


def kernel_blocker(backend: str, layout: QKVLayout, dtype: mx.Dtype) -> str | None:
    """Why the kernel cannot run this layer here (then ``composite`` runs), or None."""
    if not has_kernel(backend):
        return f"no fused kernel for backend {backend} (kernels exist for cuda and metal)"
    if dtype not in (mx.bfloat16, mx.float16):
        return f"activation dtype {dtype} (the kernel takes bfloat16 or float16)"
    if layout.head_dim not in HEAD_DIMS:
        return f"head_dim {layout.head_dim} (the kernel takes {HEAD_DIMS})"
    if layout.bits not in (4, 8) or layout.group_size not in (32, 64, 128):
        return f"{layout.bits}-bit group {layout.group_size} (the kernel takes 4/8-bit, 32/64/128)"
    if layout.hidden % 16 or layout.hidden > MAX_HIDDEN:
        return f"hidden size {layout.hidden} (a multiple of 16 up to {MAX_HIDDEN})"
    return None


DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16"}


@functools.cache
def _cuda_kernel(eps: float, log2_base: float, launch_only: bool):
    return mx.fast.cuda_kernel(
        name=kernel_name(eps, log2_base, launch_only),
        input_names=list(CUDA_INPUTS),
        output_names=list(CUDA_OUTPUTS),
        source="" if launch_only else CUDA_SOURCE,
        header=cuda_header(eps, log2_base),
    )


@functools.cache
def _metal_kernel(eps: float, log2_base: float, launch_only: bool):
    header = (f"constant constexpr float EPS = {float_literal(eps)};\n"
              f"constant constexpr float LOG2_BASE = {float_literal(log2_base)};\n")
    return mx.fast.metal_kernel(
        name=kernel_name(eps, log2_base, launch_only),
        input_names=["x", "w", "scales", "biases", "q_norm", "k_norm", "positions"],
        output_names=["q_out", "k_out", "v_out"],
        source="" if launch_only else METAL_SOURCE,
        header=header,
    )


def decode_call(kernel: QKVNormRope):
    """How a decode step calls one layer's kernel. Under mx.compile a call replays its traced
    graph instead of building the custom kernel's primitive again: 7-15% off the kernel block on
    the H100, same bits (docs/perf-log.md). The C++ primitive is built once already: direct."""
    return kernel if kernel.call == "primitive" else mx.compile(kernel.__call__)


def new_counters(layout: QKVLayout) -> mx.array:
    """Zeroed per-head counters for the last-block pattern. Each launch leaves them at zero, so
    one array serves every step of one layer; two launches that may run concurrently (MLX's CUDA
    graphs run independent nodes side by side) must not share one, hence one array per layer."""
    counters = mx.zeros((MAX_BATCH * (layout.n_heads + layout.n_kv_heads),), dtype=mx.uint32)
    mx.eval(counters)
    return counters


class QKVNormRope:
    """The kernel for one layer layout and activation dtype, with every per-call argument that
    does not depend on the batch size computed once (a decode step calls it once per layer).

    ``call`` (CUDA only) is how it is launched: ``primitive`` or ``cuda_kernel``, as
    ``fusedqk.toggle.kernel_call`` decided. ``launch_only`` gives the same launch (inputs,
    outputs, grid, block) with an empty body: what
    one launch per layer costs on this machine whatever the kernel does, the launch floor that
    ``fusedqk blockbench`` reports beside the kernel.
    """

    def __init__(self, layout: QKVLayout, dtype: mx.Dtype, backend: str,
                 launch_only: bool = False, call: str | None = None):
        h, kv = layout.n_heads, layout.n_kv_heads
        self.layout, self.dtype, self.cuda = layout, dtype, backend == "cuda"
        shape = shape_constants(layout)
        log2_base = math.log2(layout.rope_base)
        self.call, self._primitive, self._poisoned = "metal_kernel", None, None
        self._cache_writer = None  # the cache-writing variant (C++ primitive only)
        if self.cuda:
            self.kernel = _cuda_kernel(layout.eps, log2_base, launch_only)
            self.template = [("T", dtype), *shape]
            self.grid_x = layout.rows // (WARPS * ROWS_PER_WARP) * WARPS * 32
            self.threads = WARPS * 32
            self.n_outputs = 4
            if call not in ("primitive", "cuda_kernel"):
                raise ValueError(f"call {call!r}: the CUDA kernel is called as 'primitive' or "
                                 "'cuda_kernel' (fusedqk.toggle.kernel_call decides which)")
            self.call = call
            if self.call == "primitive":
                self._primitive_args = self._primitive_spec(launch_only)
                self._primitive = cuda_ext.require().Kernel(*self._primitive_args)
                if not launch_only:
                    self._cache_writer = cuda_ext.require().Kernel(
                        *self._primitive_spec(launch_only, writes_cache=True), writes_cache=True)
        else:
            self.kernel = _metal_kernel(layout.eps, log2_base, launch_only)
            # The Metal body has no rows-per-warp constant: a threadgroup per head.
            self.template = [("T", dtype), *(c for c in shape if c[0] != "RPW")]
            self.grid_x, self.threads = (h + 2 * kv) * 256, 256
            self.n_outputs = 3
        self._shapes: dict[int, list[tuple[int, ...]]] = {}

    def _primitive_spec(self, launch_only: bool, writes_cache: bool = False) -> tuple:
        """The extension Kernel's arguments: name, source, grid x in blocks, threads per block,
        the largest batch, the output shapes after the batch axis, the dtype."""
        h, kv, d = self.layout.n_heads, self.layout.n_kv_heads, self.layout.head_dim
        name, source = translation_unit(self.layout, DTYPE_NAMES[self.dtype], launch_only,
                                        writes_cache)
        tails = [[h, 1, d], [kv, 1, d], [kv, 1, d], [(h + kv) * d]]
        return (name, source, self.grid_x // self.threads, self.threads, MAX_BATCH, tails,
                DTYPE_NAMES[self.dtype])

    def _out_shapes(self, b: int) -> list[tuple[int, ...]]:
        if b not in self._shapes:
            h, kv, d = self.layout.n_heads, self.layout.n_kv_heads, self.layout.head_dim
            self._shapes[b] = [(b, h, 1, d), (b, kv, 1, d), (b, kv, 1, d), (b, (h + kv) * d)]
        return self._shapes[b][: self.n_outputs]

    def __call__(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                 q_norm: mx.array, k_norm: mx.array, positions: mx.array, counters: mx.array,
                 poison: bool = False) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, H, 1, D), k and v (B, KV, 1, D) for x (B, 1, K) at ``positions`` (B,) int32.

        ``counters`` comes from ``new_counters`` (the Metal version needs none). ``poison`` fills
        the outputs with NaN before the launch (tests use it to catch unwritten elements).
        """
        b = x.shape[0]
        if b > MAX_BATCH:
            raise ValueError(f"the fused kernel takes batch <= {MAX_BATCH}, got {b}")
        inputs = [x, w, scales, biases, q_norm, k_norm, positions]
        if self.cuda:
            inputs.append(counters)
        if self._primitive is not None:
            if poison and self._poisoned is None:
                self._poisoned = cuda_ext.require().Kernel(*self._primitive_args, poison=True)
            outs = (self._poisoned if poison else self._primitive)(inputs)
            return outs[0], outs[1], outs[2]
        outs = self.kernel(
            inputs=inputs, template=self.template, grid=(self.grid_x, b, 1),
            threadgroup=(self.threads, 1, 1), output_shapes=self._out_shapes(b),
            output_dtypes=[self.dtype] * self.n_outputs,
            init_value=float("nan") if poison else None,
        )
        return outs[0], outs[1], outs[2]

    @property
    def writes_cache(self) -> bool:
        """Whether ``with_cache`` is available here (through the C++ primitive only)."""
        return self._cache_writer is not None

    def with_cache(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                   q_norm: mx.array, k_norm: mx.array, positions: mx.array, counters: mx.array,
                   keys: mx.array, values: mx.array, length: int
                   ) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, H, 1, D), with this step's k and v written into the cache buffers ``keys`` and
        ``values`` (B, KV, S, D) at ``positions``, and the views of the buffers' first
        ``length`` positions that attention reads. The write is in place: the caller must own
        the buffers (``fusedqk.attention.CacheWriter``)."""
        return tuple(self._cache_writer.with_cache(
            [x, w, scales, biases, q_norm, k_norm, positions, counters, keys, values], length))
