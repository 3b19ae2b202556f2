"""What fusedqk keeps between processes: synthetic checkpoints, and MLX's compiled kernels.

Building a registry model's synthetic weights is most of a process's fixed cost on a GPU (the
large models take minutes), and every bench, identity check, control and block benchmark of a
run needs the same weights. So each (model, quantization, seed) is exported once per machine as
an MLX checkpoint (``fusedqk.export``) under ``$FUSEDQK_CACHE_DIR/checkpoints``, and every later
process loads it: the file's pages stay in the operating system's page cache, shared by every
process that reads them. The folder's name carries a fingerprint of everything the weights
depend on (the architecture, the quantization, the seed, the generator's version, MLX's version
and the backend that made them), so a changed generator never serves old weights.

MLX's CUDA backend compiles its kernels at first use and keeps them in ``MLX_PTX_CACHE_DIR``;
unless that is set, fusedqk points it at ``$FUSEDQK_CACHE_DIR/ptx/<device>-mlx<version>``, one
folder per kind of GPU, which every job of a run and every later run shares.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusedqk.errors import UserError, first_line, shown
from fusedqk.outputs import check_dir

ENV_CACHE_DIR = "FUSEDQK_CACHE_DIR"
ENV_CHECKPOINTS = "FUSEDQK_CHECKPOINTS"
ENV_PTX_CACHE = "MLX_PTX_CACHE_DIR"
OFF = "off"
# Bump when synthetic_layers (fusedqk/models.py) would make different weights for the same
# inputs: every cached checkpoint made before is then ignored.
SYNTHETIC_VERSION = 1


def cache_root() -> Path | None:
    """$FUSEDQK_CACHE_DIR (an absolute folder, or ``off``: None), else $XDG_CACHE_HOME/fusedqk,
    else ~/.cache/fusedqk."""
    value = os.environ.get(ENV_CACHE_DIR)
    if value is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "fusedqk"
    if value == OFF:
        return None
    if not value.strip() or not Path(value).is_absolute():
        raise UserError(f"{ENV_CACHE_DIR}={shown(value)} is not accepted; give an absolute folder, "
                        f"or {OFF} (build weights in every process), or leave it unset for "
                        "~/.cache/fusedqk")
    check_dir(ENV_CACHE_DIR, value)
    return Path(value)


def checkpoints_root(given: str | None = None) -> Path:
    """Where exported synthetic checkpoints go: ``given`` (a flag or config key), else
    $FUSEDQK_CHECKPOINTS, else the cache folder's ``checkpoints`` (~/.cache/fusedqk/checkpoints
    when the cache is off, since an engine needs its checkpoint on disk)."""
    if given:
        return Path(given)
    value = os.environ.get(ENV_CHECKPOINTS)
    if value is not None:
        if not value.strip() or not Path(value).is_absolute():
            raise UserError(f"{ENV_CHECKPOINTS}={shown(value)} is not accepted; give an absolute "
                            "folder for exported checkpoints, or leave it unset for "
                            "$FUSEDQK_CACHE_DIR/checkpoints")
        check_dir(ENV_CHECKPOINTS, value)
        return Path(value)
    root = cache_root()
    return (root or Path.home() / ".cache/fusedqk") / "checkpoints"


def fingerprint(config: dict, bits: int, group_size: int, dtype: str, seed: int,
                backend: str) -> str:
    """Ten hex digits over everything a synthetic checkpoint's bytes depend on."""
    import mlx.core as mx

    key = {"generator": SYNTHETIC_VERSION, "config": config, "bits": bits,
           "group_size": group_size, "dtype": dtype, "seed": seed, "mlx": mx.__version__,
           "backend": backend}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def checkpoint_name(model: str, bits: int, group_size: int, dtype: str, seed: int,
                    print_: str) -> str:
    return f"{model}-q{bits}g{group_size}-{dtype}-s{seed}-{print_}"


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """One process at a time makes a given checkpoint; the others wait here, then load it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def synthetic_checkpoint(model: str, bits: int, group_size: int, dtype: str, seed: int,
                         backend: str, root: Path) -> tuple[Path, bool]:
    """The cached checkpoint of ``model``'s synthetic weights under ``root``, exported now when
    there is none; and whether this call made it."""
    return _cached_export(model, bits, group_size, dtype, seed, backend, root, gguf=False)


def synthetic_gguf(model: str, bits: int, group_size: int, dtype: str, seed: int, backend: str,
                   root: Path) -> tuple[Path, bool]:
    """The same weights as one GGUF file, for llama.cpp (``fusedqk.gguf_export``)."""
    return _cached_export(model, bits, group_size, dtype, seed, backend, root, gguf=True)


def _cached_export(model: str, bits: int, group_size: int, dtype: str, seed: int, backend: str,
                   root: Path, gguf: bool) -> tuple[Path, bool]:
    from fusedqk.models import Quantization, get_spec

    spec = get_spec(model)
    print_ = fingerprint(spec.config, bits, group_size, dtype, seed, backend)
    out = root / (checkpoint_name(model, bits, group_size, dtype, seed, print_)
                  + (".gguf" if gguf else ""))

    def made() -> bool:
        return out.is_file() if gguf else (out / "config.json").is_file()

    if made():
        return out, False
    with _locked(root, out.name):
        if made():  # made by the process we waited for
            return out, False
        _note(f"exporting {model} to {out} (once per machine)")
        quant = Quantization(bits, group_size, dtype)
        if gguf:
            from fusedqk.gguf_export import export_gguf

            export_gguf(model, out, quant, seed)
        else:
            from fusedqk.export import export

            export(model, out, quant, seed)
    return out, True


def use_shared_kernel_cache(backend: str, device_name: str) -> Path | None:
    """Point MLX's compiled-kernel cache at the shared cache folder (cuda only, and only when
    MLX_PTX_CACHE_DIR is not set already); the folder used, or None. Must run before MLX
    compiles its first kernel: MLX reads the variable once."""
    if backend != "cuda":
        return None
    if os.environ.get(ENV_PTX_CACHE):
        return Path(os.environ[ENV_PTX_CACHE])
    root = cache_root()
    if root is None:
        return None
    import mlx.core as mx

    device = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"
    folder = root / "ptx" / f"{device}-mlx{mx.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_PTX_CACHE] = str(folder)
    return folder


def load_synthetic(model: str, quant, seed: int, backend: str):
    """A registry model's synthetic weights (a ``LoadedModel``): from its cached checkpoint,
    exported first when this machine has none (and again when the cached one does not load);
    built in memory when the cache is off or its folder cannot take the checkpoint."""
    from fusedqk.models import LoadedModel, build_synthetic, get_spec, load_synthetic_checkpoint

    spec = get_spec(model)
    loaded = None
    # A misconfigured folder is the user's error; only a folder without room or write access
    # falls back to building in memory.
    folder = checkpoints_root() if cache_root() is not None else None
    for _ in range(2 if folder is not None else 0):
        try:
            path, _ = synthetic_checkpoint(model, quant.bits, quant.group_size, quant.dtype, seed,
                                           backend, folder)
        except UserError as e:
            _note(f"building {model} in memory; the cache cannot hold it: {e}")
            break
        try:
            loaded = load_synthetic_checkpoint(spec, quant, path)
            break
        except (ValueError, RuntimeError, OSError) as e:  # damaged: made again, once
            _note(f"cached checkpoint {path} does not load ({first_line(e)}); making it again")
            with _locked(path.parent, path.name):
                shutil.rmtree(path, ignore_errors=True)
    if loaded is None:
        loaded = build_synthetic(spec, quant, seed)
    return LoadedModel(loaded, model, f"synthetic(seed={seed})", spec.config)


def _note(text: str) -> None:
    print(f"fusedqk: note: {text}", file=sys.stderr, flush=True)
