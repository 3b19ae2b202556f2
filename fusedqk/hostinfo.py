"""What the host has, read without MLX: NVIDIA GPUs (nvidia-smi), memory, the platform.

Used by the backend module and by the pipeline's planner, which must run where MLX may be
absent (a login node, a host that runs the measurements in containers).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from fusedqk.errors import UserError

BACKENDS = ("cpu", "cuda", "metal")  # every backend fusedqk knows, MLX present or not
ENV_VISIBLE = "CUDA_VISIBLE_DEVICES"


def _nvidia_smi_rows(query: str) -> list[str]:
    """Every GPU's ``--query-gpu`` fields as nvidia-smi prints them, one row a GPU."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    return [row.strip() for row in out if row.strip()]


def nvidia_smi(query: str) -> str | None:
    """The first GPU's ``--query-gpu`` fields as nvidia-smi prints them, or None."""
    rows = _nvidia_smi_rows(query)
    return rows[0] if rows else None


def gpu_indices() -> list[str]:
    """Every GPU nvidia-smi lists, by index."""
    return [row for row in _nvidia_smi_rows("index") if row.isdigit()]


def visible_gpus() -> list[str] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names (indices or ``GPU-``/``MIG-`` UUIDs), in its
    order, or None where it is unset; a value naming no GPU is one line."""
    value = os.environ.get(ENV_VISIBLE)
    if value is None:
        return None
    entries = [entry.strip() for entry in value.split(",")]
    if not entries[0] or not all(
            e and len(e) <= 64 and all(c.isalnum() or c == "-" for c in e) for e in entries):
        raise UserError(f"{ENV_VISIBLE}={value[:80]!r}: no GPU to measure on; give GPU indices "
                        "or UUIDs separated by commas (the first is measured on), or unset it")
    return entries


def cuda_runtime_version() -> str | None:
    """The CUDA version nvidia-smi's banner names (the driver's), or None."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    marker = "CUDA Version:"
    return out.split(marker, 1)[1].split()[0] if marker in out else None


def meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_backends() -> list[str]:
    """The GPU backends this host has hardware for: cuda where nvidia-smi lists a GPU, metal on
    Apple silicon. (Whether MLX is built for it is the backend module's question.)"""
    if nvidia_smi("name"):
        return ["cuda"]
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return ["metal"]
    return []


def device_name(backend: str) -> str:
    """The device a backend runs on, as the host names it."""
    if backend == "cuda":
        return nvidia_smi("name") or "unknown-device"
    if backend == "metal":
        return platform.machine() + "-" + (platform.mac_ver()[0] or "mac")
    return platform.machine()


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``: a name fit for a directory."""
    text = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in text:
        text = text.replace("--", "-")
    return text
