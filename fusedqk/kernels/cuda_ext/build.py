"""Build the optional CUDA extension (``fusedqk build-ext``) into this package folder.

Needs no GPU and no driver: nothing here imports mlx.core (which cannot load without the
driver's libcuda.so.1), so an image's build stage can build it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from fusedqk.errors import UserError

HERE = Path(__file__).resolve().parent


def _cuda_version(include_dir: Path) -> str:
    """CUDA_VERSION from cuda.h (13000 → 13.0)."""
    m = re.search(r"#define CUDA_VERSION (\d+)", (include_dir / "cuda.h").read_text(errors="replace"))
    return f"{int(m.group(1)) // 1000}.{int(m.group(1)) % 1000 // 10}" if m else "unknown"


def _compiler(build_dir: Path) -> str:
    cache = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    m = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.+)$", cache, re.M)
    if not m:
        return "unknown"
    out = subprocess.run([m.group(1), "--version"], capture_output=True, text=True)
    return (out.stdout.splitlines() or ["unknown"])[0]


def build(build_dir: Path, mlx_root: Path | None = None, fmt_include: Path | None = None,
          targets: tuple[int, ...] = (90,)) -> Path:
    """Check with NVRTC that the kernel compiles for each of ``targets`` (sm numbers) with the
    headers the module is built against, configure and build with CMake, and record the build
    beside the module (``doctor.BUILD_INFO``); returns the built module's path. Every failure is one
    UserError line naming what is missing; the compiler's output stays in ``build_dir``."""
    from fusedqk import doctor

    root = mlx_root or doctor.mlx_root()
    if root is None or not (root / "include" / "mlx" / "backend" / "cuda" / "device.h").is_file():
        raise UserError(f"--mlx-root {root}: no MLX CUDA headers there (include/mlx/backend/cuda);"
                        " install MLX's CUDA build (pip install 'mlx[cuda13]')")
    cuda_include = doctor.cuda_include_dirs(root)[-1]
    if not (cuda_include / "cuda.h").is_file():
        raise UserError(f"no cuda.h in {cuda_include}, where MLX's JIT takes the CUDA headers "
                        "from: install nvidia-cuda-runtime (mlx[cuda13] brings it) or set CUDA_HOME")
    if not (cuda_include / "crt" / "host_config.h").is_file():
        raise UserError(f"no crt/host_config.h in {cuda_include} (cuda_runtime.h includes it): "
                        "pip install 'fusedqk[cuda-ext]' (nvidia-cuda-crt) or use a CUDA toolkit")
    if shutil.which("cmake") is None:
        raise UserError("cmake is not on PATH; the extension builds with CMake >= 3.24")
    if importlib.util.find_spec("nanobind") is None:
        raise UserError("nanobind is not installed for this Python; pip install 'nanobind>=3,<4' "
                        "(the nanobind ABI that mlx.core is built with)")
    # The kernel must compile for every target before anything is built.
    checked = _check_targets(root, targets)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    configure = ["cmake", "-S", str(HERE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-DMLX_ROOT={root}",
                 f"-DCUDA_INCLUDE_DIR={cuda_include}", f"-DFUSEDQK_OUTPUT_DIR={HERE}"]
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
    info = {
        "format": "fusedqk-cuda-ext/1",
        "module": built[-1].name,
        "mlx": importlib.metadata.version("mlx"),
        "nanobind": importlib.metadata.version("nanobind"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "compiler": _compiler(build_dir),
        "cuda_headers": str(cuda_include),
        "cuda_headers_version": _cuda_version(cuda_include),
        # The module holds no device code: NVRTC compiles the kernel at first use for the card's
        # own architecture. These are the architectures it was seen to compile for at build.
        "checked_targets": [f"sm_{t}" for t in checked],
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (HERE / doctor.BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return built[-1]


def _check_targets(root: Path, targets: tuple[int, ...]) -> list[int]:
    """The targets, once NVRTC compiled the kernel for each; the first failure is one line."""
    from fusedqk import doctor

    failed = [c for c in doctor.nvrtc_checks(root, list(targets)) if not c.ok]
    if failed:
        raise UserError(f"--targets: {failed[0].what}: {failed[0].detail}")
    return list(targets)
