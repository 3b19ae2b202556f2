"""kernel_kv on the GPU: the fused call that also writes the KV cache is bitwise the graph path,
logits, greedy tokens and every element of the cache after every step of a 300-step decode that
crosses the cache's growth at 256 positions; and it falls back to kernel where it must.

Skipped (with the reason) where MLX has no CUDA backend or the C++ extension is not built: the
cache-writing call exists only through the primitive. Attention stays on MLX's own kernel, as
in identity: MLX's cuDNN attention, which it takes from a 256-position context, does not
reproduce itself (on the H200 on 2026-12-03 the graph and kernel_kv logits parted 18 steps after
the growth with it on, every cache element still equal).
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
from kernel_cases import concatenated, make_case, ulp_stats
from mlx_lm.models.cache import KVCache, make_prompt_cache

from fusedqk.decode import random_prompt
from fusedqk.engines.builtin import ModelRef, prepare
from fusedqk.identity import MLX_CUDNN_SDPA_ENV
from fusedqk.kernels import cuda_ext, qkv_norm_rope
from fusedqk.kernels.qkv_norm_rope import reference_block

# Read by MLX once, at its first attention call: set before any test here runs a model.
os.environ[MLX_CUDNN_SDPA_ENV] = "0"

EXT, WHY = cuda_ext.load() if mx.cuda.is_available() else (None, "no CUDA backend")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend"),
    pytest.mark.skipif(EXT is None, reason=f"the C++ extension is unavailable: {WHY}"),
]

PROMPT, STEPS = 16, 300  # 16 + 300 positions: the caches grow from 256 to 512 on the way
# (hidden, heads, kv heads, head_dim) of the direct calls: two seed-model layers and one with
# head_dim 64 and a GQA ratio of 4.
KV_SHAPES = {"qwen3-0.6b": (1024, 16, 8, 128), "gqa4-d64": (1024, 16, 4, 64),
             "qwen3-8b-like": (4096, 64, 4, 128)}


@pytest.fixture(scope="module", params=["qwen3-0.6b", "qwen3-30b-a3b"])
def prepared(request, monkeypatch_module):
    monkeypatch_module.setenv("FUSEDQK_KERNEL_CALL", "primitive")
    mx.set_default_device(mx.gpu)
    return prepare(ModelRef(model=request.param, backend="cuda"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def step(prepared, path: str, cache: list, token: mx.array) -> mx.array:
    prepared.paths.use(path)
    logits = prepared.loaded.model(token.reshape(1, -1), cache=cache)[:, -1]
    mx.eval(logits, [(c.keys, c.values) for c in cache])
    return logits


def test_logits_tokens_and_every_cache_element_equal_graph_over_300_steps(prepared):
    assert not prepared.paths.report.cache_fallback
    made = EXT.compilations() + EXT.disk_loads()
    model = prepared.loaded.model
    prompt = random_prompt(prepared.loaded.config["vocab_size"], PROMPT, 5)
    caches = {path: make_prompt_cache(model) for path in ("graph", "kernel_kv")}
    tokens = {path: step(prepared, "graph", caches[path], prompt).argmax(-1) for path in caches}
    grew = False
    for n in range(STEPS):
        logits = {path: step(prepared, path, caches[path], tokens[path]) for path in caches}
        assert mx.array_equal(logits["graph"], logits["kernel_kv"]).item(), f"step {n}: logits"
        tokens = {path: logits[path].argmax(-1) for path in caches}
        assert tokens["graph"].item() == tokens["kernel_kv"].item(), f"step {n}: greedy token"
        for layer, (g, f) in enumerate(zip(caches["graph"], caches["kernel_kv"], strict=True)):
            assert g.offset == f.offset == PROMPT + n + 1
            assert g.keys.shape == f.keys.shape, f"step {n}, layer {layer}: cache shape"
            assert mx.array_equal(g.keys, f.keys).item(), f"step {n}, layer {layer}: keys"
            assert mx.array_equal(g.values, f.values).item(), f"step {n}, layer {layer}: values"
        grew = grew or caches["kernel_kv"][0].keys.shape[2] > KVCache.step
    assert grew
    # Every layer runs the same source: one module for the model (compiled, or loaded from the
    # disk copy), not one per layer.
    assert EXT.compilations() + EXT.disk_loads() - made <= 1
    prepared.paths.use("graph")


def test_a_step_on_kernel_kv_builds_four_nodes_a_layer_fewer_than_kernel(prepared):
    from fusedqk.blockbench import decode_step_nodes

    graph = decode_step_nodes(prepared, "graph")
    fused = decode_step_nodes(prepared, "kernel_kv")
    kernel = decode_step_nodes(prepared, "kernel")
    layers = len(prepared.paths.layers)
    # The kernel path's per-layer cache update is two slice updates and two slices.
    assert kernel - fused == 4 * layers
    assert fused < graph


def test_without_the_primitive_kernel_kv_runs_as_kernel(monkeypatch):
    monkeypatch.setenv("FUSEDQK_KERNEL_CALL", "cuda_kernel")
    mx.set_default_device(mx.gpu)
    other = prepare(ModelRef(model="qwen3-0.6b", backend="cuda"))
    assert "C++ primitive" in other.paths.report.cache_fallback
    other.paths.use("kernel_kv")
    assert all(layer.self_attn.impl == "kernel" for layer in other.paths.layers)


@pytest.mark.parametrize("batch", range(1, qkv_norm_rope.MAX_BATCH + 1))
@pytest.mark.parametrize("shape", ["qwen3-0.6b", "gqa4-d64", "qwen3-8b-like"])
def test_cache_writing_call_at_every_batch_and_at_both_ends_of_the_buffer(shape, batch):
    """The cache-writing call by itself: q, and k and v at the slot, bitwise the graph path's,
    at every batch the kernel takes, at a buffer's first and last position; every other
    position of the buffers keeps what it held."""
    hidden, h, kv, d = KV_SHAPES[shape]
    dtype, size = mx.bfloat16, 256
    layout, x, ws, norms = make_case((hidden, h, kv, d), 4, 64, dtype, batch, seed=batch)
    kernel = qkv_norm_rope.QKVNormRope(layout, dtype, "cuda", call="primitive")
    w, s, bias = concatenated(ws)
    for slot in (0, size - 1):
        q_want, k_want, v_want = reference_block(x, ws, norms, layout, slot)
        def filled(seed: int) -> mx.array:
            return mx.random.normal((batch, kv, size, d), key=mx.random.key(seed)).astype(dtype)

        # The buffers the kernel writes in place, and the same values made again to compare.
        keys, values, before_k, before_v = filled(slot), filled(slot + 1), filled(slot), filled(slot + 1)
        mx.eval(keys, values, before_k, before_v)
        q, kview, vview = kernel.with_cache(
            x, w, s, bias, norms[0], norms[1], mx.full((batch,), slot, dtype=mx.int32),
            qkv_norm_rope.new_counters(layout), keys, values, slot + 1)
        mx.eval(q, kview, vview)
        assert kview.shape == vview.shape == (batch, kv, slot + 1, d)
        for name, got, want in (("q", q, q_want), ("k", kview[..., slot:, :], k_want),
                                ("v", vview[..., slot:, :], v_want)):
            equal, max_ulp = ulp_stats(got, want)
            assert equal == 1.0, f"slot {slot} {name}: {equal:.2%} bitwise equal, max {max_ulp} ulp"
        for name, after, before in (("keys", keys, before_k), ("values", values, before_v)):
            # every position but the slot (MLX indexes with no boolean masks)
            after, before = (mx.concatenate([a[:, :, :slot], a[:, :, slot + 1:]], axis=2)
                             for a in (after, before))
            assert mx.array_equal(after, before).item(), \
                f"slot {slot}: {name} changed away from the slot"


def test_a_decode_batch_beyond_the_kernel_takes_the_graph_path(prepared):
    """Past MAX_BATCH the fused paths hand the step to mlx-lm's own attention: the same logits
    as graph, where the kernel itself could not be bitwise."""
    batch = qkv_norm_rope.MAX_BATCH + 1
    vocab = prepared.loaded.config["vocab_size"]
    prompt = mx.random.randint(0, vocab, (batch, 6), key=mx.random.key(3))
    logits = {}
    for path in ("graph", "kernel", "kernel_kv"):
        cache = make_prompt_cache(prepared.loaded.model)
        prepared.paths.use("graph")
        token = prepared.loaded.model(prompt, cache=cache)[:, -1].argmax(-1)
        prepared.paths.use(path)
        steps = []
        for _ in range(3):
            out = prepared.loaded.model(token.reshape(batch, 1), cache=cache)[:, -1]
            steps.append(out)
            token = out.argmax(-1)
        logits[path] = mx.stack(steps)
        mx.eval(logits[path])
    prepared.paths.use("graph")
    assert mx.array_equal(logits["graph"], logits["kernel"]).item()
    assert mx.array_equal(logits["graph"], logits["kernel_kv"]).item()
