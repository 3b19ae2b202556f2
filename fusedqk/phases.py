"""Where one process's time goes: the seconds since it started, and named phases within them.

A measuring command records its phases here (``device_wait``: waiting for the device lock;
``weights``: building or loading the model;
``warmup``: the untimed runs, where MLX compiles its kernels; ``measure``: the timed part;
``controls``: identity's fresh processes), and its status file carries the snapshot, so a
run's report can say, per job, where the time went.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("device_wait", "weights", "warmup", "measure", "controls")

_imported_at = time.monotonic()
_seconds: dict[str, float] = {}


def _process_age_s() -> float | None:
    """Seconds since this process started, from the kernel's record (Linux); None elsewhere.

    Python's own start-up and imports happen before any module of fusedqk runs, so only the
    kernel's start time counts them."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22, start time in clock ticks since boot; the command name before it may
            # hold spaces, so count from its closing parenthesis.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_age_at_import = _process_age_s()


def since_start() -> float:
    """Seconds since the process started (since fusedqk was imported, where the kernel's start
    time cannot be read)."""
    return (_age_at_import or 0.0) + time.monotonic() - _imported_at


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the time spent inside the block to phase ``name``."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
    start = time.monotonic()
    try:
        yield
    finally:
        _seconds[name] = _seconds.get(name, 0.0) + time.monotonic() - start


def snapshot() -> dict:
    """``{"process_s": ..., "weights_s": ..., ...}``: seconds, rounded to milliseconds; phases
    that never ran are left out."""
    out = {"process_s": round(since_start(), 3)}
    out.update({f"{name}_s": round(_seconds[name], 3) for name in PHASES if name in _seconds})
    return out
