"""Is the lent machine's two-speed decode the host's doing or the GPU's? (device tool)

Decode latencies on the H100 fall into two states, about 1.7x apart (qwen3-0.6b: ~3.3 and ~5.5 ms
per token), that switch every 10-100 tokens (docs/perf-log.md). Decode here is host-bound, so
either a slower host or a slower GPU could be the cause. This probe times, many times over:

- a fixed pure-Python workload (no MLX, no GPU);
- a fixed MLX workload on the GPU (a chain of small element-wise ops, evaluated each time);

and prints for each the quantiles of its time, the fraction of repetitions in the slow state
(more than 1.3x the 10th percentile), the run lengths of that state, the CPU steal time and the
involuntary context switches meanwhile. Run it plain and under ``taskset`` to see whether pinning
the process to one CPU changes the picture.

    python tools/probe_host_noise.py [seconds per workload]
"""

from __future__ import annotations

import itertools
import resource
import sys
import time

import numpy as np

SLOW = 1.3


def _steal_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return int(fields[8]) if len(fields) > 8 else None


def _python_work() -> None:
    total = 0
    for i in range(20_000):
        total += i * i
    if total < 0:
        raise AssertionError


def _mlx_work():
    import mlx.core as mx

    x = mx.ones((4096,), mx.float32)
    mx.eval(x)

    def work() -> None:
        y = x
        for _ in range(20):
            y = y * 1.0001 + 0.5
        mx.eval(y)

    return work


def measure(name: str, work, seconds: float) -> str:
    for _ in range(20):
        work()
    steal0, usage0 = _steal_jiffies(), resource.getrusage(resource.RUSAGE_SELF)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    steal1, usage1 = _steal_jiffies(), resource.getrusage(resource.RUSAGE_SELF)
    t = np.array(times) * 1e6
    p10, p50, p90, p99 = np.percentile(t, [10, 50, 90, 99])
    slow = t > SLOW * p10
    runs = [len(list(g)) for state, g in itertools.groupby(slow) if state]
    steal = "n/a" if steal0 is None else str(steal1 - steal0)
    return (f"| {name} | {len(t)} | {p10:.0f} | {p50:.0f} | {p90:.0f} | {p99:.0f} | "
            f"{slow.mean():.1%} | {np.median(runs) if runs else 0:.0f} / {max(runs, default=0)} | "
            f"{steal} | {usage1.ru_nivcsw - usage0.ru_nivcsw} |")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    import os

    print(f"CPUs allowed: {sorted(os.sched_getaffinity(0))}")
    print("| workload | reps | p10 µs | p50 µs | p90 µs | p99 µs | slow (> 1.3 × p10) | slow run "
          "length median / max | steal jiffies (all CPUs) | involuntary switches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(measure("pure Python", _python_work, seconds), flush=True)
    print(measure("MLX on the GPU (20 small ops + eval)", _mlx_work(), seconds), flush=True)


if __name__ == "__main__":
    main()
