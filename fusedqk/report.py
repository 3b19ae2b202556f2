"""The decision report of a run, rendered from its raw files alone (so an archive re-renders).

report.md for reading in a repository, report.html self-contained (plots embedded) for a browser.
The same figures fill both: throughput per model and path with 95% CI whiskers, and per-token
latency distributions.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from fusedqk import stats
from fusedqk.archive import RunData, load_run, read_json
from fusedqk.atomic import write_bytes, write_text
from fusedqk.errors import UserError

PLOT_META = {"Software": None}  # no version strings in the PNGs: re-renders are byte-identical


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=PLOT_META)
    plt.close(fig)
    return buf.getvalue()


def throughput_plot(run: RunData) -> bytes | None:
    rows = [s for m in run.models.values() if m.bench for s in m.bench["summary"]]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    models, paths = list(dict.fromkeys(df.model)), list(dict.fromkeys(df.path))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(models), 3.2))
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        sub = df[df.path == path].set_index("model").reindex(models)
        xs = [j + i * width for j in range(len(models))]
        ax.bar(xs, sub.decode_tok_s_median, width, label=path,
               yerr=sub.decode_tok_s_sd, capsize=3)
    ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("decode tok/s (median, ±sd)")
    ax.legend(fontsize=8)
    ax.set_title(f"{run.backend}: decode throughput per path")
    return _png(fig)


def speedup_plot(run: RunData) -> bytes | None:
    rows = [s for m in run.models.values() if m.bench for s in m.bench["speedups"]]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.45 * len(df)))
    labels = [f"{r.model} {r.path}" for r in df.itertuples()]
    ax.errorbar(df.point, range(len(df)), xerr=[df.point - df.lo, df.hi - df.point], fmt="o",
                capsize=3)
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_yticks(range(len(df)), labels)
    ax.set_xlabel("speedup vs graph (95% CI)")
    return _png(fig)


def latency_plot(run: RunData) -> bytes | None:
    tokens = [m.tokens for m in run.models.values() if m.tokens is not None and len(m.tokens)]
    if not tokens:
        return None
    df = pd.concat(tokens)
    groups = [(f"{mdl}\n{p}", g.latency_s * 1e3) for (mdl, p), g in df.groupby(["model", "path"])]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(groups), 3.2))
    ax.boxplot([g for _, g in groups], showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), [n for n, _ in groups], fontsize=7)
    ax.set_ylabel("per-token latency (ms)")
    ax.set_title("decode step latency distribution")
    return _png(fig)


def context(run: RunData) -> dict:
    decisions = read_json(run.path / "decisions.json", "decisions")
    bench_rows, ident_rows, block_rows, failed, round_notes, drift_notes = [], [], [], [], [], []
    engine_rows: list[dict] = []
    for name, m in run.models.items():
        if m.failed:
            failed.append({"model": name, "error": m.failed})
        if m.bench and "stopped" in m.bench["meta"]:  # runs before adaptive lengths lack it
            round_notes.append(f"{name}: {m.bench['meta']['stopped']}")
        if m.bench:
            speed = {s["path"]: s for s in m.bench["speedups"]}
            drift_notes += [f"{name} {w}" for sp in speed.values() if sp.get("halves")
                            for w in stats.drift_warnings(sp["path"],
                                                          stats.Halves.from_dict(sp["halves"]))]
            for s in m.bench["summary"]:
                sp = speed.get(s["path"])
                bench_rows.append({**s, "speedup": sp, "identity": (m.identity.get(s["path"]) or {})
                                   .get("verdict", "—" if s["path"] == "graph" else "not run")})
        for impl, ident in m.identity.items():
            # A command engine's identity compares printed output, not logits: its own table.
            (engine_rows if "engine" in ident else ident_rows).append({"model": name, "impl": impl,
                                                                      **ident})
        if m.blockbench:
            block_rows += m.blockbench["rows"]
    settings = next((m.bench["settings"] for m in run.models.values() if m.bench), {})
    estimator = next((r["speedup"]["estimator"] for r in bench_rows
                      if r["speedup"] and "estimator" in r["speedup"]), None)
    instrument = next((m.bench["meta"]["instrument"] for m in run.models.values()
                       if m.bench and "instrument" in m.bench["meta"]), None)
    engine = next((m.bench["meta"]["engine"] for m in run.models.values()
                   if m.bench and "engine" in m.bench["meta"]), None)
    return {"run": run, "decisions": decisions, "bench": bench_rows, "identity": ident_rows,
            "engine_identity": engine_rows, "instrument": instrument, "engine": engine,
            "round_notes": round_notes, "drift_notes": drift_notes, "estimator": estimator,
            "blockbench": block_rows, "failed": failed, "env": run.environment,
            "settings": settings, "raw_files": sorted(
                p.relative_to(run.path).as_posix() for p in run.path.rglob("*.csv"))}


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fusedqk", "templates"),
        autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)


def render_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Render report.md, report.html and the plot PNGs of ``run_dir`` into ``out_dir``."""
    run = load_run(run_dir)
    if not (run_dir / "decisions.json").is_file():
        raise UserError(f"{run_dir}: no decisions.json (run `fusedqk decide {run_dir}` first)")
    out_dir = out_dir or run_dir
    ctx = context(run)
    plots = {"throughput": throughput_plot(run), "speedup": speedup_plot(run),
             "latency": latency_plot(run)}
    written = []
    for name, png in plots.items():
        if png is not None:
            written.append(write_bytes(out_dir / "plots" / f"{name}.png", png))
    env = _env()
    md = env.get_template("report.md.j2").render(
        **ctx, plots={k: f"plots/{k}.png" for k, v in plots.items() if v})
    html = env.get_template("report.html.j2").render(
        **ctx, plots={k: base64.b64encode(v).decode() for k, v in plots.items() if v})
    written.append(write_text(out_dir / "report.md", md))
    written.append(write_text(out_dir / "report.html", html))
    return written
