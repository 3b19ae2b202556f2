"""What the cuda backend loads, checked without a GPU (``fusedqk doctor``).

MLX's CUDA build cannot even be imported where the NVIDIA driver's ``libcuda.so.1`` is absent
(an image build, a CPU host, a login node), so nothing here imports ``mlx.core``: the shared
libraries are resolved by the dynamic loader itself (``ldd``), the headers are looked up where
MLX's JIT looks for them, and the fused kernel's translation unit is compiled for each named GPU
architecture with the NVRTC the wheel loads, through ctypes. What a GPU host adds (the driver and
a device) is reported, and is a failure only where it is required.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fusedqk.errors import UserError
from fusedqk.hostinfo import nvidia_smi

# The driver's library: on a GPU host the NVIDIA container toolkit mounts it into a container.
DRIVER_LIBRARY = "libcuda.so.1"
# The headers the kernel's translation unit includes (cuda_source.py and qkv_norm_rope.cuh),
# found in the CUDA include folder, and one CCCL header MLX's own kernels include.
KERNEL_HEADERS = ("cuda_bf16.h", "cuda_fp16.h", "cooperative_groups.h",
                  "cooperative_groups/reduce.h")
CCCL_HEADER = "cuda/std/type_traits"
# The layout the NVRTC check compiles: qwen3-0.6b's attention, 4-bit, group 64, bfloat16 (the
# pipeline's default quantization), in both variants the primitive builds (kernel, kernel_kv).
CHECK_MODEL, CHECK_BITS, CHECK_GROUP, CHECK_DTYPE = "qwen3-0.6b", 4, 64, "bfloat16"
BUILD_INFO = "_fusedqk_cuda.json"  # written beside the primitive by fusedqk build-ext


@dataclass
class Check:
    """One thing the cuda backend needs: found (``ok``) or not, with where or why. ``required``
    False: reported, not a failure (the driver and the GPU on a host without one)."""

    what: str
    ok: bool
    detail: str
    required: bool = True


def mlx_root() -> Path | None:
    """The installed mlx package folder (lib/libmlx.so, include/), found without importing it."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cuda_include_dirs(root: Path) -> list[Path]:
    """Where NVRTC looks for headers when MLX 0.32.4 (and the primitive) compile a kernel: the
    CCCL beside libmlx.so, then the CUDA headers of the nvidia-cuda-runtime wheel beside the mlx
    package (site-packages/nvidia/cu13/include), else $CUDA_HOME, $CUDA_PATH or /usr/local/cuda.
    Read from MLX's jit_module.cpp and libmlx.so's strings; primitive.cpp has the same order."""
    dirs = []
    if (root / "include" / "cccl").is_dir():
        dirs.append(root / "include" / "cccl")
    wheel = root.parent / "nvidia" / "cu13" / "include"
    if wheel.is_dir():
        return [*dirs, wheel]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return [*dirs, Path(home) / "include"]


@functools.cache  # the checks and the NVRTC lookup ask about libmlx.so: one ldd
def resolve_libraries(binary: Path, loaded_from: Path | None = None) -> dict[str, str | None]:
    """Each shared library ``binary`` needs, directly or through another, and the path the
    dynamic loader finds for it (None: not found), as ``ldd`` reports them. ``loaded_from``: a
    folder whose libraries the process has loaded already (the primitive finds libmlx.so that
    way: mlx.core loads it first, whatever the primitive's own search path says)."""
    if shutil.which("ldd") is None:
        raise UserError("ldd is not on PATH (Debian and Ubuntu: package libc-bin); the doctor "
                        "resolves libraries with it")
    env = dict(os.environ)
    if loaded_from is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(loaded_from), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60,
                         env=env)
    found: dict[str, str | None] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (not found|(\S+) \(0x[0-9a-f]+\))", line)
        if m:
            found[m.group(1)] = m.group(3)
    return found


def _library_checks(binary: Path, label: str, driver_required: bool,
                    one_line: bool = False, loaded_from: Path | None = None) -> list[Check]:
    """A line for each library ``binary`` needs (``one_line``: one for all that were found)."""
    checks, found = [], []
    for name, path in resolve_libraries(binary, loaded_from).items():
        if path is not None:
            found.append(name)
            if not one_line:
                checks.append(Check(f"{label} needs {name}", True, path))
        elif name == DRIVER_LIBRARY:
            checks.append(Check(f"{label} needs {name}", False,
                                "the NVIDIA driver's library is not here: on a GPU host it comes "
                                "with the driver (in a container: --gpus all, or CDI)",
                                driver_required))
        else:
            checks.append(Check(f"{label} needs {name}", False, "not found by the dynamic loader"))
    if one_line:
        checks.insert(0, Check(f"{label}'s libraries", True, f"{len(found)} found"))
    return checks


