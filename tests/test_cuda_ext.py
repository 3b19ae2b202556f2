"""The optional C++ primitive where it is absent (every CPU machine, and CUDA machines that did
not build it): a clean fallback to mx.fast.cuda_kernel with the reason, one-line errors for what
cannot be had, and the source it would compile."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import pytest

from fusedqk.cli import main
from fusedqk.errors import UserError
from fusedqk.kernels import cuda_ext, qkv_norm_rope
from fusedqk.kernels.cuda_source import CUDA_SOURCE, QKVLayout, translation_unit
from fusedqk.toggle import kernel_call

BUILT = cuda_ext.load()[0] is not None
absent = pytest.mark.skipif(BUILT, reason="the extension is built here")


@absent
def test_absent_extension_falls_back_to_cuda_kernel_with_the_reason():
    assert cuda_ext.load() == (None, "not built (`fusedqk build-ext` builds it, no GPU needed; "
                                     "the cuda image carries it)")
    call, why = kernel_call("cuda", {})
    assert call == "cuda_kernel" and "not built" in why
    assert kernel_call("cuda", {"FUSEDQK_KERNEL_CALL": "cuda_kernel"})[0] == "cuda_kernel"


@absent
def test_asking_for_the_absent_primitive_is_one_line():
    with pytest.raises(UserError, match="FUSEDQK_KERNEL_CALL=primitive: the extension is "
                                        "unavailable: not built"):
        kernel_call("cuda", {"FUSEDQK_KERNEL_CALL": "primitive"})
    with pytest.raises(UserError, match="unavailable"):
        cuda_ext.require()


def test_the_kernel_is_told_its_call_and_never_reads_the_environment():
    # The kernel module does not import toggle (the policy room) nor os; toggle tells it.
    source = Path(qkv_norm_rope.__file__).read_text()
    assert "from fusedqk.toggle" not in source and "import os" not in source and "environ" not in source
    assert kernel_call("metal")[0] == "metal_kernel" and kernel_call("cpu")[0] is None


@pytest.mark.parametrize("value", ["fast", "", "kernel"])
def test_unknown_kernel_call_names_the_variable_and_the_accepted_values(value):
    with pytest.raises(UserError, match=r"FUSEDQK_KERNEL_CALL=.* is not accepted; use one of "
                                        "auto, primitive, cuda_kernel"):
        kernel_call("cuda", {"FUSEDQK_KERNEL_CALL": value})


def test_build_ext_without_mlx_cuda_headers_is_one_line(tmp_path, capsys):
    code = main(["build-ext", "--mlx-root", str(tmp_path), "--build-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--mlx-root" in err[0] and "no MLX CUDA headers" in err[0]
    assert not (tmp_path / "b").exists()


def test_translation_unit_is_the_kernel_mx_fast_cuda_kernel_builds():
    layout = QKVLayout(hidden=1024, n_heads=16, n_kv_heads=8, head_dim=128, eps=1e-6, bits=4,
                       group_size=64, rope_base=1e6)
    name, source = translation_unit(layout, "bfloat16")
    assert name.startswith("mlx::core::cu::fusedqk_qkv_norm_rope_") and "bfloat16_1024_16_8" in name
    assert CUDA_SOURCE in source and "constexpr float EPS = " in source
    signature = re.search(r"__global__ void (\w+)\(([^)]*)\)", source)
    assert signature.group(1) == name.split("::")[-1]
    order = [p.split()[-1] for p in signature.group(2).split(",")]
    assert order == ["x", "w", "scales", "biases", "q_norm", "k_norm", "positions", "counters",
                     "q_out", "k_out", "v_out", "proj"]
    assert "using T = __nv_bfloat16;" in source and "constexpr int NQK = 3072;" in source
    empty_name, empty = translation_unit(layout, "bfloat16", launch_only=True)
    assert empty_name != name and CUDA_SOURCE not in empty
    # Another layout or dtype is another kernel: names never collide in the compile cache.
    assert translation_unit(layout, "float16")[0] != name
    assert qkv_norm_rope.DTYPE_NAMES[mx.float16] == "float16"


def test_every_launch_of_the_kernel_agrees_on_max_batch(monkeypatch):
    """MAX_BATCH is the one limit: the counters are sized by it, the primitive's specs (plain,
    cache-writing, poisoned) are given it, and a larger batch is refused before any launch."""
    import mlx.core as mx

    from fusedqk.kernels import qkv_norm_rope

    specs = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            specs.append(args)

        def __call__(self, inputs):
            raise AssertionError("no launch expected")

    monkeypatch.setattr(qkv_norm_rope, "_cuda_kernel", lambda *a: None)
    monkeypatch.setattr(qkv_norm_rope.cuda_ext, "require",
                        lambda: type("Ext", (), {"Kernel": Recorder}))
    layout = qkv_norm_rope.QKVLayout(hidden=1024, n_heads=16, n_kv_heads=8, head_dim=128,
                                     eps=1e-6, bits=4, group_size=64, rope_base=1e6)
    kernel = qkv_norm_rope.QKVNormRope(layout, mx.bfloat16, "cuda", call="primitive")
    counters = qkv_norm_rope.new_counters(layout)
    assert counters.size == qkv_norm_rope.MAX_BATCH * (16 + 8)
    assert len(specs) == 2 and all(spec[4] == qkv_norm_rope.MAX_BATCH for spec in specs)
    x = mx.zeros((qkv_norm_rope.MAX_BATCH + 1, 1, 1024), mx.bfloat16)
    with pytest.raises(ValueError, match=f"batch <= {qkv_norm_rope.MAX_BATCH}"):
        kernel(x, *(None,) * 6, counters)
