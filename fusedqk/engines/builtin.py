"""The in-process engine: build or load a model and install its decode paths, from plain values.

Every measuring module (bench, blockbench, identity, envinfo) takes a ``Prepared`` from here; the
command line only turns flags into a ``ModelRef`` (identity's fresh-process controls get theirs
as JSON, ``fusedqk.identity_worker``). A registry model's weights come from the machine's
checkpoint cache (``fusedqk.caches``), made once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from fusedqk import caches, phases
from fusedqk.attention import DecodePaths
from fusedqk.backend import select_backend
from fusedqk.models import (
    AUTO_DTYPE,
    REGISTRY,
    LoadedModel,
    Quantization,
    load_model,
    resolve_dtype,
)
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
    import mlx.core as mx

    backend = select_backend(ref.backend)
    quant = ref.quantization(backend)
    caches.use_shared_kernel_cache(backend, str(mx.device_info().get("device_name", backend)))
    with phases.phase("weights"):
        loaded = (caches.load_synthetic(ref.model, quant, ref.seed, backend)
                  if ref.model in REGISTRY else load_model(ref.model, quant, ref.seed))
    if ref.model not in REGISTRY:
        quant = checkpoint_quantization(loaded.config, quant)
    return Prepared(backend, loaded, DecodePaths(loaded.model, backend, kernel_call(backend)[0]),
                    quant)


def checkpoint_quantization(config: dict, asked: Quantization) -> Quantization:
    """What a local checkpoint really is: its own bits and group size (from its config.json),
    which every result records; flags that asked for others are named in a note, not recorded."""
    own = config.get("quantization") or {}
    bits, group = own.get("bits"), own.get("group_size")
    if not isinstance(bits, int) or not isinstance(group, int):
        return asked
    if (bits, group) != (asked.bits, asked.group_size):
        print(f"fusedqk: note: the checkpoint is {bits}-bit g{group}; --bits {asked.bits} "
              f"--group-size {asked.group_size} do not apply to it and are not recorded",
              file=sys.stderr)
    return Quantization(bits, group, asked.dtype)


def generate_once(ref: ModelRef, path: str | None, impl: str | None, prompt_tokens: int,
                  max_tokens: int, temp: float, seed: int, warmup: int) -> dict:
    """``fusedqk generate``: the seeded prompt decoded on ``path`` (None: what the toggle says)
    after ``warmup`` untimed runs; the tokens, the timings, the peak memory, and the seconds from
    the process's start to its first decoded token."""
    import mlx.core as mx

    from fusedqk.decode import generate, make_sampler, random_prompt
    from fusedqk.kernels.qkv_norm_rope import has_kernel
    from fusedqk.toggle import concrete_path

    backend = select_backend(ref.backend)
    path = concrete_path(path, backend, has_kernel(backend), impl)  # before any weights
    prep = prepare(ref)
    prep.paths.use(path)
    prompt = random_prompt(prep.loaded.config["vocab_size"], prompt_tokens, seed)
    first_token_s = None
    with phases.phase("warmup"):
        for _ in range(warmup):  # untimed: MLX compiles its kernels on the first run
            started = phases.since_start()
            run = generate(prep.loaded.model, prompt, max_tokens, make_sampler(temp, seed))
            first_token_s = first_token_s or started + run.prefill_s
    mx.reset_peak_memory()
    started = phases.since_start()
    with phases.phase("measure"):
        result = generate(prep.loaded.model, prompt, max_tokens, make_sampler(temp, seed))
    decode_s = result.decode_s
    return {"model": prep.loaded.name, "backend": prep.backend, "path": path,
            "tokens": result.tokens, "prefill_s": result.prefill_s,
            "prefill_tok_s": prompt_tokens / result.prefill_s, "decode_s": decode_s,
            "decode_tok_s": (len(result.tokens) - 1) / decode_s if decode_s else None,
            "peak_memory_bytes": mx.get_peak_memory(),
            "start_to_first_token_s": first_token_s or started + result.prefill_s,
            "seconds": phases.snapshot()}
