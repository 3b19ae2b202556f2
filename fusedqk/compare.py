"""Archived runs side by side: each speedup with its CI per run, what each run was, and where
two runs disagree (intervals that do not overlap) with the settings that differ between them.

Reads only sealed archives: every run's manifest is verified first. ``index`` renders the list of
every run under a results directory (results/README.md).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from fusedqk.archive import MANIFEST, load_run, read_json, verify
from fusedqk.errors import UserError
from fusedqk.registry import size_order

BY = ("model", "device", "commit")
# What a run was made with: the settings compared when two runs disagree.
PROVENANCE = ("device", "commit", "driver", "mlx", "mlx_lm", "kernel_call", "instrument", "engine",
              "rounds", "workload")
# Runs made before results recorded how the kernel was called had one call per backend.
KERNEL_CALL_BEFORE_RECORDED = {"cuda": "cuda_kernel", "metal": "metal_kernel"}


@dataclass
class RunSummary:
    """One archived run, as the comparison and the index need it."""

    path: str
    name: str
    backend: str
    device: str
    commit: str
    date: str
    finished: str  # when its last benchmark finished: orders runs of one day
    driver: str
    mlx: str
    mlx_lm: str
    instrument: str
    engine: str
    workload: str
    rounds: str
    decision: str
    reason: str
    sealed: bool
    failed: list[str] = field(default_factory=list)
    speedups: dict[tuple[str, str], dict] = field(default_factory=dict)  # (model, impl) -> CI
    kernel_call: str = "—"  # primitive, cuda_kernel or metal_kernel; "—" where no kernel ran


def summarize(run_dir: Path, require_seal: bool = True) -> RunSummary:
    """A run's summary; a run whose manifest is missing (when required) or does not hold is one
    line naming it."""
    sealed = (run_dir / MANIFEST).is_file()
    if sealed:
        problems = verify(run_dir)
        if problems:
            raise UserError(f"{run_dir}: does not match its {MANIFEST} ({'; '.join(problems[:3])})")
    elif require_seal:
        raise UserError(f"{run_dir}: not a sealed archive (no {MANIFEST}); compare reads archives")
    run = load_run(run_dir)
    decisions = read_json(run_dir / "decisions.json", "decisions") or {"backends": {}}
    decision = decisions["backends"].get(run.backend, {})
    benches = [m.bench for m in run.models.values() if m.bench]
    meta = benches[0]["meta"] if benches else {}
    env = {**meta.get("environment", {}), **run.environment}
    settings = benches[0]["settings"] if benches else {}
    # Quantization as the run's configuration asked for it (engine runs record no model build).
    planned = run.planned
    q = planned.get("quantization") or meta.get("environment", {})
    workload = (f"pp{settings.get('prompt_tokens')}+tg{settings.get('generation_tokens')} "
                f"q{q.get('bits', '?')}g{q.get('group_size', '?')} {q.get('dtype', '?')}"
                if settings else "none")
    engine = meta.get("engine", {}).get("name", "builtin") if meta else "none"
    evidence = decision.get("evidence")
    summary = RunSummary(
        path=run_dir.as_posix(), name=Path(evidence).name if evidence else run_dir.name,
        backend=run.backend, device=env.get("device_name") or "unknown",
        commit=str(env.get("git_commit") or "unknown")[:10],
        date=str(meta.get("finished_at") or env.get("recorded_at") or "")[:10],
        finished=max((str(b["meta"].get("finished_at", "")) for b in benches), default=""),
        driver=str(env.get("driver_version") or "—"), mlx=str(env.get("mlx")),
        mlx_lm=str(env.get("mlx_lm")),
        instrument=meta.get("instrument", "in-process, turn-paired") if meta else "none",
        engine=engine, workload=workload,
        rounds="/".join(str(s["rounds"]) for b in benches for s in b["speedups"][:1]),
        decision=decision.get("recommendation", "none"), reason=decision.get("reason", ""),
        sealed=sealed, failed=sorted(n for n, m in run.models.items() if m.failed))
    for name, m in run.models.items():
        for s in (m.bench or {}).get("speedups", []):
            ident = (m.identity.get(s["path"]) or {}).get("verdict", "—")
            summary.speedups[(name, s["path"])] = {"point": s["point"], "lo": s["lo"],
                                                   "hi": s["hi"], "identity": ident}
    summary.kernel_call = _kernel_call(run.backend, env, {path for _, path in summary.speedups})
    return summary


def _kernel_call(backend: str, env: dict, paths: set[str]) -> str:
    # A run measured the kernel as its own path, or as what "fused" meant (engine runs).
    if "kernel" not in paths and not ("fused" in paths and env.get("impl") == "kernel"):
        return "—"
    return env.get("kernel_call") or KERNEL_CALL_BEFORE_RECORDED.get(backend, "—")


def _label(run: RunSummary, by: str) -> str:
    if by == "device":
        return f"{run.device} ({run.commit})"
    if by == "commit":
        return f"{run.commit} ({run.device})"
    return run.name


def _unique_names(runs: list[RunSummary]) -> list[RunSummary]:
    """The runs keyed by their names, and where names coincide (the same commit measured on two
    devices, copies of one run) by as many trailing folders of their paths as tell them apart:
    no run ever shares a column with another."""
    names = [r.name for r in runs]
    parts = [Path(r.path).resolve().parts for r in runs]
    depth = 1
    while len(set(names)) < len(names):
        clash = {n for n in names if names.count(n) > 1}
        names = ["/".join(p[-depth:]) if n in clash else n for n, p in zip(names, parts, strict=True)]
        depth += 1
    return [replace(r, name=n) for r, n in zip(runs, names, strict=True)]


def compare(runs: list[RunSummary], by: str = "model", mixed_workloads: bool = False) -> dict:
    """The side-by-side table: rows (backend, model, impl), one column per run."""
    if by not in BY:
        raise UserError(f"--by {by!r}: accepted: {', '.join(BY)}")
    workloads = {r.workload for r in runs if r.workload != "none"}
    if len(workloads) > 1 and not mixed_workloads:
        raise UserError(f"the runs have different workloads ({'; '.join(sorted(workloads))}); "
                        "give --mixed-workloads to put them in one table anyway")
    seen = [Path(r.path).resolve() for r in runs]
    twice = sorted({str(p) for p in seen if seen.count(p) > 1})
    if twice:
        raise UserError(f"compare: {twice[0]!r} is given more than once; name each run once")
    order = {"device": lambda r: (r.device, r.finished), "commit": lambda r: (r.finished, r.commit),
             "model": lambda r: (r.finished, r.name)}[by]
    runs = _unique_names(sorted(runs, key=order))
    keys = sorted({(r.backend, *k) for r in runs for k in r.speedups},
                  key=lambda k: (k[0], size_order(k[1]), k[2]))
    rows = []
    for backend, model, impl in keys:
        cells = {r.name: r.speedups.get((model, impl)) for r in runs if r.backend == backend}
        apart = []
        for (a, ca), (b, cb) in itertools.combinations([(n, c) for n, c in cells.items() if c], 2):
            if ca["hi"] < cb["lo"] or cb["hi"] < ca["lo"]:
                ra, rb = (next(r for r in runs if r.name == n) for n in (a, b))
                differ = [k for k in PROVENANCE if getattr(ra, k) != getattr(rb, k)]
                apart.append({"runs": [a, b], "settings_that_differ": differ})
        rows.append({"backend": backend, "model": model, "impl": impl, "cells": cells,
                     "apart": apart})
    return {"by": by, "runs": [asdict(r) | {"speedups": None} for r in runs], "rows": rows,
            "labels": {r.name: _label(r, by) for r in runs}}


def _cell(c: dict | None) -> str:
    return "—" if not c else f"{c['point']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] {c['identity']}"


def render_comparison(table: dict, fmt: str = "md") -> str:
    names = list(table["labels"])
    flat = [{"backend": r["backend"], "model": r["model"], "impl": r["impl"],
             **{table["labels"][n]: _cell(r["cells"].get(n)) for n in names},
             "apart": "; ".join(f"{' ≠ '.join(a['runs'])} (differ: "
                                f"{', '.join(a['settings_that_differ']) or 'nothing recorded'})"
                                for a in r["apart"])} for r in table["rows"]]
    if fmt == "json":
        return json.dumps({**table, "rows": table["rows"]}, indent=2, default=str)
    df = pd.DataFrame(flat)
    if fmt == "csv":
        return df.to_csv(index=False)
    runs = pd.DataFrame([{k: r[k] for k in ("name", "device", "date", "commit", "driver", "mlx",
                                            "mlx_lm", "kernel_call", "engine", "instrument", "workload",
                                            "rounds", "decision")} for r in table["runs"]])
    return "\n".join(["## Runs", "", runs.to_markdown(index=False), "",
                      "## Speedup vs graph [95% CI] and identity, per run", "",
                      df.to_markdown(index=False) if len(df) else "(no speedups)", "",
                      "`apart`: pairs of runs whose intervals do not overlap, and the recorded "
                      "settings in which they differ."])


def committed_runs(results_dir: Path) -> set[Path] | None:
    """The run folders under ``results_dir`` whose decisions git tracks (None: not in a git
    checkout, so nothing can be told apart)."""
    try:
        out = subprocess.run(["git", "-C", str(results_dir), "ls-files", "-z", "--full-name",
                              "--", "."], capture_output=True, timeout=60)
        top = subprocess.run(["git", "-C", str(results_dir), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or top.returncode != 0:
        return None
    root = Path(top.stdout.strip())
    return {(root / name).parent.resolve() for name in out.stdout.decode().split("\0")
            if name.endswith("/decisions.json")}


def index(results_dir: Path, committed_only: bool = False) -> str:
    """results/README.md: every run under ``results_dir``, newest first, with its card, date,
    commit, decision and summary; incomplete and superseded runs marked, and runs git does not
    track marked as the user's own (``committed_only``: only the tracked ones, the README's list)."""
    if not results_dir.is_dir():
        raise UserError(f"--index {str(results_dir)!r}: not a directory; give a results directory "
                        "(results/)")
    tracked = committed_runs(results_dir)
    folders = [p for p in sorted(results_dir.glob("*/*"))
               if p.is_dir() and (p / "decisions.json").is_file()]
    if committed_only and tracked is not None:
        folders = [p for p in folders if p.resolve() in tracked]
    runs = [summarize(p, require_seal=False) for p in folders]
    runs.sort(key=lambda r: (r.finished, r.name), reverse=True)
    newest: dict[tuple, str] = {}
    lines = ["# Archived runs", "",
             "Every run under `results/`, newest first. Generated by "
             "`fusedqk compare --index results --committed > results/README.md`; a test keeps it "
             "current. "
             "Put runs side by side with `fusedqk compare RUN...`.", "",
             "| run | card | date | commit | engine | kernel call | decision | summary | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        kind = (r.backend, r.device, r.engine, r.kernel_call, tuple(sorted({k[1] for k in r.speedups})),
                tuple(sorted({k[0] for k in r.speedups})))
        status = []
        if not r.sealed:
            status.append("incomplete: not sealed")
        if r.failed:
            status.append(f"incomplete: {', '.join(r.failed)} failed")
        if tracked is not None and Path(r.path).resolve() not in tracked:
            status.append("yours: not tracked by git")
        if kind in newest:
            status.append(f"superseded by `{newest[kind]}`")
        newest.setdefault(kind, r.name)
        speed = ", ".join(f"{m} {impl} {c['point']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"
                          for (m, impl), c in sorted(r.speedups.items(),
                                                     key=lambda kv: (size_order(kv[0][0]), kv[0][1])))
        rel = Path(r.path).relative_to(results_dir).as_posix()
        lines.append(f"| [`{rel}`]({rel}/report.md) | {r.device} | {r.date} | {r.commit} | "
                     f"{r.engine} | {r.kernel_call} | {r.decision} | {speed or '—'} | "
                     f"{'; '.join(status) or 'current'} |")
    return "\n".join(lines) + "\n"
