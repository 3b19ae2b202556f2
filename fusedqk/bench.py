"""Decode throughput, fused vs graph: interleaved rounds in one process, raw samples kept.

One model build; every path warmed up; then R rounds (or, given a target, more rounds until every
speedup CI is that narrow, up to a maximum). A trial is mlx_lm.benchmark's /
llama-bench's tg test: a P-token random prompt, then G greedy decode steps with EOS ignored.
Within a round the paths take turns every C tokens (``chunk_tokens``), in an order drawn from a
seeded shuffle: on a shared host the speed of decode drifts by tens of percent over a second or
so (measured on the H100, docs/perf-log.md), and only turns much shorter than that put the same
drift on every path. Each turn reads C + 1 tokens and times the C intervals after the first
(the queued step is finished untimed before the next path's turn), so a turn pays only for its
own path's steps. Decode tok/s = G / (sum of the timed intervals); C >= G is one turn per trial.
What the turns spend outside their timed intervals is kept too (``untimed_s`` per trial, each
round's wall time in ``meta.round_wall_s``): it is the bench's cost, not the paths' speed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
import pandas as pd

from fusedqk import instrument, phases, stats
from fusedqk.decode import Decoder, generate, make_sampler, random_prompt
from fusedqk.envinfo import environment, now_utc
from fusedqk.errors import UserError
from fusedqk.kernels.qkv_norm_rope import has_kernel
from fusedqk.results import BenchRun, BenchSettings
from fusedqk.toggle import concrete_path

if TYPE_CHECKING:
    from fusedqk.engines.builtin import Prepared

# MLX's CUDA backend caches its CUDA graphs by topology, 400 by default. Paths that take turns
# every few tokens need all their graphs cached at once, or every turn rebuilds them (untimed, but
# it made a large MoE model's benchmark take ~3x its timed decode on the H100). Read once, when
# MLX first encodes work: set before the model is built. A value the caller set wins.
GRAPH_CACHE_ENV, GRAPH_CACHE_SIZE = "MLX_CUDA_GRAPH_CACHE_SIZE", "4000"


def size_graph_cache() -> None:
    os.environ.setdefault(GRAPH_CACHE_ENV, GRAPH_CACHE_SIZE)


def expand_paths(spec: str, backend: str, impl: str, flag: str = "--paths") -> list[str]:
    """``graph,fused`` → concrete path names (``toggle.concrete_path``: fused means ``impl``)."""
    out = []
    for name in (p.strip() for p in spec.split(",") if p.strip()):
        name = concrete_path(name, backend, has_kernel(backend), impl, flag=flag)
        if name not in out:
            out.append(name)
    if "graph" not in out or len(out) < 2:
        raise UserError(f"{flag} {spec!r}: give graph and at least one fused path (e.g. graph,fused)")
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with mlx-lm; be quiet without it
        return None
    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def measure_decode(prep: Prepared, paths: list[str], settings: BenchSettings,
                   argv: list[str] | None = None) -> BenchRun:
    model = prep.loaded.model
    prompt = random_prompt(prep.loaded.config["vocab_size"], settings.prompt_tokens, settings.seed)
    greedy = make_sampler(0.0, settings.seed)
    result = BenchRun(settings, paths)
    result.meta = {"started_at": now_utc(), "argv": argv or []}
    # A path that runs as another here (kernel_kv without the C++ primitive) is named so, not
    # passed off as itself.
    substitutes = {}
    for path in paths:
        impl, why = prep.paths.report.runs_as(path)
        if why:
            substitutes[path] = {"runs_as": impl, "why": why}
    if substitutes:
        result.meta["substitutes"] = substitutes
        result.warnings += [f"{path} ran as {s['runs_as']} here: {s['why']}"
                            for path, s in substitutes.items()]
    bar = _progress(len(paths) * (settings.warmup + settings.round_limit), prep.loaded.name)
    peak_memory = {}
    with phases.phase("warmup"):
        for path in paths:
            # Turns share the device's memory, so each path's peak comes from its own warm-up.
            prep.paths.use(path)
            mx.reset_peak_memory()
            for _ in range(settings.warmup):
                generate(model, prompt, settings.generation_tokens + 1, greedy)
                if bar:
                    bar.update()
            peak_memory[path] = mx.get_peak_memory()
    with phases.phase("measure"):
        per_round, speedups = _rounds(prep, paths, prompt, greedy, peak_memory, result, bar)
    if bar:
        bar.close()
    prep.paths.use("graph")
    result.meta.update({"finished_at": now_utc(), "environment": environment(prep)})
    summarize(result, speedups, per_round)
    return result


def _rounds(prep: Prepared, paths: list[str], prompt: list[int], greedy, peak_memory: dict,
            result: BenchRun, bar) -> tuple[dict, dict]:
    """Rounds through the one instrument (``fusedqk.instrument``) until the settings say stop:
    (the per-round ratios, the last speedups)."""
    order_rng = np.random.default_rng(result.settings.seed)
    stats.scipy_stats()  # imported now, so that the first round's wall time does not hold it

    def play_round(rnd: int) -> bool:
        order = [paths[i] for i in order_rng.permutation(len(paths))]
        _run_round(prep, prompt, greedy, order, rnd, peak_memory, result)
        if bar:
            bar.update(len(paths))
        return True

    return instrument.paired_rounds(result, play_round, lambda: _speedups(result),
                                    instrument.stderr_note)


def _run_round(prep: Prepared, prompt: list[int], sampler, order: list[str], rnd: int,
               peak_memory: dict[str, int], result: BenchRun) -> None:
    """One trial per path, the paths taking turns every ``chunk_tokens`` tokens in ``order``."""
    settings, model, g = result.settings, prep.loaded.model, result.settings.generation_tokens
    turns = [min(settings.chunk_tokens, g - start) for start in range(0, g, settings.chunk_tokens)]
    decoders, prefill_s, intervals = {}, {}, {path: [] for path in order}
    # Untimed: a turn's switch and first step's build before its first token, and its drain.
    untimed_s = dict.fromkeys(order, 0.0)
    for path in order:
        prep.paths.use(path)
        start = time.perf_counter()
        decoders[path] = Decoder(model, prompt, sampler)
        prefill_s[path] = decoders[path].advance(1)[0] - start
        decoders[path].drain()
        untimed_s[path] += time.perf_counter() - start - prefill_s[path]
    for n in turns:
        for path in order:
            start = time.perf_counter()
            prep.paths.use(path)
            arrivals = decoders[path].advance(n + 1)
            decoders[path].drain()
            untimed_s[path] += time.perf_counter() - start - (arrivals[-1] - arrivals[0])
            intervals[path] += np.diff(arrivals).tolist()
    for slot, path in enumerate(order):
        decode_s = float(sum(intervals[path]))
        result.trials.append({
            "model": prep.loaded.name, "backend": prep.backend, "path": path, "round": rnd,
            "slot": slot, "prompt_tokens": settings.prompt_tokens, "generation_tokens": g,
            "chunk_tokens": settings.chunk_tokens, "prefill_s": prefill_s[path],
            "decode_s": decode_s, "prefill_tok_s": settings.prompt_tokens / prefill_s[path],
            "decode_tok_s": g / decode_s, "untimed_s": untimed_s[path],
            "peak_memory_bytes": peak_memory[path],
            "distinct_tokens": len(set(decoders[path].tokens)),
        })
        result.tokens.extend(
            {"model": prep.loaded.name, "path": path, "round": rnd, "step": i + 1,
             "latency_s": lat} for i, lat in enumerate(intervals[path]))


def round_speedups(tokens: pd.DataFrame, chunk_tokens: int, paths: list[str]) -> dict[str, list[float]]:
    """Each fused path's per-round speedups (``stats.round_speedup``) from per-token latencies
    (tokens.csv's columns): step s of a trial belongs to turn (s - 1) // chunk_tokens."""
    turn = (tokens.step - 1) // chunk_tokens
    turn_s = tokens.groupby([tokens.path, tokens["round"], turn]).latency_s.sum()
    rounds = sorted(set(tokens["round"]))
    return {path: [stats.round_speedup(turn_s["graph", r].tolist(), turn_s[path, r].tolist())
                   for r in rounds] for path in paths if path != "graph"}


def _speedups(result: BenchRun) -> tuple[dict[str, list[float]], dict[str, stats.Speedup]]:
    """Each fused path's per-round speedups and its speedup over graph from the rounds so far
    (turn-paired, stats.py)."""
    per_round = round_speedups(pd.DataFrame(result.tokens), result.settings.chunk_tokens,
                               result.paths)
    tok_s = pd.DataFrame(result.trials).groupby("path").decode_tok_s
    return per_round, {path: stats.speedup_ci(
                ratios, seed=result.settings.seed,
                p_value=stats.mann_whitney_p(tok_s.get_group("graph"), tok_s.get_group(path)))
            for path, ratios in per_round.items()}


def summarize(result: BenchRun, speedups: dict[str, stats.Speedup],
              per_round: dict[str, list[float]]) -> None:
    """The instrument's summary, the graph path's time per token in each round (its mean
    latency) telling the host's faster rounds from its slower ones."""
    tokens = pd.DataFrame(result.tokens, columns=instrument.TOKEN_COLUMNS)
    graph_round_s = tokens[tokens.path == "graph"].groupby("round").latency_s.mean().tolist()
    instrument.summarize(result, per_round, speedups, graph_round_s, stats.ESTIMATOR)
