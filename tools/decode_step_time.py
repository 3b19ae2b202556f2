"""The GPU's share of a decode step, per path: every kernel of whole decode steps, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --csv --metrics gpu__time_duration.sum \\
        python tools/decode_step_time.py run qwen3-8b kernel > ncu-step-qwen3-8b-kernel.csv
    python tools/decode_step_time.py summary [--steps N] ncu-step-*.csv

``run`` builds the model (synthetic weights, 4-bit g64 bf16), prefills a 64-token prompt and
decodes warm-up steps on one path outside the profiled range, then profiles STEPS decode steps
(each evaluated on its own: ncu serialises kernels anyway). ``summary`` sums the kernels' device
time per step and counts the kernels. Built to tell whether decode waits on the GPU or on the
host; on the H100 it could not (docs/perf-log.md, session 6): ncu replays kernels one by one
with the GPU idling between them, and the sums exceeded the bench's wall time per step. The
kernel counts and path-against-path differences stand.
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from fusedqk.attention import DecodePaths
from fusedqk.decode import random_prompt
from fusedqk.models import Quantization, load_model
from tools.ncu_summary import read, to_us

STEPS, WARMUP, PROMPT = 1, 8, 64


def run(model_name: str, path: str) -> None:
    loaded = load_model(model_name, Quantization(4, 64, "bfloat16"), 0)
    DecodePaths(loaded.model, "cuda").use(path)
    model, cache = loaded.model, make_prompt_cache(loaded.model)
    token = mx.argmax(model(random_prompt(loaded.config["vocab_size"], PROMPT, 0)[None],
                            cache=cache)[:, -1, :], axis=-1)
    for _ in range(WARMUP):
        token = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
    cuda = ctypes.CDLL("libcuda.so.1")
    if cuda.cuProfilerStart() != 0:
        sys.exit("cuProfilerStart failed: no current CUDA context on this thread")
    for _ in range(STEPS):
        token = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
    cuda.cuProfilerStop()


def summary(paths: list[str], steps: int = STEPS) -> None:
    print("| model | path | kernels per step | device µs per step | largest kernels (µs per step) |")
    print("|---|---|---|---|---|")
    for p in map(Path, paths):
        name = re.match(r"ncu-step-(.+)-(graph|composite|kernel)\.csv(?:\.gz)?", p.name)
        per_kernel: dict[str, float] = defaultdict(float)
        count = 0
        for row in read(p):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                per_kernel[row["Kernel Name"].split("(")[0][-40:]] += to_us(
                    row["Metric Value"], row.get("Metric Unit", "ns"))
                count += 1
        total = sum(per_kernel.values()) / steps
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]
        tops = "; ".join(f"`{k.strip()}` {v / steps:.0f}" for k, v in top)
        print(f"| {name[1]} | {name[2]} | {count / steps:.0f} | {total:.0f} | {tops} |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif sys.argv[2] == "--steps":
        summary(sys.argv[4:], int(sys.argv[3]))
    else:
        summary(sys.argv[2:])
