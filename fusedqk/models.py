"""The model registry and model construction: synthetic quantized weights, or a local checkpoint.

The architectures are mlx-lm's own ``qwen3`` and ``qwen3_moe`` classes; this module only chooses
their numbers (``data/models.json``) and fills their parameters. Synthetic weights are made
directly in MLX's affine quantized format, one layer at a time, so no bf16 copy of a large model
ever exists, and they are deterministic in (spec, quantization, seed).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3, qwen3_moe

from fusedqk import registry
from fusedqk.backend import device_info
from fusedqk.errors import UserError, first_line

ARCHITECTURES = {"qwen3": qwen3, "qwen3_moe": qwen3_moe}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
AUTO_DTYPE = "auto"
# The activation dtype "auto" means, per backend. On MLX's CPU backend bfloat16 decodes 7x slower
# than float32 (qwen3-tiny 9.2 vs 64.9 tok/s, qwen3-moe-tiny 10.8 vs 70.0; 2-core AMD EPYC, MLX
# 0.32.4, 2026-12-02) and float16 slower still; GPUs decode the checkpoints' own bfloat16.
BACKEND_DTYPES = {"cpu": "float32", "cuda": "bfloat16", "metal": "bfloat16"}


def resolve_dtype(dtype: str, backend: str) -> str:
    """``dtype`` itself, or the backend's own for ``auto``."""
    return BACKEND_DTYPES[backend] if dtype == AUTO_DTYPE else dtype
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)

# Standard deviation of the dequantized weights, times sqrt(fan-in), per parameter role, and of
# the embedding (0.02, as real checkpoints are initialised). The
# residual branches (o_proj, down_proj) are given a large gain so that the residual stream is
# dominated by what the layers computed rather than by the current token's embedding: with a tied
# embedding the latter makes greedy decoding repeat the input token forever.
GAIN_BRANCH_OUT = 3.0
GAIN_DEFAULT = 1.0
EMBEDDING_STD = 0.02
# Memory a build must leave free beyond the weights: activations, KV cache, MLX's buffers.
HEADROOM_BYTES = 1 << 30


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    group_size: int = 64
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported; accepted: 4, 8")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size} is not supported; accepted: 32, 64, 128")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not supported; accepted: auto, "
                            f"{', '.join(DTYPES)}")

    @property
    def mx_dtype(self) -> mx.Dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: dict

    @property
    def is_moe(self) -> bool:
        return self.config["model_type"] == "qwen3_moe"

    def skeleton(self, quant: Quantization | None = None) -> nn.Module:
        """The mlx-lm model, lazily initialised (nothing is allocated until evaluated)."""
        arch = ARCHITECTURES[self.config["model_type"]]
        model = arch.Model(arch.ModelArgs.from_dict(self.config))
        if quant is not None:
            quantize_like_mlx_lm(model, quant)
        return model

    def sizes(self, quant: Quantization) -> tuple[int, int]:
        """(parameter count, bytes of the quantized weights) from lazy shapes alone."""
        params = sum(v.size for _, v in tree_flatten(self.skeleton().parameters()))
        itemsize = quant.mx_dtype.size
        # Packed codes are uint32; scales, biases and norms take the activation dtype.
        nbytes = sum(v.size * (4 if v.dtype == mx.uint32 else itemsize)
                     for _, v in tree_flatten(self.skeleton(quant).parameters()))
        return params, nbytes


def quantize_like_mlx_lm(model: nn.Module, quant: Quantization) -> None:
    """Quantize every layer that mlx-lm's converter would, honouring a model's own predicate."""
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        return own(path, module) if own is not None else True

    nn.quantize(model, group_size=quant.group_size, bits=quant.bits, class_predicate=predicate)


REGISTRY = {name: ModelSpec(name, cfg) for name, cfg in registry.configs().items()}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UserError(f"--model {name!r} is not a known model; accepted: {', '.join(REGISTRY)}, "
                        "or the path of a local MLX checkpoint directory")
    return REGISTRY[name]


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    source: str  # "synthetic(seed=…)" or the checkpoint path
    config: dict


def load_model(model: str, quant: Quantization, seed: int = 0) -> LoadedModel:
    """A registry name gives synthetic weights; an existing directory is a local checkpoint."""
    path = Path(model)
    if model in REGISTRY:
        spec = REGISTRY[model]
        return LoadedModel(build_synthetic(spec, quant, seed), model,
                           f"synthetic(seed={seed})", spec.config)
    if path.is_dir():
        return load_checkpoint(path)
    raise _unknown_model(model)