class Nvrtc:
    """The NVRTC library the wheel loads, through ctypes: version, architectures, compile."""

    def __init__(self, path: str):
        # NVRTC opens its builtins library by name at compile time. In MLX's process the loader
        # finds it through libmlx.so's RPATH (libmlx.so loaded libnvrtc); loaded here directly,
        # libnvrtc has no such path, so the builtins beside it are loaded first, by path.
        for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(code).decode()}")

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)),
                    "nvrtcVersion")
        return f"{major.value}.{minor.value}"

    def architectures(self) -> list[int]:
        count = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)),
                    "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * count.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, source: str, name: str, arch: int, include_dirs: list[Path]) -> int:
        """Machine code bytes for ``arch`` (sm_XY, as MLX compiles for the card it runs on);
        a failure raises with NVRTC's first error line."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                                b"fusedqk_check.cu", 0, None, None),
                    "nvrtcCreateProgram")
        try:
            self._check(self.lib.nvrtcAddNameExpression(prog, name.encode()),
                        "nvrtcAddNameExpression")
            options = [f"--gpu-architecture=sm_{arch}".encode()]
            options += [f"--include-path={d}".encode() for d in include_dirs]
            argv = (ctypes.c_char_p * len(options))(*options)
            if self.lib.nvrtcCompileProgram(prog, len(options), argv) != 0:
                size = ctypes.c_size_t()
                self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value + 1)
                self.lib.nvrtcGetProgramLog(prog, log)
                errors = [line for line in log.value.decode(errors="replace").splitlines()
                          if "error" in line] or ["(no log)"]
                raise RuntimeError(errors[0].strip())
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)),
                        "nvrtcGetCUBINSize")
            return size.value
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def check_layout():
    from fusedqk import registry
    from fusedqk.kernels.cuda_source import QKVLayout

    c = registry.configs()[CHECK_MODEL]
    return QKVLayout(hidden=c["hidden_size"], n_heads=c["num_attention_heads"],
                     n_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                     eps=c["rms_norm_eps"], bits=CHECK_BITS, group_size=CHECK_GROUP,
                     rope_base=c["rope_theta"])


def compile_kernel(nvrtc: Nvrtc, arch: int, include_dirs: list[Path]) -> list[Check]:
    """The primitive's two translation units (kernel, and kernel_kv's cache-writing one) for
    one architecture."""
    from fusedqk.kernels.cuda_source import translation_unit

    checks = []
    for writes_cache in (False, True):
        variant = "kernel_kv" if writes_cache else "kernel"
        name, source = translation_unit(check_layout(), CHECK_DTYPE, writes_cache=writes_cache)
        what = f"NVRTC compiles the {variant} unit for sm_{arch}"
        try:
            size = nvrtc.compile(source, name, arch, include_dirs)
            checks.append(Check(what, True, f"{size} bytes of machine code ({CHECK_MODEL}, "
                                f"{CHECK_BITS}-bit g{CHECK_GROUP}, {CHECK_DTYPE})"))
        except RuntimeError as e:
            checks.append(Check(what, False, str(e)))
    return checks


def nvrtc_checks(root: Path, targets: list[int]) -> list[Check]:
    """The NVRTC libmlx.so loads: found, its version and architectures, and the kernel's two
    translation units compiled for each of ``targets`` with the headers MLX's JIT would use."""
    nvrtc_path = next((p for n, p in resolve_libraries(root / "lib" / "libmlx.so").items()
                       if n.startswith("libnvrtc.so") and p), None)
    if nvrtc_path is None:
        return [Check("NVRTC", False, "libnvrtc.so.13 not found: no kernel can compile")]
    nvrtc = Nvrtc(nvrtc_path)
    supported = nvrtc.architectures()
    checks = [Check("NVRTC", True, f"{nvrtc.version()} at {nvrtc_path}, compiles for "
                    + " ".join(f"sm_{a}" for a in supported))]
    for arch in targets:
        if arch not in supported:
            checks.append(Check(f"NVRTC compiles for sm_{arch}", False,
                                f"NVRTC {nvrtc.version()} does not compile for it"))
        else:
            checks += compile_kernel(nvrtc, arch, cuda_include_dirs(root))
    return checks


def parse_targets(text: str) -> list[int]:
    """``90`` or ``80,90,100`` (sm_ numbers) into a list; one line naming the accepted form."""
    try:
        targets = [int(t.strip().removeprefix("sm_")) for t in text.split(",")]
    except ValueError:
        targets = []
    if not targets or any(t < 10 or t > 999 for t in targets):
        raise UserError(f"--targets {text!r}: give GPU architectures as sm numbers separated "
                        "by commas, e.g. 90 or 80,90,100")
    return targets


