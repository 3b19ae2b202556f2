"""A registry model's synthetic weights as one GGUF file, for llama.cpp (``export --format gguf``).

The same deterministic weights ``fusedqk export`` writes as an MLX checkpoint
(``fusedqk.models.synthetic_layers``), in llama.cpp's names for the ``qwen3`` and ``qwen3moe``
architectures. MLX's 4-bit affine groups (``w = q * scale + bias``, q in 0..15) are exactly
GGML's Q4_1 blocks (``w = q * d + m``, 32 weights a block): a group of 64 or 128 becomes two or
four blocks with the same d and m. So the codes, scales and biases are MLX's own wherever the
scales and biases are 16-bit (bfloat16 and float16 runs; a float32 export rounds them to
float16, which Q4_1 stores); ggml computes ``q * d + m`` in float32 where MLX rounds it to the
activation dtype. MLX layers that are not 4-bit (Qwen3-MoE's 8-bit router) are written dequantized
as F32, and norms as F32, as llama.cpp's own converter writes them.

The vocabulary is a byte-level BPE one that llama.cpp loads (``tokenizer.ggml.model`` gpt2): the
256 byte tokens first, then ``t<i>`` for the other ids, the end-of-text token last; one merge
that makes no token, so text tokenizes to bytes. Engines are driven by token ids, never by text.

The file is streamed: the header with every tensor's shape first, then one layer's tensors at a
time, so a 30B model never sits in memory whole. It appears whole (written beside, renamed) or
not at all.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from fusedqk.atomic import caller_mode
from fusedqk.errors import UserError
from fusedqk.models import ModelSpec, Quantization, get_spec, synthetic_layers
from fusedqk.outputs import check_room

QUANT_NAME = "Q4_1"
BLOCK = 32  # weights per Q4_1 block
BLOCK_BYTES = 2 + 2 + BLOCK // 2  # fp16 d, fp16 m, 16 bytes of nibbles
EOT = "<|endoftext|>"
DISK_HEADROOM_BYTES = 64 << 20

# MLX (mlx-lm) parameter owner -> llama.cpp tensor name (src/llama-arch.cpp at the pinned commit,
# LLM_ARCH_QWEN3 and LLM_ARCH_QWEN3MOE).
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
         "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps"}
ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


@dataclass
class GGUFReport:
    path: Path
    tensors: int
    nbytes: int
    quantization: str


def gguf_name(owner: str) -> str:
    """llama.cpp's name for the weight of the MLX module ``owner``."""
    if owner in TOP:
        return f"{TOP[owner]}.weight"
    parts = owner.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in LAYER:
        raise UserError(f"no llama.cpp tensor name for {owner!r}")
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:])]}.weight"


def check_quantization(quant: Quantization) -> None:
    if quant.bits != 4 or quant.group_size % BLOCK:
        raise UserError(f"--format gguf writes {quant.bits}-bit g{quant.group_size}: not accepted; "
                        f"GGUF's {QUANT_NAME} holds MLX's 4-bit affine groups of 32, 64 or 128 "
                        "exactly (8-bit MLX groups have a bias that Q8_0 cannot hold)")


