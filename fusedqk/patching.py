"""``fusedqk.patch(model)``: the fused decode path in an mlx-lm Qwen3 / Qwen3-MoE model.

For a model loaded by ``mlx_lm.load``: each attention layer's decode-step q/k/v projection,
q/k RMSNorm and RoPE become one fused call (``fusedqk.attention.FusedQKNormAttention``), the rest
of the model stays mlx-lm's own. The toggle decides, as everywhere in fusedqk:
``FUSEDQK_FUSED_QK_NORM`` (on/off), ``FUSEDQK_FUSED_IMPL`` (kernel/composite/auto), else the
per-backend defaults table (docs/configuration.md). Patching twice changes nothing; a model it
cannot patch is left as it was, and the report says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.nn as nn

from fusedqk.attention import FusedQKNormAttention, fusion_blocker, runnable_impl
from fusedqk.backend import current_backend
from fusedqk.errors import UserError
from fusedqk.kernels.qkv_norm_rope import has_kernel, kernel_blocker
from fusedqk.toggle import kernel_call, resolve

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass
class PatchReport:
    """What ``patch`` did, and why."""

    backend: str
    enabled: bool  # the toggle says the fused path runs
    impl: str | None  # kernel or composite, as installed; None when nothing is fused
    patched: list[int] = field(default_factory=list)  # layer indices now fused (this call or earlier)
    skipped: dict[int, str] = field(default_factory=dict)  # layer index -> why it stays graph
    reason: str = ""
    kernel_fallback: str | None = None  # why the composite runs where the kernel was asked for

    @property
    def is_fused(self) -> bool:
        """The model runs the fused path (patched by this call or an earlier one)."""
        return bool(self.patched)

    def summary(self) -> str:
        if not self.patched:
            return f"fusedqk: model not patched ({self.reason})"
        skipped = f", {len(self.skipped)} left on the graph path" if self.skipped else ""
        return (f"fusedqk: fused QK-norm decode path ({self.impl}) on {len(self.patched)} layers "
                f"on {self.backend}{skipped} ({self.reason})")


def _looks_like_qwen3_attention(attn: nn.Module) -> bool:
    """mlx-lm's Qwen3 attention (or fusedqk's wrapper of it): the parts the fused path reads."""
    if isinstance(attn, FusedQKNormAttention):
        return True
    return all(hasattr(attn, name) for name in
               ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rope", "n_heads",
                "n_kv_heads", "scale"))


def patch(model: nn.Module, env: Mapping[str, str] | None = None) -> PatchReport:
    """Install the fused decode path in ``model`` where the toggle and the model allow it."""
    if env is not None and (not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise UserError("fusedqk.patch: env must map variable names to string values, like "
                        "os.environ")
    backend = current_backend()
    resolution = resolve(backend, has_kernel(backend), env)
    model_type = getattr(model, "model_type", None)
    report = PatchReport(backend, resolution.path == "fused", None, reason=resolution.path_source)
    if model_type not in SUPPORTED_MODEL_TYPES:
        report.reason = (f"model_type {model_type!r} is not supported (fusedqk fuses "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        return report
    layers = list(getattr(model, "layers", None) or [])
    odd = [i for i, layer in enumerate(layers) if not isinstance(
        getattr(layer, "self_attn", None), nn.Module) or not _looks_like_qwen3_attention(
        layer.self_attn)]
    if not layers or odd:
        report.enabled = False
        report.reason = ("the model has no decoder layers (model.layers)" if not layers else
                         f"layer {odd[0]}'s self_attn is not mlx-lm's Qwen3 attention (it was "
                         "replaced or is missing); the model is left as it was")
        return report
    already = {i: layer.self_attn.impl for i, layer in enumerate(layers)
               if isinstance(layer.self_attn, FusedQKNormAttention)}
    if already:  # idempotent: a patched model stays as it is
        report.patched, report.impl = sorted(already), next(iter(already.values()))
        report.reason = "already patched"
        return report
    if not report.enabled:
        return report
    impl = resolution.impl
    call = kernel_call(backend, env)[0]
    for i, layer in enumerate(layers):
        why = fusion_blocker(layer.self_attn)
        if why:
            report.skipped[i] = why
            continue
        fused = FusedQKNormAttention(layer.self_attn, impl, backend, call)
        fused.impl = runnable_impl(impl, fused.writes_cache, fused.kernel_ready)
        if fused.impl == "composite" and impl != "composite":
            report.kernel_fallback = kernel_blocker(backend, fused.layout, fused.qkv_scales.dtype)
        layer.self_attn = fused
        report.patched.append(i)
        report.impl = fused.impl
    report.reason = f"{resolution.path_source}; impl {report.impl or impl} ({resolution.impl_source})"
    return report
