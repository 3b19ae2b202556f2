"""The in-process engine: build or load a model and install its decode paths, from plain values.

Every measuring module (bench, blockbench, identity, envinfo) takes a ``Prepared`` from here; the
command line only turns flags into a ``ModelRef``. A ``ModelRef`` also renders itself back as
flags, so a measurement can start a fresh process on the same model (identity's controls).
"""

from __future__ import annotations

from dataclasses import dataclass

from fusedqk.attention import DecodePaths
from fusedqk.backend import select_backend
from fusedqk.models import AUTO_DTYPE, LoadedModel, Quantization, load_model, resolve_dtype
from fusedqk.toggle import kernel_call


@dataclass(frozen=True)
class ModelRef:
    """Which model, on which backend, with which weights: everything a model build depends on."""

    model: str = "qwen3-tiny"
    backend: str = "auto"
    bits: int = 4
    group_size: int = 64
    dtype: str = AUTO_DTYPE  # or bfloat16, float16, float32
    seed: int = 0

    def quantization(self, backend: str) -> Quantization:
        return Quantization(self.bits, self.group_size, resolve_dtype(self.dtype, backend))



@dataclass
class Prepared:
    """A built model with both decode paths installed, on the selected backend."""

    backend: str
    loaded: LoadedModel
    paths: DecodePaths
    quant: Quantization


def prepare(ref: ModelRef) -> Prepared:
    """Select the backend, build or load the model, and install its decode paths."""
    backend = select_backend(ref.backend)
    quant = ref.quantization(backend)
    loaded = load_model(ref.model, quant, ref.seed)
    return Prepared(backend, loaded, DecodePaths(loaded.model, backend, kernel_call(backend)[0]),
                    quant)
