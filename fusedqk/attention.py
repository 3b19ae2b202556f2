"""Attention dispatch for Qwen3 / Qwen3-MoE decode: the graph path, or the fused path.

``graph`` is mlx-lm's attention module as shipped. ``fused`` wraps it: on a decode step (one
token per sequence) with affine-quantized q/k/v it replaces q_proj, k_proj, v_proj, the reshapes,
q_norm, k_norm, the transposes and RoPE with one call over a QKV weight concatenated at install
time, and again after any of its source weights is replaced (``WeightWatch``). Its parameters
are the graph module's own, under the same names, so saving, loading and updating a fused model
is doing so to the graph one. The call is either

- ``composite``: the same MLX ops as the graph path under one ``mx.compile`` (fewer Python → C++
  crossings, the same GPU work), on every backend; or
- ``kernel``: one custom GPU kernel per layer (``fusedqk.kernels.qkv_norm_rope``); or
- ``kernel_kv``: the same kernel, through the C++ primitive, also writing k and v into the
  layer's mlx-lm ``KVCache`` and returning the cache views attention reads (``CacheWriter``),
  which removes the cache's two slice updates and two slices per layer. Where the primitive is
  absent, or the cache is not a plain ``KVCache``, it runs as ``kernel``.

All round where the graph path rounds (projection, norm and RoPE outputs in the activation
dtype). Everything after RoPE (SDPA, o_proj; the KV cache except on ``kernel_kv``) is mlx-lm's
own code path, unchanged.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from fusedqk.errors import UserError
from fusedqk.kernels import qkv_norm_rope
from fusedqk.kernels.qkv_norm_rope import QKVLayout
from fusedqk.toggle import KERNEL_PATHS

log = logging.getLogger("fusedqk")

PATHS = ("graph", "composite", *KERNEL_PATHS)


def fusion_blocker(attn: nn.Module) -> str | None:
    """Why this attention layer must stay on the graph path, or None when it can be fused."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not all(isinstance(p, nn.QuantizedLinear) for p in projs):
        return "q/k/v projections are not quantized (the fused path is for quantized weights)"
    if any(p.mode != "affine" for p in projs):
        return "q/k/v quantization mode is not affine"
    if len({(p.bits, p.group_size) for p in projs}) != 1:
        return "q/k/v projections use different bits or group sizes"
    if any("bias" in p for p in projs):
        return "q/k/v projections have a bias"
    rope = attn.rope
    if type(rope) is not nn.RoPE or rope.traditional or rope.scale != 1.0:
        return f"RoPE variant {type(rope).__name__} (scaling or traditional) is not fused"
    if rope.dims != attn.q_norm.weight.shape[0]:
        return "partial RoPE (dims != head_dim) is not fused"
    return None


def x_dims(proj: nn.QuantizedLinear) -> int:
    """Input features of a quantized linear layer (its packed weight is (out, in * bits / 32))."""
    return proj.weight.shape[1] * 32 // proj.bits


@functools.lru_cache(maxsize=16)
def _position_array(offset: int, batch: int | None) -> mx.array:
    """The step's position as an array (a scalar, or one per sequence for the kernel). Cached so
    every layer of a step shares one small host-to-device array."""
    # Built from host values: no device kernel runs to make it.
    return mx.array(offset if batch is None else [offset] * batch, dtype=mx.int32)


@dataclass(slots=True)
class StepInputs:
    """What every decode step passes to a layer's call besides x and the position, gathered once.

    A plain object, not a tuple: nn.Module keeps arrays and tuples in its dict and finds them
    only after Python's own lookup fails: on a 2-core EPYC host (2026-12-01) one layer's kernel
    inputs took 16.5 µs to gather through the module's attributes, 0.9 µs from here."""

    weights: tuple[mx.array, ...] | None  # qkv weight, scales, biases, q_norm and k_norm
    # weights; None once a source weight was replaced, until the next call gathers them again
    counters: mx.array | None  # the CUDA kernel's per-head counters (new_counters)
    signature: tuple  # the weights' shapes and dtypes at install: what the kernel was built for


def _signature(weights: tuple[mx.array, ...]) -> tuple:
    return tuple((w.shape, w.dtype) for w in weights)


