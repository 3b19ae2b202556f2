"""The decode paths: composite is bitwise the graph path; every fallback to graph is real."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache

from fusedqk.attention import DecodePaths, FusedQKNormAttention, fusion_blocker
from fusedqk.decode import generate, make_sampler, random_prompt, teacher_forced_logits
from fusedqk.errors import UserError
from fusedqk.models import get_spec


@pytest.mark.slow
def test_composite_tokens_and_logits_equal_graph(tiny):
    vocab = tiny.loaded.config["vocab_size"]
    out = {}
    for path in ("graph", "composite"):
        tiny.paths.use(path)
        seq = random_prompt(vocab, 40, 3)
        logits = mx.stack(teacher_forced_logits(tiny.loaded.model, seq, 8))
        tokens = generate(tiny.loaded.model, random_prompt(vocab, 8, 4), 32, make_sampler(0.0, 0)).tokens
        out[path] = (logits, tokens)
    tiny.paths.use("graph")
    assert out["graph"][1] == out["composite"][1]
    assert mx.array_equal(out["graph"][0], out["composite"][0]).item()


def test_fused_modules_are_installed_and_swapped(dense_tiny):
    paths = dense_tiny.paths
    assert paths.report.fused_layers == len(paths.layers) and not paths.report.blockers
    paths.use("composite")
    assert all(isinstance(layer.self_attn, FusedQKNormAttention) for layer in paths.layers)
    paths.use("graph")
    assert not any(isinstance(layer.self_attn, FusedQKNormAttention) for layer in paths.layers)


def test_step_inputs_are_the_modules_own_arrays_outside_its_dict(dense_tiny):
    """A fused layer reads its per-step inputs from one plain object (StepInputs): the same
    arrays as its parameters, held as an ordinary attribute, not in nn.Module's dict (which
    Python searches only after its own lookup fails)."""
    fused = next(m for m in dense_tiny.paths.fused if isinstance(m, FusedQKNormAttention))
    a = fused.graph_attn
    own = (fused.qkv_weight, fused.qkv_scales, fused.qkv_biases, a.q_norm.weight,
           a.k_norm.weight)
    assert all(s is o for s, o in zip(fused._step.weights, own, strict=True))
    x = mx.zeros((2, 1, fused.layout.hidden), dtype=mx.bfloat16)
    inputs = fused.kernel_inputs(x, 5)
    assert inputs[0] is x and inputs[-2].tolist() == [5, 5] and inputs[-1] is None  # no kernel on cpu
    assert "_step" not in fused and "_step" in vars(fused)


def test_prefill_takes_the_graph_path(dense_tiny, monkeypatch):
    """L > 1 must never reach the fused call; L == 1 must."""
    calls = []
    monkeypatch.setattr(FusedQKNormAttention, "qkv", lambda self, x, off: calls.append(x.shape))
    paths = dense_tiny.paths
    paths.use("composite")
    try:
        cache = make_prompt_cache(dense_tiny.loaded.model)
        dense_tiny.loaded.model(mx.array([[1, 2, 3, 4]]), cache=cache)
        assert calls == []
        with pytest.raises(TypeError):  # the stub returns None: reached on decode
            dense_tiny.loaded.model(mx.array([[5]]), cache=cache)
        assert calls and calls[0][1] == 1
    finally:
        paths.use("graph")


def test_unquantized_weights_keep_the_graph_path():
    model = get_spec("qwen3-tiny").skeleton()  # no quantization
    assert "not quantized" in fusion_blocker(model.layers[0].self_attn)
    paths = DecodePaths(model, "cpu")
    assert paths.report.fused_layers == 0 and paths.report.graph_layers == len(model.layers)


def test_rope_scaling_keeps_the_graph_path():
    model = get_spec("qwen3-tiny").skeleton()
    nn.quantize(model, group_size=64, bits=4)
    attn = model.layers[0].self_attn
    attn.rope = nn.RoPE(128, traditional=False, base=1e6, scale=0.5)  # linear scaling
    assert "RoPE" in fusion_blocker(attn)
    attn.rope = nn.RoPE(128, traditional=True, base=1e6)
    assert "RoPE" in fusion_blocker(attn)


def test_kernel_on_cpu_is_a_clear_error(dense_tiny):
    with pytest.raises(UserError, match="no cpu version"):
        dense_tiny.paths.use("kernel")
    assert "no fused kernel for backend cpu" in dense_tiny.paths.report.kernel_fallback


def test_each_path_names_what_it_runs_as_here():
    from fusedqk.attention import InstallReport

    everything = InstallReport(28, 0, [], None, "primitive")
    assert [everything.runs_as(p) for p in ("kernel_kv", "kernel", "composite")] == [
        ("kernel_kv", None), ("kernel", None), ("composite", None)]
    no_primitive = InstallReport(28, 0, [], None, "cuda_kernel", cache_fallback="needs it")
    assert no_primitive.runs_as("kernel_kv") == ("kernel", "needs it")
    assert no_primitive.runs_as("kernel") == ("kernel", None)
    no_kernel = InstallReport(28, 0, [], "no kernel", None, cache_fallback="no kernel")
    assert no_kernel.runs_as("kernel_kv") == ("composite", "no kernel")