def _unknown_model(model: str) -> UserError:
    if "/" in model and not Path(model).exists() and not model.startswith((".", "/")):
        return UserError(f"--model {model!r} looks like a hub id; fusedqk works offline and loads "
                         "only local MLX checkpoint directories (config.json + *.safetensors) or "
                         f"the registry names: {', '.join(REGISTRY)}")
    return UserError(f"--model {model!r} is neither a registry name ({', '.join(REGISTRY)}) nor an "
                     "existing checkpoint directory")


def model_config(model: str) -> dict:
    """The architecture config of a registry name or a checkpoint directory, without building."""
    if model in REGISTRY:
        return REGISTRY[model].config
    path = Path(model)
    if not path.is_dir():
        raise _unknown_model(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model {model!r}: no config.json there; a checkpoint directory holds "
                        "config.json and model*.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--model {model!r}: config.json is not valid JSON (damaged or cut "
                        "short)") from None
    if not isinstance(config, dict) or config.get("model_type") not in ARCHITECTURES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"--model {model!r}: model_type {found!r} is not supported; accepted: "
                        f"{', '.join(ARCHITECTURES)}")
    for key in SIZE_KEYS:
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--model {model!r}: config.json {key} {value!r} is not accepted; "
                            "give a positive whole number")
    return config


# The architecture numbers every Qwen3 config gives: each must be a positive integer (a 0 or a
# string there fails deep inside model construction otherwise).
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")


def load_checkpoint(path: Path) -> LoadedModel:
    """Load a local MLX-format checkpoint through mlx-lm, never touching the network."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model_config(str(path))
    if not list(path.glob("model*.safetensors")):
        raise UserError(f"--model {str(path)!r}: no model*.safetensors files there")
    try:
        model, config = mlx_lm_load_model(path)
    except (RuntimeError, ValueError, OSError) as e:  # a truncated or foreign safetensors file
        raise UserError(f"--model {str(path)!r}: its weights do not load ({first_line(e)}); the "
                        "checkpoint is damaged or incomplete") from None
    model.eval()
    return LoadedModel(model, path.name, str(path), config)


def check_fits(name: str, need_bytes: int) -> None:
    """Fail before allocating when the weights cannot fit the current device's free memory."""
    info = device_info()
    free = info.memory_free_bytes
    if free is not None and need_bytes + HEADROOM_BYTES > free:
        raise UserError(
            f"--model {name}: needs {need_bytes / 2**30:.1f} GiB of weights (+{HEADROOM_BYTES >> 30} "
            f"GiB headroom) but {info.backend} device {info.device_name!r} has "
            f"{free / 2**30:.1f} GiB free"
        )


def _key(seed: int, name: str) -> mx.array:
    return mx.random.key((seed << 32) ^ zlib.crc32(name.encode()))


def _gain(path: str, experts_per_token: int) -> float:
    if path.endswith("switch_mlp.down_proj"):
        # A MoE block outputs a weighted mean of its experts (weights summing to 1), whose spread
        # is about 1/sqrt(k) of one expert's: without this the 48-layer qwen3-30b-a3b (k = 8)
        # decoded 2-16 distinct ids per 128 greedy tokens (NVIDIA H200, 2026-12-01).
        return GAIN_BRANCH_OUT * experts_per_token**0.5
    return GAIN_BRANCH_OUT if path.endswith(("o_proj", "down_proj")) else GAIN_DEFAULT


def _synthetic_quantized(path: str, module: nn.Module, dtype: mx.Dtype, seed: int,
                         experts_per_token: int = 1) -> dict:
    """weight/scales/biases for one quantized module: uniform codes, zero-mean dequantized values."""
    bits, group = module.bits, module.group_size
    w_shape, s_shape = module.weight.shape, module.scales.shape
    fan_in = s_shape[-1] * group
    levels = (1 << bits) - 1
    code_std = ((levels + 1) ** 2 - 1) ** 0.5 / 12**0.5
    std = (EMBEDDING_STD if path.endswith("embed_tokens")
           else _gain(path, experts_per_token) / fan_in**0.5)
    k_hi, k_lo, k_s = mx.random.split(_key(seed, path), 3)
    # Every packed word is 32 uniform random bits, i.e. uniform codes at any bit width.
    hi = mx.random.randint(0, 1 << 16, w_shape, dtype=mx.uint32, key=k_hi)
    lo = mx.random.randint(0, 1 << 16, w_shape, dtype=mx.uint32, key=k_lo)
    weight = (hi << 16) | lo
    jitter = mx.random.uniform(0.75, 1.25, s_shape, key=k_s)
    scales = (jitter * (std / code_std)).astype(dtype)
    biases = (-scales.astype(mx.float32) * (levels / 2)).astype(dtype)
    return {"weight": weight, "scales": scales, "biases": biases}


