"""Block benchmark: the QKV projection + q/k RMSNorm + RoPE block of every layer, for one token.

For each path (graph, composite, kernel where the backend has one, kernel_kv where the C++
primitive runs: the kernel with its KV cache write) it times the block of all
layers built and evaluated together, as a decode step pays for it (host work included; the
graph-building part alone is reported too), and compares it with two floors:

- the weight-read floor: the QKV weight, scale and bias bytes over the memory bandwidth,
  measured here with a large copy unless given;
- the launch floor (path ``launch``, where the backend has a kernel): the kernel's own launch,
  called and compiled the same way, with an empty body. No one-launch-per-layer kernel made
  through MLX's custom-kernel call can take less, so its speedup over graph bounds any kernel's.

Beside the times, it counts the nodes MLX builds (from MLX's own graph export): per layer for
the block, and for one whole decode step per path (the KV cache's update included), since at
batch 1 a decode step's cost follows its number of nodes more than its bytes. The device time of
the kernels alone comes from a profiler (tools/device.sh runs Nsight Compute over this command).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import mlx.core as mx
import pandas as pd

from fusedqk import formats, phases
from fusedqk.atomic import write_text
from fusedqk.attention import FusedQKNormAttention
from fusedqk.envinfo import environment
from fusedqk.errors import UserError
from fusedqk.kernels.qkv_norm_rope import QKVNormRope, decode_call, has_kernel

if TYPE_CHECKING:
    from fusedqk.engines.builtin import Prepared

log = logging.getLogger("fusedqk")


BLOCK_PATHS = ("graph", "composite", "kernel", "kernel_kv", "launch", "kernel-cuda_kernel",
               "launch-cuda_kernel")
# Where the kernel is called through the C++ primitive, the same kernel and its empty launch are
# also timed through mx.fast.cuda_kernel (the *-cuda_kernel rows): the two calls side by side.
CUDA_KERNEL_ROWS = ("kernel-cuda_kernel", "launch-cuda_kernel")


@dataclass
class Settings:
    batch: int = 1
    reps: int = 50
    warmup: int = 5
    bandwidth: str = "measure"
    paths: tuple[str, ...] | None = None  # None: every path the backend runs


def measure_bandwidth_gbs(nbytes: int | None = None) -> float:
    """Device memory bandwidth from an elementwise copy (bytes read + bytes written): the best
    of 20 timed copies, as STREAM reports it. A slow host stretches some copies' wall time; with
    the median one H100 job read 1787 GB/s where the others read ~2700 (docs/perf-log.md)."""
    if nbytes is None:
        nbytes = (1 << 30) if mx.default_device() == mx.gpu else (256 << 20)
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)
    times = []
    for _ in range(22):
        t = time.perf_counter()
        mx.eval(x + 1.0)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times[2:]) / 1e9


def _graph_block(attn, x: mx.array, offset: int):
    """mlx-lm's own ops for the block, as its Attention.__call__ runs them on decode."""
    b = x.shape[0]
    q = attn.q_norm(attn.q_proj(x).reshape(b, 1, attn.n_heads, -1)).transpose(0, 2, 1, 3)
    k = attn.k_norm(attn.k_proj(x).reshape(b, 1, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(b, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v


class Timing(NamedTuple):
    """One path's block time in µs (median, 10th and 90th percentile) and its first call's."""

    median: float
    p10: float
    p90: float
    first_call_us: float | None  # None without warm-up


def interleaved_us(blocks: dict[str, Callable[[], object]], reps: int,
                   warmup: int) -> dict[str, Timing]:
    """Each path's timing. Each repetition times every path once, in an order rotated per
    repetition, so that the paths share the host's slow and fast spells: timed one path after
    another, a spell lands on one path only (2026-11-27, H100: the empty kernel once timed
    slower than the kernel, docs/perf-log.md). The first warm-up call of each path is timed
    apart: it holds what MLX builds on first use (compiled kernels, plans)."""
    first: dict[str, float] = {}
    with phases.phase("warmup"):
        for name, fn in blocks.items():
            for i in range(warmup):
                t = time.perf_counter()
                mx.eval(fn())
                if i == 0:
                    first[name] = (time.perf_counter() - t) * 1e6
    names = list(blocks)
    times: dict[str, list[float]] = {n: [] for n in names}
    with phases.phase("measure"):
        for i in range(reps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                mx.eval(blocks[name]())
                times[name].append((time.perf_counter() - t) * 1e6)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = Timing(statistics.median(ts), q[0], q[-1], first.get(name))
    return out


def _kernel_fn(m: FusedQKNormAttention, backend: str, call: str | None, launch_only: bool):
    """One layer's kernel called as a decode step calls it (attention.py)."""
    return decode_call(QKVNormRope(m.layout, m.qkv_scales.dtype, backend,
                                   launch_only=launch_only, call=call))


def _build_us(fn, reps: int = 20) -> float:
    """Host time to build the block's graph (Python and MLX's graph construction), no eval."""
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


KERNEL_ROWS = ("kernel", "kernel_kv", "launch", *CUDA_KERNEL_ROWS)
# The kernel_kv row's cache buffers: one step of mlx-lm's KVCache, written at position OFFSET.
CACHE_POSITIONS = 256


def check_backend(names: tuple[str, ...], backend: str) -> None:
    """Refuse, before any weights are made, rows that need a kernel where the backend has none
    (``run`` refuses the rest: a layout the kernel does not cover, a missing primitive)."""
    missing = [n for n in names if n in KERNEL_ROWS and not has_kernel(backend)]
    if missing:
        raise UserError(f"--paths {','.join(names)}: {', '.join(missing)} cannot run on {backend} "
                        "(kernel and launch run where a kernel exists: cuda, metal); accepted "
                        "here: graph, composite")


def measure_blocks(prep: Prepared, settings: Settings) -> dict:
    """Time every path's block; returns rows (one per path) plus the environment."""
    paths = prep.paths
    fused = [m for m in paths.fused if isinstance(m, FusedQKNormAttention)]
    if not fused:
        raise UserError(f"--model {prep.loaded.name}: no layer can take the fused path "
                        f"({'; '.join(paths.report.blockers)})")
    hidden = fused[0].layout.hidden
    dtype = fused[0].graph_attn.q_norm.weight.dtype
    x = mx.random.normal((settings.batch, 1, hidden), key=mx.random.key(7)).astype(dtype)
    offset = 100
    mx.eval(x)
    layer_bytes = [m.qkv_weight.nbytes + m.qkv_scales.nbytes + m.qkv_biases.nbytes for m in fused]
    with phases.phase("measure"):
        bw = (measure_bandwidth_gbs() if settings.bandwidth == "measure"
              else _parse_bandwidth(settings.bandwidth))
    # kernel runs where the backend has one; the launch floor is the kernel's own launch, so only
    # where the kernel itself runs. Paths asked for by name must all run; the default (None)
    # times what this backend has.
    runnable = {"graph", "composite"}
    if has_kernel(prep.backend):
        runnable.add("kernel")
        if not paths.report.kernel_fallback:
            runnable.add("launch")
            if paths.report.kernel_call == "primitive":
                runnable.update(CUDA_KERNEL_ROWS)
            if not paths.report.cache_fallback:
                runnable.add("kernel_kv")
    names = [p for p in (settings.paths or BLOCK_PATHS) if p in runnable]
    missing = [p for p in (settings.paths or ()) if p not in runnable]
    if missing:
        raise UserError(f"--paths {','.join(settings.paths)}: {', '.join(missing)} cannot run on "
                        f"{prep.backend} (kernel and launch run where a kernel exists: cuda, "
                        "metal; kernel_kv and the -cuda_kernel rows where the C++ primitive "
                        "runs); accepted "
                        f"here: {', '.join(p for p in BLOCK_PATHS if p in runnable)}")
    total_bytes = sum(layer_bytes)
    floor_us = total_bytes / (bw * 1e9) * 1e6
    # Where the kernel falls back (an uncovered layout), `kernel` times the composite, as a
    # decode step would run it.
    kernel_impl = "composite" if paths.report.kernel_fallback else "kernel"
    if "kernel" in names and paths.report.kernel_fallback:
        log.warning("kernel unavailable, timing composite: %s", paths.report.kernel_fallback)
    blocks: dict[str, Callable[[], object]] = {}
    for name in names:
        if name == "graph":
            def block(a=paths.graph):
                return [_graph_block(m, x, offset) for m in a]
        elif name == "kernel_kv":
            # The block with its cache write: k and v land in the layer's cache buffers, and
            # the views attention reads come back (what a decode step on kernel_kv builds).
            caches = [tuple(mx.zeros((settings.batch, m.layout.n_kv_heads, CACHE_POSITIONS,
                                      m.layout.head_dim), dtype) for _ in "kv") for m in fused]
            mx.eval(caches)

            def block(a=fused, c=caches):
                return [m.qkv_written(x, offset, k, v) for m, (k, v) in zip(a, c, strict=True)]
        elif name != "kernel" and name != "composite":
            call = "cuda_kernel" if name in CUDA_KERNEL_ROWS else paths.report.kernel_call
            calls = [_kernel_fn(m, prep.backend, call, launch_only=name.startswith("launch"))
                     for m in fused]

            def block(a=fused, c=calls):
                return [f(*m.kernel_inputs(x, offset)) for f, m in zip(c, a, strict=True)]
        else:
            def block(a=fused, impl=kernel_impl if name == "kernel" else name):
                return [m.qkv(x, offset, impl) for m in a]
        blocks[name] = block
    timed = interleaved_us(blocks, settings.reps, settings.warmup)
    rows = []
    for name, block in blocks.items():
        med, p10, p90, first_call_us = timed[name]
        with phases.phase("measure"):
            build_us = _build_us(block)
        rows.append({
            "model": prep.loaded.name, "backend": prep.backend, "path": name,
            "batch": settings.batch, "layers": len(fused),
            "weight_bytes_per_layer": layer_bytes[0], "token_us": med, "token_us_p10": p10,
            "token_us_p90": p90, "layer_us": med / len(fused), "build_us": build_us,
            "first_call_s": None if first_call_us is None else first_call_us / 1e6,
            "token_gbs": None if "launch" in name else total_bytes / (med * 1e-6) / 1e9,
            "floor_token_us": floor_us, "token_over_floor": med / floor_us,
            "bandwidth_gbs": bw, "reps": settings.reps,
            "kernel_call": ("cuda_kernel" if name in CUDA_KERNEL_ROWS
                            else paths.report.kernel_call if name in ("kernel", "launch")
                            and kernel_impl == "kernel" else None),
        })
    graph_us = next((r["token_us"] for r in rows if r["path"] == "graph"), None)
    step_paths = {"graph": "graph", "composite": "composite", "kernel": kernel_impl,
                  "kernel_kv": "kernel_kv"}
    for r in rows:
        r["speedup_vs_graph"] = graph_us / r["token_us"] if graph_us else None
        r["nodes_per_layer"] = graph_nodes(blocks[r["path"]]()) / len(fused)
        step = (decode_step_nodes(prep, step_paths[r["path"]]) if r["path"] in step_paths
                else None)
        r["step_nodes"] = step
        r["step_nodes_per_layer"] = step / len(fused) if step else None
    return {"rows": rows, "settings": asdict(settings), "environment": environment(prep)}


def graph_nodes(outputs: list) -> int:
    """The primitive nodes MLX has built for ``outputs`` and not yet evaluated (evaluated inputs,
    such as the weights, are not nodes), counted in MLX's own DOT export of the graph."""
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "graph.dot"
        mx.export_to_dot(str(dot), *outputs)
        return dot.read_text().count("shape=rectangle")


def decode_step_nodes(prep: Prepared, path: str) -> int:
    """The nodes of one decode step on ``path`` after a short prefill and one evaluated step
    (kernel_kv's first step copies the prefill's cache into buffers of its own, once): every
    layer's block, its KV cache update and attention, the MLPs and the head (built, never
    evaluated)."""
    from mlx_lm.models.cache import make_prompt_cache

    model = prep.loaded.model
    prep.paths.use(path)
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache), [c.state for c in cache])
        mx.eval(model(mx.array([[5]]), cache=cache), [c.state for c in cache])
        return graph_nodes([model(mx.array([[6]]), cache=cache)])
    finally:
        prep.paths.use("graph")


def _parse_bandwidth(value: str) -> float:
    try:
        gbs = float(value)
    except ValueError:
        gbs = -1.0
    if gbs <= 0:
        raise UserError(f"--bandwidth {value!r}: give GB/s as a positive number, or `measure`")
    return gbs


def write_results(result: dict, out_dir: Path) -> None:
    write_text(out_dir / "blockbench.csv", pd.DataFrame(result["rows"]).to_csv(index=False))
    formats.dump("blockbench", result, out_dir / "blockbench.json")


def render_table(result: dict, fmt: str) -> str:
    df = pd.DataFrame(result["rows"])
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps(result, indent=2, default=str)
    cols = {"model": "model", "path": "path", "token_us": "µs/token", "build_us": "build µs",
            "layer_us": "µs/layer", "nodes_per_layer": "nodes/layer",
            "step_nodes_per_layer": "step nodes/layer",
            "token_gbs": "GB/s", "floor_token_us": "floor µs", "token_over_floor": "×floor",
            "speedup_vs_graph": "vs graph", "first_call_s": "first call s"}
    # Node counts and first calls are absent from results written before blockbench kept them.
    table = df[[c for c in cols if c in df.columns]].rename(columns=cols)
    # The launch row reads no weights: its GB/s is missing, shown as a dash (not "nan").
    table = table.astype(object).where(table.notna(), None)
    return table.to_markdown(index=False, floatfmt=".2f", missingval="—")
