"""Build the optional CUDA extension (``fusedqk build-ext``) into this package folder."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from fusedqk.errors import UserError

HERE = Path(__file__).resolve().parent


def installed_mlx_root() -> Path:
    """The installed mlx package folder (include/ and lib/ come with the mlx-cuda wheel)."""
    import mlx.core

    return Path(mlx.core.__file__).resolve().parent


def build(build_dir: Path, mlx_root: Path | None = None, fmt_include: Path | None = None) -> Path:
    """Configure and build with CMake; returns the built module's path. Every failure is one
    UserError line naming what is missing; the compiler's output stays in ``build_dir``."""
    root = mlx_root or installed_mlx_root()
    if not (root / "include" / "mlx" / "backend" / "cuda" / "device.h").is_file():
        raise UserError(f"--mlx-root {root}: no MLX CUDA headers there (include/mlx/backend/cuda);"
                        " install MLX's CUDA build (pip install 'mlx[cuda13]')")
    if shutil.which("cmake") is None:
        raise UserError("cmake is not on PATH; the extension builds with CMake >= 3.24")
    if importlib.util.find_spec("nanobind") is None:
        raise UserError("nanobind is not installed for this Python; pip install 'nanobind>=3,<4' "
                        "(the nanobind ABI that mlx.core is built with)")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    configure = ["cmake", "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DMLX_ROOT={root}",
                 f"-DFUSEDQK_OUTPUT_DIR={HERE}"]
    if fmt_include is not None:
        configure.append(f"-DFMT_INCLUDE_DIR={fmt_include}")
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    with log.open("w") as out:
        for step in (configure, ["cmake", "--build", str(build_dir)]):
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise UserError(f"building the CUDA extension failed at `{' '.join(step[:2])}`; "
                                f"the compiler's output is in {log}")
    built = sorted(HERE.glob("_fusedqk_cuda*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise UserError(f"the build finished but left no _fusedqk_cuda module in {HERE} ({log})")
    return built[-1]
