"""Which MLX backend this process runs on, what the device is, and how much memory it has free."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import mlx.core as mx

from fusedqk.errors import UserError
from fusedqk.hostinfo import BACKENDS, cuda_runtime_version, meminfo, nvidia_smi


def available_backends() -> list[str]:
    """Backends this machine's MLX build can run, GPU first."""
    found = []
    if mx.cuda.is_available():
        found.append("cuda")
    if mx.metal.is_available():
        found.append("metal")
    found.append("cpu")
    return found


def current_backend() -> str:
    """The backend MLX's default device runs on."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def select_backend(name: str) -> str:
    """Make ``name`` (cpu, cuda, metal or auto) MLX's default device, or fail naming what exists."""
    if name == "auto":
        name = available_backends()[0]
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r} is not a backend; accepted: auto, {', '.join(BACKENDS)}")
    have = available_backends()
    if name not in have:
        hint = ("; `fusedqk doctor` checks what the cuda backend needs (MLX's CUDA build, "
                "its libraries, NVRTC)" if name == "cuda" else "")
        raise UserError(
            f"backend {name!r} is not available on this machine (MLX {mx.__version__} here has: "
            f"{', '.join(have)}){hint}"
        )
    mx.set_default_device(mx.cpu if name == "cpu" else mx.gpu)
    return name


@dataclass
class DeviceInfo:
    backend: str
    device_name: str
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    driver_version: str | None
    cuda_version: str | None


def device_info() -> DeviceInfo:
    """Describe the current backend's device; memory figures are what a model build may use."""
    backend = current_backend()
    info = mx.device_info()
    if backend == "cpu":
        name = info.get("device_name") or platform.processor() or platform.machine()
        total, free = meminfo("MemTotal"), meminfo("MemAvailable")
        driver = cuda = None
    else:
        name = str(info.get("device_name", backend))
        total = info.get("memory_size")
        total = int(total) if total else None
        free = total - mx.get_active_memory() if total else None
        if total is None and backend == "cuda":  # MLX's CUDA build reports no memory size
            mib = nvidia_smi("memory.total,memory.free")
            if mib:
                total, free = (int(v.split()[0]) << 20 for v in mib.split(","))
        driver = nvidia_smi("driver_version") if backend == "cuda" else None
        cuda = cuda_runtime_version() if backend == "cuda" else None
    return DeviceInfo(backend, name, total, free, driver, cuda)


def as_dict(info: DeviceInfo) -> dict:
    return asdict(info)
