"""fusedqk: is a fused QKV + Q/K RMSNorm + RoPE decode path worth turning on, per MLX backend?

``fusedqk.patch(model)`` puts the fused path into an mlx-lm Qwen3 / Qwen3-MoE model
(``fusedqk.patching`` says how the toggle decides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fusedqk.patching import PatchReport, patch

__all__ = ["PatchReport", "__version__", "patch"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. the workflow's planner) must not load MLX.
    if name in ("patch", "PatchReport"):
        import importlib

        return getattr(importlib.import_module("fusedqk.patching"), name)
    raise AttributeError(f"module 'fusedqk' has no attribute {name!r}")
