"""The instrument every engine feeds: paired rounds until the stop rule, then one summary.

An engine hands over what one round of its arms is, as pyperf's runners hand over a run: the
built-in decode its turn-paired round in one process (``fusedqk.bench``), a command engine a
fresh process per arm, a server engine an ABBA pair of streamed completions
(``fusedqk.external``). Each round appends its trials to the ``BenchRun``; the engine's
``tally`` turns the rounds kept so far into per-round speedups and their 95 % CIs. The stop rule
(rounds, target half-width, measuring budget: ``results.stop_reason``), the round notes, the
per-path summary rows, the stability, drift and host-state warnings and the speedup records are
made here, once, for every engine, and so are the run's files (trials.csv, tokens.csv and
bench.json, through ``formats``) and its table.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from fusedqk import formats, stats
from fusedqk.atomic import write_files
from fusedqk.results import BenchRun, stop_reason

TOKEN_COLUMNS = ["model", "path", "round", "step", "latency_s"]  # tokens.csv
# per-round speedups by fused path, and each path's speedup over graph from them
Tally = tuple[dict[str, list[float]], dict[str, stats.Speedup]]


def paired_rounds(result: BenchRun, play_round: Callable[[int], bool], tally: Callable[[], Tally],
                  note: Callable[[str], None] | None = None) -> Tally:
    """Rounds until the stop rule says enough. ``play_round(rnd)`` runs one round and says
    whether it counts (a refused round is timed but never enters a speedup); ``tally()`` gives
    the speedups of the rounds kept so far; ``note`` takes one progress line per round kept."""
    settings = result.settings
    result.meta["round_wall_s"] = []
    per_round: dict[str, list[float]] = {}
    speedups: dict[str, stats.Speedup] = {}
    kept = 0
    for rnd in range(settings.round_limit):
        start = time.perf_counter()
        counted = play_round(rnd)
        result.meta["round_wall_s"].append(time.perf_counter() - start)
        if not counted:
            continue
        kept += 1
        per_round, speedups = tally()
        if note is not None:
            note(round_note(speedups, rnd + 1, settings.round_limit))
        result.meta["stopped"] = stop_reason(settings, kept, speedups,
                                             sum(result.meta["round_wall_s"]))
        if result.meta["stopped"]:
            break
    return per_round, speedups


def round_note(speedups: dict[str, stats.Speedup], rounds_done: int, round_limit: int) -> str:
    parts = [f"{path} {sp.point:.3f} ± {sp.relative_half_width:.1%}" for path, sp in speedups.items()]
    return f"round {rounds_done} of at most {round_limit}: " + ", ".join(parts)


def stderr_note(text: str) -> None:
    """A pipeline's log shows how a long bench goes (a terminal has the progress bar)."""
    if not sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def summarize(result: BenchRun, per_round: dict[str, list[float]],
              speedups: dict[str, stats.Speedup], graph_round_s: list[float], estimator: str,
              p_test: str | None = None) -> None:
    """One summary row per path, the speedup record per fused path (with the halves of its
    rounds in time and by the host's speed: ``graph_round_s`` is the graph path's time per
    token in each round kept), and the stability, drift and host-state warnings."""
    df = pd.DataFrame(result.trials)
    model, backend = df.model.iloc[0], df.backend.iloc[0]
    for path in result.paths:
        sub = df[df.path == path]
        tok = sub.decode_tok_s.to_numpy()
        result.summary.append({
            "model": model, "backend": backend, "path": path, "rounds": len(sub),
            "decode_tok_s_mean": float(tok.mean()),
            "decode_tok_s_sd": float(tok.std(ddof=1)) if len(tok) > 1 else 0.0,
            "decode_tok_s_median": float(np.median(tok)), "cv": stats.cv(tok),
            "prefill_tok_s_median": _median(sub.prefill_tok_s),
            "peak_memory_bytes": _max(sub.peak_memory_bytes),
        })
        result.warnings += stats.stability_warnings(path, tok, len(sub), float(sub.decode_s.median()))
    for path, sp in speedups.items():
        halves = stats.halves(per_round[path], seed=result.settings.seed)
        states = (stats.host_states(per_round[path], graph_round_s, seed=result.settings.seed)
                  if len(graph_round_s) == len(per_round[path]) else None)
        result.warnings += stats.drift_warnings(path, halves)
        result.warnings += stats.host_state_warnings(path, states)
        result.speedups.append({
            "model": model, "backend": backend, "path": path, **sp.as_dict(),
            "estimator": estimator, **({"p_test": p_test} if p_test else {}),
            "round_speedups": per_round[path], "halves": halves.as_dict() if halves else None,
            "host_states": states.as_dict() if states else None,
            "host_states_by": stats.HOST_STATES_BY})


def _median(column: pd.Series) -> float | None:
    column = column.dropna()
    return float(column.median()) if len(column) else None


def _max(column: pd.Series) -> int | None:
    column = column.dropna()
    return int(column.max()) if len(column) else None


def write_results(result: BenchRun, out_dir: Path) -> None:
    """trials.csv (one row per trial), tokens.csv (per-token latencies), bench.json (the rest)."""
    doc = {k: v for k, v in asdict(result).items() if k not in ("trials", "tokens")}
    # All three or none (a full disk must not leave trials without their summary). A
    # whole-process engine has no per-token latencies: the header alone, so readers still parse.
    write_files({
        out_dir / "trials.csv": pd.DataFrame(result.trials).to_csv(index=False),
        out_dir / "tokens.csv": pd.DataFrame(result.tokens, columns=TOKEN_COLUMNS).to_csv(index=False),
        out_dir / "bench.json": formats.dumps("bench", doc),
    })


def render_table(result: BenchRun, fmt: str) -> str:
    df = pd.DataFrame(result.summary)
    sp = {r["path"]: r for r in result.speedups}
    df["speedup"] = [
        "1 (baseline)" if p == "graph" else
        f"{sp[p]['point']:.3f} [{sp[p]['lo']:.3f}, {sp[p]['hi']:.3f}]" for p in df.path]
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"summary": result.summary, "speedups": result.speedups,
                           "warnings": result.warnings}, indent=2)
    table = pd.DataFrame({
        "model": df.model, "backend": df.backend, "path": df.path,
        "test": f"pp{result.settings.prompt_tokens}+tg{result.settings.generation_tokens}",
        "t/s (mean ± sd)": [f"{m:.2f} ± {s:.2f}" for m, s in
                            zip(df.decode_tok_s_mean, df.decode_tok_s_sd, strict=True)],
        "median t/s": df.decode_tok_s_median.round(2), "cv": (df.cv * 100).round(1).astype(str) + "%",
        "speedup vs graph [95% CI]": df.speedup,
    }).to_markdown(index=False)
    stopped = f"\nrounds: {result.meta['stopped']}" if result.meta.get("stopped") else ""
    notes = "".join(f"\nwarning: {w}" for w in result.warnings)
    return table + stopped + notes
