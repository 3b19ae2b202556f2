"""A registry model's synthetic weights as a complete MLX-format checkpoint, for other engines.

``export`` writes what ``mlx_lm.convert`` would: ``config.json`` with its quantization block,
``model-XXXXX-of-YYYYY.safetensors`` shards with ``model.safetensors.index.json``, and tokenizer
files made offline: a word-level tokenizer whose vocabulary is the model's (token ``i`` is the
word ``t<i>``, so text and token ids map one to one). ``mlx_lm.load`` and MLX engines that read
MLX-format directories (mlxcel among them) open it with no network. Weights are made and written
one layer at a time; the directory appears whole (written beside it, then renamed) or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from fusedqk.atomic import caller_mode
from fusedqk.errors import UserError
from fusedqk.models import Quantization, get_spec, synthetic_layers
from fusedqk.outputs import check_room

TRANSFORMERS_VERSION = "4.51.0"
SHARD_BYTES = 4 << 30  # mlx-lm's own shard size is 5 GB; smaller shards keep peak memory low
UNK, EOS = "<unk>", "<eos>"
# Disk beyond the weights: tokenizer, index, and a margin for the filesystem.
DISK_HEADROOM_BYTES = 256 << 20


@dataclass
class ExportReport:
    path: Path
    shards: int
    weight_bytes: int
    parameters: int


def word(i: int) -> str:
    """The word that token id ``i`` stands for in the exported tokenizer."""
    return f"t{i}"


def _tokenizer_files(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {UNK: 0, EOS: 1, **{word(i): i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "eos_token": EOS,
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": UNK, "eos_token": EOS}, indent=2) + "\n")


def _config(spec_config: dict, quant: Quantization, seed: int) -> dict:
    q = {"group_size": quant.group_size, "bits": quant.bits, "mode": "affine"}
    return {**spec_config, "quantization": q, "quantization_config": q,
            "torch_dtype": quant.dtype, "eos_token_id": 1,
            # What Qwen's published Qwen3 configs name. transformers 4.57.3 and later warn about
            # a Mistral tokenizer regex for a local large-vocabulary tokenizer whose config names
            # no version (or a newer one) unless its model_type is checked first.
            "transformers_version": TRANSFORMERS_VERSION,
            "fusedqk": {"weights": "synthetic", "seed": seed}}


def export(model: str, out: Path, quant: Quantization, seed: int = 0,
           shard_bytes: int = SHARD_BYTES) -> ExportReport:
    """Write ``model``'s synthetic checkpoint to ``out`` (which must not exist yet)."""
    spec = get_spec(model)
    if out.exists():
        raise UserError(f"--out {str(out)!r} exists already; give a new directory (an export is "
                        "never written over another)")
    params, need = spec.sizes(quant)
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(parent, out.name)
        # The shards, three tokenizer files, config.json and the staging folder.
        check_room(parent, need, need // shard_bytes + 6, DISK_HEADROOM_BYTES,
                   f"--out {str(out)!r}", f"{model} ({quant.bits}-bit g{quant.group_size})")
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=parent))
        staging.chmod(caller_mode(directory=True))  # mkdtemp's 0700 would stay on the checkpoint
        try:
            shards = _write_shards(staging, synthetic_layers(spec, quant, seed), shard_bytes)
            _tokenizer_files(staging, spec.config["vocab_size"])
            (staging / "config.json").write_text(json.dumps(_config(spec.config, quant, seed),
                                                            indent=4) + "\n")
            if out.exists():  # another export of the same --out finished first
                raise UserError(f"--out {str(out)!r} was written by another export meanwhile")
            staging.rename(out)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot write the checkpoint there "
                        f"({e.strerror or type(e).__name__})") from None
    return ExportReport(out, shards, need, params)


def _remove_stale_staging(parent: Path, name: str) -> None:
    """Staging folders of exports to ``name`` whose process is gone (killed mid-export)."""
    for folder in parent.glob(f".{name}.*"):
        pid = folder.name[len(name) + 2:].split(".", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_shards(out: Path, layers, shard_bytes: int) -> int:
    """Evaluate and write the layers in order, a shard whenever ``shard_bytes`` are gathered;
    then name the shards as mlx-lm does and write the index."""
    weight_map: dict[str, int] = {}
    shard: dict[str, mx.array] = {}
    size = total = count = 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard:
            count += 1
            mx.save_safetensors(str(out / f"shard-{count}.safetensors"), shard,
                                metadata={"format": "mlx"})
            shard, size = {}, 0

    for items in layers:
        mx.eval([v for _, v in items])
        for name, value in items:
            shard[name] = value
            weight_map[name] = count + 1
            size += value.nbytes
            total += value.nbytes
        if size >= shard_bytes:
            flush()
    flush()
    names = {i: (f"model-{i:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors")
             for i in range(1, count + 1)}
    for i, name in names.items():
        (out / f"shard-{i}.safetensors").rename(out / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[weight_map[k]] for k in sorted(weight_map)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
    return count