class WeightWatch:
    """Tells fused layers when a weight they read is replaced, at no cost per decode step.

    Every way of replacing a module's array (``Module.update``, ``load_weights``, plain
    assignment) writes through the module's ``__setitem__`` (nn.Module is a dict). A watched
    module's class becomes a subclass of its own whose ``__setitem__`` also calls the module's
    listeners; nothing else about it changes (its type still passes ``isinstance``)."""

    _subclasses: ClassVar[dict[type, type]] = {}

    @classmethod
    def watch(cls, module: nn.Module, listener) -> None:
        if not getattr(type(module), "_fusedqk_watched", False):
            base = type(module)
            sub = cls._subclasses.get(base)
            if sub is None:
                sub = type(base.__name__, (base,), {"_fusedqk_watched": True,
                                                    "__setitem__": cls._setitem,
                                                    "__module__": base.__module__})
                cls._subclasses[base] = sub
            module.__class__ = sub
        # An object attribute, outside the module's dict: never a parameter.
        listeners = vars(module).setdefault("_fusedqk_listeners", [])
        listeners.append(listener)

    @staticmethod
    def _setitem(module: nn.Module, key: str, value) -> None:
        dict.__setitem__(module, key, value)
        for listener in vars(module).get("_fusedqk_listeners", ()):
            listener()