def q4_1_blocks(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """MLX 4-bit packed rows (..., in/8 uint32; element j of a word in bits 4j..4j+3) with their
    group scales and biases as Q4_1 bytes (..., in/32 * 20): per block fp16 d = scale, fp16
    m = bias, then byte j = q[j] | q[j + 16] << 4."""
    lead = weight.shape[:-1]
    codes = (weight[..., None] >> (np.arange(8, dtype=np.uint32) * 4)) & 0xF
    codes = codes.astype(np.uint8).reshape(*lead, -1, BLOCK)  # (..., blocks, 32)
    blocks = codes.shape[-2]
    per_group = blocks // scales.shape[-1]
    d = np.repeat(scales.astype(np.float16), per_group, axis=-1)
    m = np.repeat(biases.astype(np.float16), per_group, axis=-1)
    out = np.empty((*lead, blocks, BLOCK_BYTES), dtype=np.uint8)
    out[..., 0:2] = d[..., None].view(np.uint8)
    out[..., 2:4] = m[..., None].view(np.uint8)
    out[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(*lead, blocks * BLOCK_BYTES)


def dequantized(weight: mx.array, scales: mx.array, biases: mx.array, bits: int,
                group_size: int) -> np.ndarray:
    return np.array(mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
                    .astype(mx.float32))


def _numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def _tensors(spec: ModelSpec, quant: Quantization):
    """(gguf name, numpy dtype, byte or element shape, raw type or None, nbytes, make) for every
    tensor, in file order; ``make`` turns one layer's MLX arrays into the tensor's bytes."""
    from gguf import GGMLQuantizationType

    model = spec.skeleton(quant)
    modules = dict(model.named_modules())
    plan = []
    for items in synthetic_layers(spec, quant):
        owners: dict[str, list[str]] = {}
        for name, _ in items:
            owner, leaf = name.rsplit(".", 1)
            owners.setdefault(owner, []).append(leaf)
        for owner, leaves in owners.items():
            module = modules[owner]
            if "scales" not in leaves:
                shape = tuple(module.weight.shape)
                plan.append((gguf_name(owner), owner, np.float32, shape, None,
                             int(np.prod(shape)) * 4))
            elif module.bits == 4:
                w = module.weight.shape
                shape = (*w[:-1], w[-1] * 8 // BLOCK * BLOCK_BYTES)
                plan.append((gguf_name(owner), owner, np.uint8, shape,
                             GGMLQuantizationType.Q4_1, int(np.prod(shape))))
            else:
                shape = (*module.weight.shape[:-1], module.weight.shape[-1] * 32 // module.bits)
                plan.append((gguf_name(owner), owner, np.float32, shape, None,
                             int(np.prod(shape)) * 4))
    return plan, modules


def _layer_bytes(items, modules) -> dict[str, np.ndarray]:
    arrays = dict(items)
    mx.eval(list(arrays.values()))
    out = {}
    for name in arrays:
        owner, leaf = name.rsplit(".", 1)
        if owner in out or leaf != "weight":
            continue
        if f"{owner}.scales" not in arrays:
            out[owner] = _numpy(arrays[name]).astype(np.float32)
            continue
        module = modules[owner]
        w, s, b = arrays[name], arrays[f"{owner}.scales"], arrays[f"{owner}.biases"]
        if module.bits == 4:
            out[owner] = q4_1_blocks(np.array(w), _numpy(s), _numpy(b))
        else:
            out[owner] = dequantized(w, s, b, module.bits, module.group_size)
    return out


def _metadata(writer, spec: ModelSpec, quant: Quantization, seed: int) -> None:
    from gguf import LlamaFileType

    cfg = spec.config
    arch = ARCH[cfg["model_type"]]
    writer.add_name(f"fusedqk synthetic {spec.name}")
    writer.add_description(f"fusedqk synthetic weights, seed {seed}, MLX {quant.bits}-bit "
                           f"g{quant.group_size} {quant.dtype} as GGUF {QUANT_NAME}")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(2)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "qwen3moe":
        writer.add_expert_count(cfg["num_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    vocab = cfg["vocab_size"]
    tokens, types = byte_level_vocab(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    # llama.cpp refuses a BPE vocabulary without merges (and the writer drops an empty list):
    # one merge whose result is no token leaves text tokenizing to bytes.
    writer.add_token_merges(["t 1"])
    writer.add_eos_token_id(vocab - 1)
    writer.add_bos_token_id(vocab - 1)
    writer.add_add_bos_token(False)


def byte_level_vocab(size: int) -> tuple[list[str], list]:
    """GPT-2's 256 byte characters, then ``t<i>``, and the end-of-text token as the last id."""
    from gguf import TokenType

    if size < 258:
        raise UserError(f"vocab_size {size}: a byte-level GGUF vocabulary needs at least 258 ids")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tokens = [chars[b] for b in range(256)] + [f"t{i}" for i in range(256, size - 1)] + [EOT]
    types = [TokenType.NORMAL] * (size - 1) + [TokenType.CONTROL]
    return tokens, types


def export_gguf(model: str, out: Path, quant: Quantization, seed: int = 0) -> GGUFReport:
    """Write ``model``'s synthetic weights to the GGUF file ``out`` (which must not exist)."""
    from gguf import GGUFWriter

    check_quantization(quant)
    spec = get_spec(model)
    if spec.config["model_type"] not in ARCH:
        raise UserError(f"--model {model!r}: --format gguf writes {', '.join(ARCH)} models")
    if out.exists():
        raise UserError(f"--out {str(out)!r} exists already; give a new file (an export is never "
                        "written over another)")
    plan, modules = _tensors(spec, quant)
    need = sum(p[5] for p in plan)
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        check_room(parent, need, 1, DISK_HEADROOM_BYTES, f"--out {str(out)!r}",
                   f"{model} as GGUF {QUANT_NAME}")
        fd, staging = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", dir=parent)
        os.close(fd)
        os.chmod(staging, caller_mode())  # mkstemp's 0600 would stay on the file
        try:
            writer = GGUFWriter(staging, ARCH[spec.config["model_type"]], use_temp_file=False)
            _metadata(writer, spec, quant, seed)
            for name, _, dtype, shape, raw, nbytes in plan:
                writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            order = iter(plan)
            for items in synthetic_layers(spec, quant, seed):
                made = _layer_bytes(items, modules)
                for _ in made:
                    owner = next(order)[1]
                    writer.write_tensor_data(made[owner])
            writer.close()
            if out.exists():
                raise UserError(f"--out {str(out)!r} was written by another export meanwhile")
            os.replace(staging, out)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot write the GGUF file there "
                        f"({e.strerror or type(e).__name__})") from None
    return GGUFReport(out, len(plan), need, QUANT_NAME)