def _synthetic_norm(path: str, shape: tuple[int, ...], dtype: mx.Dtype, seed: int) -> mx.array:
    # Per-channel gains around 1, so a kernel that ignores or misplaces the norm weight fails.
    return mx.random.uniform(0.5, 1.5, shape, key=_key(seed, path)).astype(dtype)


def synthetic_layers(spec: ModelSpec, quant: Quantization, seed: int = 0):
    """``spec``'s deterministic synthetic weights, one layer (or top-level module) at a time:
    yields lists of (parameter name, array), names as mlx-lm's checkpoints spell them. Arrays
    are lazy; a caller that evaluates and drops each list never holds more than one layer."""
    model = spec.skeleton(quant)
    dtype = quant.mx_dtype
    quantized = {p: m for p, m in model.named_modules() if isinstance(
        m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or type(m).__name__ == "QuantizedSwitchLinear"}
    groups: dict[str, list[tuple[str, mx.array]]] = {}
    for name, value in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if owner in quantized:
            if leaf != "weight":
                continue
            arrays = _synthetic_quantized(owner, quantized[owner], dtype, seed,
                                          spec.config.get("num_experts_per_tok", 1))
            new = [(f"{owner}.{k}", v) for k, v in arrays.items()]
        else:
            new = [(name, _synthetic_norm(owner, value.shape, dtype, seed))]
        parts = name.split(".")
        layer = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else owner
        groups.setdefault(layer, []).extend(new)
    yield from groups.values()


def build_synthetic(spec: ModelSpec, quant: Quantization, seed: int = 0) -> nn.Module:
    """Build ``spec`` with deterministic synthetic weights, materialising one layer at a time."""
    _, need = spec.sizes(quant)
    check_fits(spec.name, need)
    model = spec.skeleton(quant)
    for items in synthetic_layers(spec, quant, seed):
        model.update(tree_unflatten(items))
        mx.eval([v for _, v in items])
    model.eval()
    return model


def load_synthetic_checkpoint(spec: ModelSpec, quant: Quantization, path: Path) -> nn.Module:
    """``spec`` with the weights of its synthetic checkpoint at ``path`` (``fusedqk export``'s
    layout), built as ``build_synthetic`` builds it; raises ValueError or RuntimeError when the
    files do not hold exactly the skeleton's parameters."""
    _, need = spec.sizes(quant)
    check_fits(spec.name, need)
    model = spec.skeleton(quant)
    weights: dict[str, mx.array] = {}
    for shard in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(shard)))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def registry_rows() -> list[dict]:
    """The registry with each model's sizes at 4-bit, group 64 (``fusedqk models``)."""
    quant = Quantization(4, 64, "bfloat16")
    rows = []
    for spec in REGISTRY.values():
        params, nbytes = spec.sizes(quant)
        c = spec.config
        rows.append({
            "model": spec.name, "type": c["model_type"], "layers": c["num_hidden_layers"],
            "hidden": c["hidden_size"], "heads": c["num_attention_heads"],
            "kv_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
            "experts": c.get("num_experts", 0), "active": c.get("num_experts_per_tok", 0),
            "params": params, "q4_bytes": nbytes,
        })
    return rows


def render_registry(rows: list[dict]) -> str:
    lines = [f"{'model':<17} {'type':<10} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} "
             f"{'experts':>9} {'params':>9} {'4-bit g64':>10}"]
    for r in rows:
        experts = f"{r['active']}/{r['experts']}" if r["experts"] else "-"
        lines.append(f"{r['model']:<17} {r['type']:<10} {r['layers']:>6} {r['hidden']:>6} "
                     f"{r['heads']:>5} {r['kv_heads']:>3} {experts:>9} {r['params'] / 1e9:>8.2f}B "
                     f"{r['q4_bytes'] / 2**30:>7.2f} GiB")
    return "\n".join(lines)