class CacheWriter:
    """The KV caches that ``kernel_kv`` writes into in place, and the rule that keeps it safe.

    The kernel writes a step's k and v at position ``offset`` of the cache's buffers without
    making new arrays (MLX's SliceUpdate could donate the buffer, but a primitive with several
    outputs never sees its inputs as donatable). That is safe for a buffer this writer made:
    a cache only appends, so no view handed out before covers the position written. A buffer
    the writer did not make (the prefill's, a copied or trimmed cache's) is copied once into
    one it owns first; growth follows ``KVCache.update_and_fetch`` (whole steps of
    ``KVCache.step`` positions), so the buffers are shaped as mlx-lm would shape them.
    """

    def __init__(self) -> None:
        # cache -> (its key buffer and value buffer as this writer left them, the offset then)
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def room_for_one(self, cache: KVCache, batch: int, kv_heads: int, head_dim: int,
                     dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """Buffers this writer owns with room for position ``cache.offset``, set on the cache."""
        prev = cache.offset
        owned = self._owned.get(cache)
        mine = owned is not None and owned[0] is cache.keys and owned[1] is cache.values \
            and owned[2] == prev
        if not mine or prev + 1 > cache.keys.shape[2]:
            capacity = 0 if cache.keys is None else cache.keys.shape[2]
            if prev + 1 > capacity:  # mlx-lm grows a full cache by one step
                capacity = prev + cache.step
            shape = (batch, kv_heads, capacity - prev, head_dim)
            if prev == 0:
                cache.keys, cache.values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
            else:
                # A new buffer: the positions so far, then zeros (as mlx-lm's growth pads).
                cache.keys = mx.concatenate([cache.keys[..., :prev, :], mx.zeros(shape, dtype)],
                                            axis=2)
                cache.values = mx.concatenate(
                    [cache.values[..., :prev, :], mx.zeros(shape, dtype)], axis=2)
        return cache.keys, cache.values

    def wrote_one(self, cache: KVCache) -> None:
        cache.offset += 1
        self._owned[cache] = (cache.keys, cache.values, cache.offset)


CACHE_WRITER = CacheWriter()


class FusedQKNormAttention(nn.Module):
    """mlx-lm's attention with the decode-step q/k/v + norm + RoPE block replaced by one call."""

    def __init__(self, graph_attn: nn.Module, impl: str, backend: str,
                 kernel_call: str | None = None):
        super().__init__()
        # The graph module's children (q_proj, ..., rope) are this module's too, the same
        # objects under the same names: parameters, save_weights and load_weights see the model
        # as unpatched. The graph module itself is kept outside the dict (not a second child).
        for key, value in graph_attn.items():
            self[key] = value
        object.__setattr__(self, "_graph_attn", graph_attn)
        q = graph_attn.q_proj
        self.layout = QKVLayout(
            hidden=x_dims(q), n_heads=graph_attn.n_heads, n_kv_heads=graph_attn.n_kv_heads,
            head_dim=graph_attn.q_norm.weight.shape[0], eps=graph_attn.q_norm.eps,
            bits=q.bits, group_size=q.group_size, rope_base=float(graph_attn.rope.base),
        )
        self.impl = impl
        # Underscores: kernel state, not parameters (nn.Module skips such names).
        self._kernel = None
        self._with_cache = None  # the cache-writing call, where the C++ primitive has one
        self.kernel_call: str | None = None
        if qkv_norm_rope.kernel_blocker(backend, self.layout, q.scales.dtype) is None:
            kernel = qkv_norm_rope.QKVNormRope(self.layout, q.scales.dtype, backend,
                                               call=kernel_call)
            self._kernel = qkv_norm_rope.decode_call(kernel)
            self._with_cache = kernel.with_cache if kernel.writes_cache else None
            self.kernel_call = kernel.call
        weights = self._gather()
        self._step = StepInputs(
            weights, qkv_norm_rope.new_counters(self.layout) if self._kernel is not None
            else None, _signature(weights))
        stale = weakref.WeakMethod(self._weights_replaced)
        for source in (graph_attn.q_proj, graph_attn.k_proj, graph_attn.v_proj,
                       graph_attn.q_norm, graph_attn.k_norm):
            WeightWatch.watch(source, lambda: (m := stale()) is not None and m())

    @property
    def graph_attn(self) -> nn.Module:
        """mlx-lm's attention module this one fuses (prefill and large batches run it)."""
        return self._graph_attn

    def _gather(self) -> tuple[mx.array, ...]:
        """The fused call's weights: q, k and v's codes, scales and biases concatenated, then
        the two norm weights, all as the graph module has them now."""
        a = self._graph_attn
        q, k, v = a.q_proj, a.k_proj, a.v_proj
        return (mx.concatenate([q.weight, k.weight, v.weight], axis=0),
                mx.concatenate([q.scales, k.scales, v.scales], axis=0),
                mx.concatenate([q.biases, k.biases, v.biases], axis=0),
                a.q_norm.weight, a.k_norm.weight)

    def _weights_replaced(self) -> None:
        self._step.weights = None  # gathered again at the next call

    def _weights(self) -> tuple[mx.array, ...]:
        weights = self._step.weights
        if weights is None:
            weights = self._gather()
            if _signature(weights) != self._step.signature:
                raise UserError("a fused layer's q/k/v or norm weight changed shape or dtype "
                                "after patching; patch the model after loading its weights")
            self._step.weights = weights
        return weights

    @property
    def qkv_weight(self) -> mx.array:
        return self._weights()[0]

    @property
    def qkv_scales(self) -> mx.array:
        return self._weights()[1]

    @property
    def qkv_biases(self) -> mx.array:
        return self._weights()[2]

    @property
    def kernel_ready(self) -> bool:
        """The kernel covers this layer on this backend (else ``kernel`` runs as ``composite``)."""
        return self._kernel is not None

    @property
    def writes_cache(self) -> bool:
        """``kernel_kv`` writes the cache here (else it runs as ``kernel``)."""
        return self._with_cache is not None

    def kernel_inputs(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        """The kernel's inputs for one decode step at ``offset`` (one position per sequence)."""
        batch = x.shape[0]
        if isinstance(offset, int):
            positions = _position_array(offset, batch)
        else:
            positions = mx.broadcast_to(offset.reshape(-1), (batch,)).astype(mx.int32)
        step = self._step
        return (x, *(step.weights or self._weights()), positions, step.counters)

    def qkv(self, x: mx.array, offset: int | mx.array,
            impl: str | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, H, 1, D), k and v (B, KV, 1, D) for one decode step at position ``offset``, by
        ``impl`` (default: the module's own; blockbench times both in turn)."""
        if (impl or self.impl) in KERNEL_PATHS:
            return self._kernel(*self.kernel_inputs(x, offset))
        if isinstance(offset, int):
            offset = _position_array(offset, None)
        return qkv_norm_rope.composite(self.layout)(x, *self._weights(), offset)

    def qkv_written(self, x: mx.array, offset: int, keys: mx.array,
                    values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q (B, H, 1, D) for a decode step at ``offset``, with k and v written in place into
        the buffers ``keys`` and ``values`` (B, KV, S, D) there, and the views of their first
        ``offset + 1`` positions (kernel_kv's one call; the caller owns the buffers)."""
        return self._with_cache(*self.kernel_inputs(x, offset), keys, values, offset + 1)

    def qkv_into_cache(self, x: mx.array, cache: KVCache) -> tuple[mx.array, mx.array, mx.array]:
        """One decode step's q with k and v written into ``cache`` by the kernel itself, and
        the cache's views attention reads (``kernel_kv``)."""
        layout, offset = self.layout, cache.offset
        keys, values = CACHE_WRITER.room_for_one(cache, x.shape[0], layout.n_kv_heads,
                                                 layout.head_dim, x.dtype)
        out = self.qkv_written(x, offset, keys, values)
        CACHE_WRITER.wrote_one(cache)
        return out

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        if L != 1 or (self.impl in KERNEL_PATHS and B > qkv_norm_rope.MAX_BATCH):
            # Prefill (L > 1) takes the graph path (the fused call is a decode mat-vec), and so
            # does a decode batch beyond the kernel's largest, where MLX's own projection stops
            # being row by row and no kernel could be bitwise it.
            return self._graph_attn(x, mask, cache)
        a = self._graph_attn
        if self.impl == "kernel_kv" and self.writes_cache and type(cache) is KVCache:
            queries, keys, values = self.qkv_into_cache(x, cache)
        else:
            queries, keys, values = self.qkv(x, cache.offset if cache is not None else 0)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=a.scale, mask=mask
        )
        return a.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def runnable_impl(impl: str, writes_cache: bool, kernel_ready: bool) -> str:
    """What ``impl`` runs as: kernel_kv as kernel where the cache cannot be written (no C++
    primitive), kernel as composite where the kernel does not cover the layer."""
    if impl == "kernel_kv" and not writes_cache:
        impl = "kernel"
    if impl == "kernel" and not kernel_ready:
        impl = "composite"
    return impl


@dataclass
class InstallReport:
    fused_layers: int
    graph_layers: int
    blockers: list[str]
    kernel_fallback: str | None  # why "kernel" runs as "composite" here, if it does
    kernel_call: str | None = None  # how the kernel is called: primitive, cuda_kernel or metal_kernel
    cache_fallback: str | None = None  # why "kernel_kv" runs as "kernel" here, if it does

    def runs_as(self, path: str) -> tuple[str, str | None]:
        """The implementation ``path`` really runs here, and why, where that is another one."""
        impl = runnable_impl(path, not self.cache_fallback, not self.kernel_fallback)
        why = {"kernel": self.cache_fallback, "composite": self.kernel_fallback}.get(impl)
        return impl, (why if impl != path else None)


class DecodePaths:
    """Graph and fused attention installed side by side in one model; ``use`` switches them.

    The fused modules (and their concatenated weights) are built once; switching only swaps each
    layer's ``self_attn`` between mlx-lm's module and its fused wrapper.
    """

    def __init__(self, model: nn.Module, backend: str, kernel_call: str | None = None):
        self.backend = backend
        self.layers = list(model.layers)
        self.graph = [layer.self_attn for layer in self.layers]
        blockers = [fusion_blocker(a) for a in self.graph]
        self.fused = [a if why else FusedQKNormAttention(a, "composite", backend, kernel_call)
                      for a, why in zip(self.graph, blockers, strict=True)]
        fused = [m for m in self.fused if isinstance(m, FusedQKNormAttention)]
        kernel_fallback = None
        if fused:
            dtype = self.graph[0].q_norm.weight.dtype
            kernel_fallback = qkv_norm_rope.kernel_blocker(backend, fused[0].layout, dtype)
        calls = {m.kernel_call for m in fused if m.kernel_call}
        call = calls.pop() if len(calls) == 1 else None
        cache_fallback = None
        if fused and not all(m.writes_cache for m in fused):
            cache_fallback = kernel_fallback or (
                f"the kernel is called through {call or 'no kernel call'}; writing the KV cache "
                "needs the C++ primitive (fusedqk build-ext)")
        self.report = InstallReport(len(fused), len(self.layers) - len(fused),
                                    sorted({b for b in blockers if b}), kernel_fallback, call,
                                    cache_fallback)
        for why in self.report.blockers:
            log.info("graph path kept for some layers: %s", why)
        self.current = "graph"

    def use(self, path: str) -> None:
        """Switch every layer to ``path``: graph, composite, kernel or kernel_kv."""
        if path not in PATHS:
            raise UserError(f"path {path!r} is not accepted; use one of {', '.join(PATHS)}")
        if path in KERNEL_PATHS and not qkv_norm_rope.has_kernel(self.backend):
            raise UserError(f"the kernel implementation has no {self.backend} version (kernels "
                            "exist for cuda and metal); use --impl composite on this backend")
        impl, why = self.report.runs_as(path)
        if why:
            log.warning("%s unavailable, using %s: %s", path, impl, why)
        modules = self.graph if path == "graph" else self.fused
        for layer, attn in zip(self.layers, modules, strict=True):
            layer.self_attn = attn
            if isinstance(attn, FusedQKNormAttention):
                attn.impl = impl
        self.current = path
