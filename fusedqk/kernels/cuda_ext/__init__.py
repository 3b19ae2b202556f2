"""The optional C++ extension: the fused kernel as an MLX primitive on CUDA (primitive.cpp).

Built by ``fusedqk build-ext`` (build.py; no GPU needed) or carried by the cuda image; absent
elsewhere, and then the kernel is called through ``mx.fast.cuda_kernel``. ``load`` says which
and why.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

from fusedqk.errors import UserError


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """(module, why): the extension when it imports and shares mlx.core's array type, else None
    and the reason."""
    import mlx.core as mx

    if importlib.util.find_spec(f"{__name__}._fusedqk_cuda") is None:
        return None, ("not built (`fusedqk build-ext` builds it, no GPU needed; the cuda image "
                      "carries it)")
    try:
        from fusedqk.kernels.cuda_ext import _fusedqk_cuda
    except ImportError as e:  # e.g. an undefined symbol, or libmlx.so moved since the build
        return None, f"built but does not load: {(str(e) or type(e).__name__).splitlines()[0]}"
    try:
        _fusedqk_cuda.array_ndim(mx.zeros((2, 3)))
    except TypeError:
        return None, ("it does not see mlx.core's array type: rebuild with the nanobind mlx.core "
                      "was built with (3.x) in nanobind domain mlx (CMakeLists.txt does)")
    return _fusedqk_cuda, f"built at {_fusedqk_cuda.__file__}"


def require() -> ModuleType:
    module, why = load()
    if module is None:
        raise UserError(f"the C++ extension is unavailable: {why}")
    return module
