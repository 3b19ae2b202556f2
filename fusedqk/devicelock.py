"""One timing measurement per device on a host: an OS file lock that every measuring command
takes before it measures, whoever started it (two pipelines, two SLURM jobs on one node, a
manual ``fusedqk bench``). What the lock saw goes into every result's environment.

A timing measurement (bench, blockbench) holds it exclusively. An identity check holds it shared:
bits do not depend on what else runs, so checks may run together, but never beside a timing
measurement, which they would slow.

The lock files live in ``$FUSEDQK_LOCK_DIR`` (default ``<temp dir>/fusedqk-locks``), one per
backend and device: ``cuda-<gpu>.lock`` for the GPU the process measures on (``visible_gpu``:
the first entry of ``CUDA_VISIBLE_DEVICES``, which MLX's CUDA backend honours, else 0), so jobs
on different GPUs of one host never wait for each other; the CPU has one for the whole host. Each
holder appends one JSON line to ``<lock>.history`` before it lets go (pid, command, when it
took and released the lock, how long it waited): the host's record of who measured when.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fusedqk import phases
from fusedqk.errors import UserError
from fusedqk.hostinfo import ENV_VISIBLE, visible_gpus

ENV_LOCK_DIR = "FUSEDQK_LOCK_DIR"
# What the lock held by this process saw when it was taken: read by envinfo.environment().
HELD: dict = {}


def lock_dir() -> Path:
    """``$FUSEDQK_LOCK_DIR``, which must be absolute: a relative one would name a different
    lock for every working directory, and two measurements would both hold "the" lock."""
    value = os.environ.get(ENV_LOCK_DIR)
    if value is None:
        return Path(tempfile.gettempdir()) / "fusedqk-locks"
    if not os.path.isabs(value) or value != value.strip() or "\0" in value:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise UserError(f"{ENV_LOCK_DIR}={shown!r}: not an absolute path; give the absolute path "
                        "of a directory every measuring process on this host shares, or unset it")
    return Path(value)


def visible_gpu() -> str:
    """The GPU a cuda measurement in this process runs on, as the lock names it: the first entry
    of ``CUDA_VISIBLE_DEVICES`` (``hostinfo.visible_gpus``), else ``0`` (MLX takes the first
    device it sees). Checked on an H100 on 2026-12-06 (MLX 0.32.4): with
    ``CUDA_VISIBLE_DEVICES=0`` MLX runs on it; naming a GPU the host lacks, or none, fails at
    import ("no CUDA-capable device is detected")."""
    gpus = visible_gpus()
    return gpus[0] if gpus else "0"


def _others_held(directory: Path, own: Path) -> list[str]:
    """The host's other GPU jobs at this moment: every other ``cuda-*.lock`` someone holds."""
    busy = []
    for path in sorted(directory.glob("cuda-*.lock")):
        if path == own:
            continue
        try:
            fd = _open_own(path, os.O_RDONLY)
        except OSError:
            continue
        with os.fdopen(fd) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:  # held exclusively: a timing job on that GPU
                busy.append(f"{path.stem}: {_holder(path)}")
    return busy


def _holder(path: Path) -> str:
    """Who holds the lock at ``path`` (what the holder wrote into its .holder file)."""
    try:
        doc = json.loads(path.with_suffix(".holder").read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["acquired"]))
        return f"pid {doc['pid']} ({doc['command']}) since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def others_measuring(backend: str) -> str:
    """What else was using the device when the lock was taken: other compute processes on the
    GPU (nvidia-smi), or the host's 1-minute load average on the CPU."""
    if backend == "cuda" and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return "unknown (nvidia-smi failed)"
        others = [p for p in out if p.strip() and int(p) != os.getpid()]
        return f"{len(others)} other compute process(es) on the GPU"
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def _open_own(path: Path, flags: int) -> int:
    """A file descriptor for ``path`` that never follows a link: the lock folder is shared by
    every user of the host, so a link planted there (to a file the measuring user may write)
    is refused rather than written through; only a regular file is accepted."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _append(path: Path, text: str) -> None:
    fd = _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as out:
        out.write(text)


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole through a new file renamed over it (never through a planted link)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = _open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


@contextmanager
def hold(backend: str, *, shared: bool = False) -> Iterator[dict]:
    """Hold the host-wide lock of ``backend``'s device (on cuda, the GPU this process sees
    first) while measuring: exclusively (waits for any holder) or ``shared`` (waits only for an
    exclusive holder)."""
    directory = lock_dir()
    device = visible_gpu() if backend == "cuda" else None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if directory.is_symlink():
            raise OSError(errno.ELOOP, "it is a symbolic link")
        path = directory / ("cpu.lock" if backend == "cpu" else f"{backend}-{device}.lock")
        handle = os.fdopen(_open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
    except OSError as e:
        raise UserError(f"{ENV_LOCK_DIR}={str(directory)!r}: cannot hold the device lock there "
                        f"({e.strerror}: {Path(e.filename or directory).name}); give a writable "
                        "directory of real files, not links") from None
    kind, mode = ("shared", fcntl.LOCK_SH) if shared else ("exclusive", fcntl.LOCK_EX)
    start = time.perf_counter()
    with handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fusedqk: waiting for the {backend} device lock {path}, held by {_holder(path)}",
                  file=sys.stderr, flush=True)
            with phases.phase("device_wait"):
                fcntl.flock(handle, mode)
        acquired = time.time()
        command = " ".join(sys.argv[1:5])
        with suppress(OSError):  # a convenience for whoever waits next (the last shared holder)
            _replace(path.with_suffix(".holder"), json.dumps(
                {"pid": os.getpid(), "command": f"fusedqk {command}", "acquired": acquired}))
        HELD.update(lock_file=str(path), mode=kind,
                    waited_s=round(time.perf_counter() - start, 3),
                    at_start=others_measuring(backend))
        if device is not None:
            HELD.update(gpu=device, visible_devices=os.environ.get(ENV_VISIBLE),
                        other_gpu_jobs=_others_held(directory, path))
        try:
            yield dict(HELD)
        finally:
            # Written while still held; shared holders' lines are single short appends (O_APPEND).
            record = {"pid": os.getpid(), "command": " ".join(sys.argv[1:3]),
                      "mode": kind, "acquired": acquired, "released": time.time(),
                      "waited_s": HELD.get("waited_s")}
            with suppress(OSError):  # the record is a convenience; the measurement stands
                _append(path.with_suffix(".history"), json.dumps(record) + "\n")
            fcntl.flock(handle, fcntl.LOCK_UN)
            HELD.clear()
