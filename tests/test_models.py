"""Model registry, synthetic weights, memory check, local checkpoints."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from fusedqk.decode import generate, make_sampler, random_prompt
from fusedqk.errors import UserError
from fusedqk.models import (
    BITS,
    DTYPES,
    GROUP_SIZES,
    REGISTRY,
    Quantization,
    build_synthetic,
    get_spec,
    load_model,
)
from fusedqk.results import MIN_DISTINCT

PUBLIC = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
          "qwen3-30b-a3b", "qwen3-235b-a22b"]


def test_registry_has_the_public_models_and_tiny_ones():
    assert set(PUBLIC) | {"qwen3-tiny", "qwen3-moe-tiny"} <= set(REGISTRY)
    moe = get_spec("qwen3-30b-a3b").config
    assert (moe["num_experts"], moe["num_experts_per_tok"]) == (128, 8)
    for name in ("qwen3-tiny", "qwen3-moe-tiny"):
        c = get_spec(name).config
        assert c["head_dim"] == 128 and c["num_attention_heads"] > c["num_key_value_heads"]


def test_parameter_counts_match_the_model_cards():
    quant = Quantization()
    assert get_spec("qwen3-0.6b").sizes(quant)[0] == pytest.approx(0.6e9, rel=0.05)
    assert get_spec("qwen3-8b").sizes(quant)[0] == pytest.approx(8.2e9, rel=0.05)
    assert get_spec("qwen3-30b-a3b").sizes(quant)[0] == pytest.approx(30.5e9, rel=0.05)


def _bytes(model):
    return {k: np.array(v.view(mx.uint8) if v.dtype != mx.uint32 else v).tobytes()
            for k, v in tree_flatten(model.parameters())}


def test_synthetic_weights_are_deterministic_in_the_seed():
    spec, quant = get_spec("qwen3-moe-tiny"), Quantization()
    a, b, c = (_bytes(build_synthetic(spec, quant, s)) for s in (3, 3, 4))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_quantization_settings_shape_the_weights():
    m = build_synthetic(get_spec("qwen3-tiny"), Quantization(8, 32, "float16"), 0)
    q = m.layers[0].self_attn.q_proj
    assert (q.bits, q.group_size, q.scales.dtype) == (8, 32, mx.float16)


@pytest.mark.parametrize("bad, match", [(dict(bits=3), "--bits"), (dict(group_size=48), "--group-size"),
                                        (dict(dtype="float64"), "--dtype"), (dict(dtype="auto"), "--dtype")])
def test_bad_quantization_is_a_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        Quantization(**bad)


# Every pair of (bits, group size, dtype) values in nine combinations, not all eighteen: the
# CPU decodes the tiny models at ~10 tok/s in bfloat16 and float16, and each combination loads
# and quantizes anew.
PAIRWISE = [(4, 32, "bfloat16"), (4, 32, "float16"), (8, 32, "float32"),
            (4, 64, "bfloat16"), (4, 64, "float16"), (8, 64, "float32"),
            (8, 128, "bfloat16"), (8, 128, "float16"), (4, 128, "float32")]


def test_the_pairwise_quantizations_cover_every_pair():
    for i, j in itertools.combinations(range(3), 2):
        values = (BITS, GROUP_SIZES, tuple(DTYPES))
        assert {(c[i], c[j]) for c in PAIRWISE} == set(itertools.product(values[i], values[j]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
@pytest.mark.parametrize("bits, group_size, dtype", PAIRWISE)
def test_greedy_decoding_is_not_degenerate(name, bits, group_size, dtype):
    # Identity over near-constant text is weak evidence (decision.min_distinct): the synthetic
    # weights must decode varied text at every quantization (the seed models: docs/perf-log.md).
    lm = load_model(name, Quantization(bits, group_size, dtype), 0)
    prompt = random_prompt(lm.config["vocab_size"], 16, 0)
    tokens = generate(lm.model, prompt, 16, make_sampler(0.0, 0)).tokens
    assert len(set(tokens)) >= MIN_DISTINCT, tokens


def test_memory_check_fails_before_allocating():
    before = mx.get_active_memory()
    with pytest.raises(UserError, match=r"needs \d+\.\d GiB .* free"):
        load_model("qwen3-235b-a22b", Quantization(), 0)
    assert mx.get_active_memory() - before < 1 << 20


def save_checkpoint(loaded, path, quant) -> None:
    """``loaded`` as an MLX-format checkpoint, written by mlx-lm itself (what a user's local
    checkpoint is)."""
    from mlx_lm.utils import save_config, save_model

    path.mkdir(parents=True, exist_ok=True)
    save_model(path, loaded.model)
    config = dict(loaded.config)
    config["quantization"] = {"group_size": quant.group_size, "bits": quant.bits, "mode": "affine"}
    config["torch_dtype"] = quant.dtype
    save_config(config, config_path=path / "config.json")


@pytest.mark.slow
def test_local_checkpoint_round_trip(tmp_path):
    quant = Quantization()
    original = load_model("qwen3-tiny", quant, 5)
    save_checkpoint(original, tmp_path / "ckpt", quant)
    loaded = load_model(str(tmp_path / "ckpt"), quant)
    assert loaded.source == str(tmp_path / "ckpt")
    prompt = random_prompt(original.config["vocab_size"], 8, 1)
    greedy = make_sampler(0.0, 0)
    assert generate(original.model, prompt, 16, greedy).tokens == generate(
        loaded.model, prompt, 16, greedy).tokens


def test_hub_ids_and_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match=r"hub id.*offline"):
        load_model("Qwen/Qwen3-0.6B", Quantization())
    with pytest.raises(UserError, match="neither a registry name"):
        load_model(str(tmp_path / "missing"), Quantization())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"), Quantization())


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
@pytest.mark.parametrize("bavail, favail, needle", [
    (50 << 8, 10_000, "left free beside it; 50.0 MiB are free there"),  # 4 KiB blocks
    (1 << 20, 0, "0 free inodes (4.0 GiB free bytes do not help)"),
])
def test_an_export_that_cannot_fit_says_which_room_is_missing(fmt, bavail, favail, needle,
                                                              tmp_path, monkeypatch):
    """Out of bytes: the need and the headroom kept, so 50 MiB free is not read as enough for
    8 MiB; out of inodes: the inodes, not the bytes. Nothing is written either way."""
    import os

    from fusedqk.export import export
    from fusedqk.gguf_export import export_gguf

    real = os.statvfs
    fake = os.statvfs_result((4096, 4096, 1 << 21, bavail, bavail, 100_000, favail, favail, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: fake if str(path).startswith(str(tmp_path))
                        else real(path))
    write = export if fmt == "mlx" else export_gguf
    out = tmp_path / ("ckpt" if fmt == "mlx" else "m.gguf")
    with pytest.raises(UserError, match=r"needs|inodes") as refused:
        write("qwen3-tiny", out, Quantization(), 0)
    assert needle in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