def primitive_checks(driver_required: bool) -> list[Check]:
    """The C++ primitive: built for this Python, against the installed MLX, and its libraries."""
    folder = Path(importlib.util.find_spec("fusedqk.kernels.cuda_ext").origin).parent
    spec = importlib.util.find_spec("fusedqk.kernels.cuda_ext._fusedqk_cuda")
    if spec is None or spec.origin is None:
        others = sorted(p.name for p in folder.glob("_fusedqk_cuda*.so"))
        why = (f"built for another Python ({', '.join(others)}; this is "
               f"{sys.version_info.major}.{sys.version_info.minor})" if others else
               "not built (`fusedqk build-ext`); the kernel is then called through "
               "mx.fast.cuda_kernel and kernel_kv is unavailable")
        return [Check("C++ primitive", False, why)]
    module = Path(spec.origin)
    checks = [Check("C++ primitive", True, str(module))]
    info_path = module.parent / BUILD_INFO
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return [*checks, Check("C++ primitive's build record", False,
                               f"{info_path} is missing or not JSON: rebuild with build-ext")]
    installed = _version("mlx")
    checks.append(Check("C++ primitive built against the installed MLX",
                        info.get("mlx") == installed,
                        f"built against MLX {info.get('mlx')}, installed {installed}; "
                        f"host code for {info.get('machine')}, {info.get('compiler')}; device "
                        f"code compiled at first use for the card's own architecture (checked "
                        f"at build for {', '.join(info.get('checked_targets', [])) or 'none'})"))
    root = mlx_root()
    return checks + _library_checks(module, "the primitive", driver_required, one_line=True,
                                    loaded_from=root / "lib" if root else None)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_checks(targets: list[int], gpu_required: bool = False) -> list[Check]:
    """Everything the cuda backend loads, in the order it loads it."""
    root = mlx_root()
    cuda_wheel = _version("mlx-cuda-13")
    if root is None or cuda_wheel is None or not (root / "lib" / "libmlx.so").is_file():
        return [Check("MLX's CUDA build", False,
                      "mlx-cuda-13 is not installed (pip install 'mlx[cuda13]'; the image "
                      "carries it)")]
    gpu_name = nvidia_smi("name")
    gpu = gpu_name is not None or Path("/dev/nvidiactl").exists()
    libmlx = root / "lib" / "libmlx.so"
    checks = [Check("MLX's CUDA build", True, f"mlx {_version('mlx')}, mlx-cuda-13 {cuda_wheel} "
                    f"at {root}")]
    checks += _library_checks(libmlx, "libmlx.so", gpu or gpu_required)
    include_dirs = cuda_include_dirs(root)
    cuda_include, cccl = include_dirs[-1], (include_dirs[0] if len(include_dirs) > 1 else None)
    for header in KERNEL_HEADERS:
        path = cuda_include / header
        checks.append(Check(f"header {header}", path.is_file(),
                            str(path) if path.is_file() else f"not in {cuda_include}"))
    checks.append(Check("CCCL headers", cccl is not None and (cccl / CCCL_HEADER).is_file(),
                        str(cccl) if cccl else f"no include/cccl beside {libmlx}"))
    checks += nvrtc_checks(root, targets)
    checks += primitive_checks(gpu or gpu_required)
    checks.append(Check("GPU", gpu_name is not None,
                        f"{gpu_name}, driver {nvidia_smi('driver_version')}" if gpu_name else
                        "no GPU here (nvidia-smi lists none): nothing was run on a device; on a "
                        "GPU host pass it to the container (--gpus all, or CDI)", gpu_required))
    return checks


def render(checks: list[Check]) -> str:
    rows = []
    for c in checks:
        state = "ok" if c.ok else ("MISSING" if c.required else "absent")
        rows.append(f"{state:<8} {c.what}: {c.detail}")
    missing = [c.what for c in checks if c.required and not c.ok]
    if missing:
        rows.append(f"cuda backend: {len(missing)} missing: {'; '.join(missing)}")
    else:
        absent = [c.what for c in checks if not c.ok]
        rows.append("cuda backend: everything it loads is here"
                    + (f" (absent, not required here: {'; '.join(absent)})" if absent else ""))
    return "\n".join(rows)


def as_json(checks: list[Check]) -> str:
    return json.dumps({"format": "fusedqk-doctor/1",
                       "ok": all(c.ok for c in checks if c.required),
                       "checks": [asdict(c) for c in checks]}, indent=1)

