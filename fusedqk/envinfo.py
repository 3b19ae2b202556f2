"""The environment a measurement ran in, recorded beside every result file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx_lm

from fusedqk import __version__, devicelock
from fusedqk.backend import as_dict, device_info

if TYPE_CHECKING:
    from fusedqk.engines.builtin import Prepared

ENV_IMAGE_ID = "FUSEDQK_IMAGE_ID"
ENV_GIT_COMMIT = "FUSEDQK_GIT_COMMIT"  # images and copied trees, whose .git is absent or stale


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit the caller names (FUSEDQK_GIT_COMMIT) wins: a copied tree may carry a .git
    that is not the source it holds (seen on the device machine)."""
    if os.environ.get(ENV_GIT_COMMIT):
        return {"git_commit": os.environ[ENV_GIT_COMMIT], "git_dirty": None}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": dirty}


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment(prep: Prepared | None = None) -> dict:
    """Backend, device, driver/CUDA, versions, git state, Python, host, container image."""
    env = {
        **as_dict(device_info()),
        "fusedqk": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        **git_state(),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "hostname": platform.node(), "container_image_id": os.environ.get(ENV_IMAGE_ID),
        # MLX reads its own switches from the environment (e.g. MLX_CUDA_USE_CUDNN_SDPA).
        "mlx_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")},
        "recorded_at": now_utc(),
        # The device lock this measurement held: how long it queued, what else was running.
        "device_lock": dict(devicelock.HELD) or None,
    }
    if prep is not None:
        env.update({
            "model": prep.loaded.name, "model_source": prep.loaded.source,
            "bits": prep.quant.bits, "group_size": prep.quant.group_size, "dtype": prep.quant.dtype,
            "fused_layers": prep.paths.report.fused_layers,
            "graph_only_layers": prep.paths.report.graph_layers,
            "kernel_fallback": prep.paths.report.kernel_fallback,
            "kernel_call": prep.paths.report.kernel_call,
        })
    return env


def env_report(backend: str) -> dict:
    """What ``fusedqk env`` reports: the environment, the backends here, and what the toggle
    resolves to on ``backend`` (the kernel call too, on cuda)."""
    from fusedqk.backend import available_backends
    from fusedqk.kernels.qkv_norm_rope import has_kernel
    from fusedqk.toggle import kernel_call, resolve

    res = resolve(backend, has_kernel(backend))
    report = {
        "backends_available": available_backends(), **environment(),
        "fused_qk_norm": res.path == "fused", "impl": res.impl,
        "path_source": res.path_source, "impl_source": res.impl_source,
        "kernel_available": has_kernel(backend),
    }
    if backend == "cuda":
        report["kernel_call"], report["kernel_call_source"] = kernel_call(backend)
    return report


ENV_WIDTH = 100  # `fusedqk env` fits a terminal this wide; the full reasons are in the docs


def render_env(report: dict, backend: str) -> str:
    """``env_report``'s lines for a reader, one screen of at most ENV_WIDTH columns: versions,
    device, the fused path on ``backend`` and, in a line each, why and what runs here. The full
    reasons and every run they rest on are in docs/configuration.md and the defaults table."""
    import textwrap

    from fusedqk.attention import runnable_impl
    from fusedqk.toggle import ENV_DEFAULTS, load_defaults

    def gib(b: int | None) -> str:
        return f"{b / 2**30:.1f} GiB" if b else "unknown"

    def row(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, ENV_WIDTH, initial_indent=f"{label:<13}",
                             subsequent_indent=" " * 13, break_on_hyphens=False) or [label]

    lines = [f"fusedqk {report['fusedqk']}  mlx {report['mlx']}  mlx-lm {report['mlx_lm']}",
             *row("backend", f"{backend} (available: {', '.join(report['backends_available'])})"),
             *row("device", f"{report['device_name']}  memory {gib(report['memory_total_bytes'])} "
                            f"total, {gib(report['memory_free_bytes'])} free")]
    if report["driver_version"]:
        lines += row("driver", f"{report['driver_version']}  CUDA {report['cuda_version']}")
    table = load_defaults(os.environ.get(ENV_DEFAULTS))
    entry = table.backends.get(backend)
    state = "on" if report["fused_qk_norm"] else "off"
    from_default = report["path_source"].startswith("default for")
    source = f"default for {backend} from {table.source}" if from_default else report["path_source"]
    lines += row("fused path", f"{state}  ({source})")
    if entry is not None and entry.summary:
        lines += row("  why", entry.summary)
    shipped = load_defaults().backends.get(backend)
    if shipped is not None:
        said, run = shipped.card_summary(report["device_name"])
        lines += row("  this card", f"{report['device_name']}: {said}")
        if run:
            lines += row("  evidence", run)
    impl = report["impl"]
    lines += row("impl", f"{impl}  ({report['impl_source'].split(':')[0]})")
    if "kernel_call" in report:
        primitive = report["kernel_call"] == "primitive"
        runs = runnable_impl(impl, primitive, report["kernel_available"])
        if runs != impl:
            why = ("no C++ primitive here (`fusedqk build-ext` builds it)" if impl == "kernel_kv"
                   else "no kernel for this backend")
            lines += row("  runs as", f"{runs}: {why}")
        lines += row("kernel call", f"{report['kernel_call']}  ({report['kernel_call_source']})")
    if "engine" in report:
        engine = report["engine"]
        build = engine.get("llama_cpp_build") or {}
        lines += row("engine", f"{engine['name']} ({engine['file']})  "
                               f"{engine.get('version') or 'version unknown'}"
                               + (f"  built {build['backend']} from {build['commit'][:7]}"
                                  if build.get("commit") else ""))
    lines += row("more", "docs/configuration.md: every default, its full reason and the runs "
                         "it rests on")
    return "\n".join(lines)
