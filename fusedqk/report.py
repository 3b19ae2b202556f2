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
from fusedqk.archive import MANIFEST, RunData, load_run, read_json, refuse_sealed, verify, write_manifest
from fusedqk.atomic import write_files
from fusedqk.errors import UserError
from fusedqk.phases import PHASES
from fusedqk.registry import size_order
from fusedqk.toggle import ENV_TOGGLE

PLOT_META = {"Software": None}  # no version strings in the PNGs: re-renders are byte-identical


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=PLOT_META)
    plt.close(fig)
    return buf.getvalue()


# One colour per path in every plot (and in the HTML's key beside them).
PATH_COLOURS = {"graph": "#1f77b4", "kernel": "#ff7f0e", "composite": "#2ca02c", "fused": "#d62728",
                "kernel_kv": "#9467bd", "launch": "#7f7f7f"}


def path_colour(path: str) -> str:
    return PATH_COLOURS.get(path, "#9467bd")


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
        ax.bar(xs, sub.decode_tok_s_median, width, label=path, color=path_colour(path),
               yerr=sub.decode_tok_s_sd, capsize=3)
    ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("decode tok/s (median, ±sd)")
    ax.legend(fontsize=8)
    ax.set_title(f"{run.backend}: decode throughput per path")
    return _png(fig)


def speedup_plot(run: RunData, threshold: float | None = None) -> bytes | None:
    rows = [s for m in run.models.values() if m.bench for s in m.bench["speedups"]]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.45 * len(df)))
    labels = [f"{r.model} {r.path}" for r in df.itertuples()]
    for i, r in enumerate(df.itertuples()):
        ax.errorbar([r.point], [i], xerr=[[r.point - r.lo], [r.hi - r.point]], fmt="o", capsize=3,
                    color=path_colour(r.path))
    ax.axvline(1.0, color="grey", lw=1)
    if threshold is not None:  # the rule's `on`: every CI lower bound at or above this line
        ax.axvline(threshold, color="green", lw=1, ls="--", label=f"on at CI lower bound ≥ {threshold:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(df)), labels)
    ax.invert_yaxis()  # the tables' order: smallest model on top
    ax.set_xlabel("speedup vs graph (95% CI)")
    return _png(fig)


def latency_plot(run: RunData) -> bytes | None:
    """Per-token latency ECDF per model and path: a host with two speed states shows two steps."""
    tokens = [m.tokens for m in run.models.values() if m.tokens is not None and len(m.tokens)]
    if not tokens:
        return None
    df = pd.concat(tokens)
    models = list(dict.fromkeys(df.model))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for path, g in df[df.model == model].groupby("path", sort=False):
            ms = (g.latency_s * 1e3).sort_values()
            ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=path,
                    color=path_colour(path))
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("per-token latency (ms)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of tokens ≤ x")
    return _png(fig)


def latency_rows(run: RunData) -> list[dict]:
    """p50 / p90 / p99 per-token latency (ms) per model and path."""
    rows = []
    for m in run.models.values():
        if m.tokens is None or not len(m.tokens):
            continue
        for path, g in m.tokens.groupby("path", sort=False):
            q = (g.latency_s * 1e3).quantile([0.5, 0.9, 0.99])
            rows.append({"model": m.name, "path": path, "p50": q[0.5], "p90": q[0.9], "p99": q[0.99],
                         "tokens": len(g)})
    return rows


def paired_p_values(m) -> dict[str, float]:
    """Per fused path: the Wilcoxon signed-rank p of its per-round decode ratios to graph
    (paired by round), from the raw trials."""
    if m.trials is None or "round" not in m.trials:
        return {}
    per_round = m.trials.groupby(["path", "round"]).decode_tok_s.median().unstack(0)
    if "graph" not in per_round:
        return {}
    return {path: stats.paired_p(list((per_round[path] / per_round["graph"]).dropna()))
            for path in per_round.columns if path != "graph"}


def _gain_words(points: list[float]) -> str:
    """'12–21 % faster decode', '9 % faster decode', or signed figures where any point is < 1."""
    if not points:
        return "no speedup measured"
    lo, hi = min(points), max(points)
    # Whole per cent, or one decimal where a change is under 1 %: never a "-0 %".
    digits = 1 if min(abs(lo - 1), abs(hi - 1)) < 0.01 else 0
    if lo >= 1:
        a, b = f"{100 * (lo - 1):.{digits}f}", f"{100 * (hi - 1):.{digits}f}"
        return f"{a if a == b else f'{a}–{b}'} % faster decode"

    def signed(x: float) -> str:
        text = f"{100 * (x - 1):+.{digits}f}"
        return "±" + text[1:] if float(text) == 0 else text

    a, b = signed(lo), signed(hi)
    return f"decode speed {a if a == b else f'{a} to {b}'} %"


def _identity_words(run: RunData) -> str:
    """What the identity check showed equal: logits bit for bit (built-in), or what an engine
    printed (its token ids, or its generated text)."""
    compared = {i.get("compared") for m in run.models.values() for i in m.identity.values()}
    if compared == {"text"}:
        return "identical generated text"
    if compared == {"tokens"}:
        return "identical greedy tokens"
    return "bit-identical output"


def headline(decisions: dict | None, run: RunData) -> str:
    """The action, in one sentence, from the decision and the chosen implementation's speedups."""
    if not decisions:
        return "No decision was made for this run."
    parts = []
    for backend, d in decisions["backends"].items():
        chosen = d.get("per_impl", {}).get(d["impl"], {})
        points = [s["point"] for m in run.models.values() if m.bench
                  for s in m.bench["speedups"] if s["path"] == d["impl"]]
        n_on = sum(r["recommendation"] == "on" for r in chosen.get("models", {}).values())
        n_all = len(chosen.get("models", {}))
        gain = _gain_words(points)
        if d["recommendation"] == "on":
            others = [i for i, r in d["per_impl"].items() if i != d["impl"] and r["recommendation"] == "on"]
            why = (f"; preferred over {', '.join(others)}, which passes too, because its worst "
                   f"model gains most (CI lower bound {chosen['worst_ci_lower']:.3f})") if others else ""
            parts.append(f"Turn the {d['impl']} on for {backend}: {gain} on {n_on} of {n_all} "
                         f"models, {_identity_words(run)}{why}.")
        elif d["recommendation"] == "off":
            parts.append(f"Keep the fused path off for {backend}: {d['reason']}.")
        else:
            parts.append(f"Leave the {backend} default as it is: the evidence does not decide "
                         f"({gain}; {n_on} of {n_all} models pass).")
    return " ".join(parts)


def workload(run: RunData, settings: dict, engine: dict | None) -> str:
    """What was measured, in one sentence: tokens, rounds, batch, quantization, weights, engine."""
    planned = run.planned
    q = planned.get("quantization") or {}
    sources = {str((m.bench or {}).get("meta", {}).get("environment", {}).get("model_source", ""))
               for m in run.models.values()}
    weights = ("synthetic deterministic weights" if all(s.startswith("synthetic") or not s for s in sources)
               else "local checkpoints")
    if engine:
        weights = "exported synthetic checkpoints"
    rounds = settings.get("rounds")
    return (f"Prompt {settings.get('prompt_tokens')} tokens, {settings.get('generation_tokens')} "
            f"generated (greedy), batch 1, at least {rounds} rounds; {q.get('bits', '?')}-bit "
            f"weights in groups of {q.get('group_size', '?')}, {q.get('dtype', '?')} activations, "
            f"{weights}; engine: {engine['name'] if engine else 'builtin (fusedqk in-process)'}."
            if settings else "No benchmark ran.")


GIB = 1 << 30
# The environment table's row names, in words; a key not here is shown with its underscores as
# spaces (a key added later still renders).
ENV_LABELS = {
    "backend": "backend", "backends_available": "backends available",
    "container_image_id": "container image", "cuda_version": "CUDA", "device_lock": "device lock",
    "device_name": "device", "driver_version": "driver", "fused_qk_norm": "fused path on",
    "fusedqk": "fusedqk", "git_commit": "git commit", "git_dirty": "uncommitted changes",
    "hostname": "host", "impl": "fused implementation", "impl_source": "implementation from",
    "kernel_available": "kernel for this backend", "kernel_call": "kernel call",
    "kernel_call_source": "kernel call from", "memory_free_bytes": "memory free",
    "memory_total_bytes": "memory total", "mlx": "MLX", "mlx_environment": "MLX environment",
    "mlx_lm": "mlx-lm", "path_source": "fused path from", "platform": "platform",
    "python": "Python", "recorded_at": "recorded at",
}


def environment_rows(env: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the readable rows, the long provenance rows to fold) of a run's environment."""
    main, folded = [], []
    for key, value in env.items():
        if key.endswith("_bytes") and isinstance(value, int | float):
            text = f"{value / GIB:.1f} GiB"
        elif isinstance(value, dict | list):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else \
                ", ".join(map(str, value))
        else:
            text = "—" if value is None else str(value)
        label = ENV_LABELS.get(key, key.replace("_", " "))
        (folded if len(text) > 80 or key in ("platform", "mlx_environment") else main).append(
            (label, text))
    return main, folded


def server_turns(instrument: str | None, settings: dict) -> int | None:
    """The timed tokens per turn of a server engine's rounds, or None where each round was one
    completion per arm (and in runs made before server rounds took turns)."""
    if not instrument or "taking turns" not in instrument or not settings:
        return None
    chunk = settings.get("chunk_tokens", settings["generation_tokens"])
    return chunk if chunk < settings["generation_tokens"] else None


def toggle_variable(engine: dict | None) -> str:
    """The variable whose default the decision is about: fusedqk's own, the engine file's
    declared toggle, or (runs made before engine files declared one) the one variable both arms set."""
    if not engine:
        return ENV_TOGGLE
    if engine.get("toggle"):
        return engine["toggle"]
    shared = set(engine["arms"]["graph"]) & set(engine["arms"]["fused"])
    return shared.pop() if len(shared) == 1 else "the engine's toggle"


def time_rows(run: RunData) -> list[dict]:
    """Per job, where its seconds went (the status files' ``seconds``; runs before they were
    recorded have none): the process's wall time, its phases, and what is left of it (start-up,
    imports, writing results)."""
    rows = []
    for name, m in run.models.items():
        for job, s in m.seconds.items():
            phases = {p: s.get(f"{p}_s") for p in PHASES}
            other = s["process_s"] - sum(v for v in phases.values() if v)
            rows.append({"model": name, "job": job, "wall": s["process_s"], **phases,
                         "other": max(other, 0.0)})
    return rows


def context(run: RunData) -> dict:
    decisions = read_json(run.path / "decisions.json", "decisions")
    bench_rows, ident_rows, block_rows, failed, round_notes, drift_notes = [], [], [], [], [], []
    engine_rows: list[dict] = []
    lock_notes: list[str] = []
    substitute_notes: list[str] = []
    state_notes: list[str] = []
    for name, m in run.models.items():
        if m.failed:
            failed.append({"model": name, "error": m.failed})
        if m.bench and "stopped" in m.bench["meta"]:  # runs before adaptive lengths lack it
            round_notes.append(f"{name}: {m.bench['meta']['stopped']}")
        meta = (m.bench or {}).get("meta", {})
        substitute_notes += [f"{name}: {path} ran as {s['runs_as']}: {s['why']}"
                             for path, s in (meta.get("substitutes") or {}).items()]
        lock = meta.get("environment", {}).get("device_lock")
        if lock:  # results before the device lock have none
            lock_notes.append(f"{name}: waited {lock['waited_s']:.1f} s for the device; "
                              f"at start: {lock['at_start']}")
        if m.bench:
            speed = {s["path"]: s for s in m.bench["speedups"]}
            paired = paired_p_values(m)
            drift_notes += [f"{name} {w}" for sp in speed.values() if sp.get("halves")
                            for w in stats.drift_warnings(sp["path"],
                                                          stats.Halves.from_dict(sp["halves"]))]
            state_notes += [f"{name} {w}" for sp in speed.values() if sp.get("host_states")
                            for w in stats.host_state_warnings(
                                sp["path"], stats.Halves.from_dict(sp["host_states"]),
                                sp.get("host_states_by", stats.HOST_STATES_BY_BEFORE))]
            for s in m.bench["summary"]:
                sp = speed.get(s["path"])
                bench_rows.append({**s, "speedup": sp, "paired_p": paired.get(s["path"]),
                                   "identity": (m.identity.get(s["path"]) or {})
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
    confirmation = next((m.bench["meta"]["arm_confirmation"] for m in run.models.values()
                         if m.bench and m.bench["meta"].get("arm_confirmation")), None)
    main_env, folded_env = environment_rows(run.environment)
    model_rows = []
    for d in (decisions or {}).get("backends", {}).values():
        for name, r in d.get("per_impl", {}).get(d["impl"], {}).get("models", {}).items():
            sp = next((s for s in (run.models[name].bench or {}).get("speedups", [])
                       if s["path"] == d["impl"]), None) if name in run.models else None
            ident = run.models[name].identity.get(d["impl"]) if name in run.models else None
            model_rows.append({"model": name, "impl": d["impl"], "decision": r["recommendation"],
                               "speedup": sp, "identity": (ident or {}).get("verdict", "not run"),
                               "distinct": (ident or {}).get("graph_distinct_greedy_tokens")})
    model_rows.sort(key=lambda r: size_order(r["model"]))
    # The run's name as decide recorded it, so that a renamed copy renders the same bytes.
    evidence = next((d.get("evidence") for d in (decisions or {}).get("backends", {}).values()), None)
    return {"run": run, "run_name": Path(evidence).name if evidence else run.path.name,
            "decisions": decisions, "headline": headline(decisions, run),
            "workload": workload(run, settings, engine), "models": model_rows,
            "latency": latency_rows(run), "env_rows": main_env, "env_folded": folded_env,
            "bench": bench_rows, "identity": ident_rows,
            "engine_identity": engine_rows, "instrument": instrument, "engine": engine,
            "arm_confirmation": confirmation,
            "server": (engine or {}).get("kind") == "server",
            "server_turns": server_turns(instrument, settings),
            "toggle_variable": toggle_variable(engine),
            "path_colours": {p: path_colour(p) for p in dict.fromkeys(
                s["path"] for m in run.models.values() if m.bench for s in m.bench["summary"])},
            "counts_checked": any("refused_rounds" in m.bench["meta"] for m in run.models.values()
                                  if m.bench),
            "round_notes": round_notes, "substitute_notes": substitute_notes,
            "lock_notes": lock_notes, "drift_notes": drift_notes, "state_notes": state_notes,
            "estimator": estimator,
            "blockbench": block_rows, "failed": failed, "env": run.environment,
            "times": time_rows(run),
            "settings": settings, "raw_files": sorted(
                p.relative_to(run.path).as_posix() for p in run.path.rglob("*.csv"))}


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fusedqk", "templates"),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]), trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)


def render_run(run_dir: Path, out_dir: Path | None = None, rewrite: bool = False) -> list[Path]:
    """Render report.md, report.html and the plot PNGs of ``run_dir`` into ``out_dir``.

    A sealed run (one with a manifest) is verified first and never re-rendered when its files do
    not match; in place only with ``rewrite``, which seals it again."""
    sealed = (run_dir / MANIFEST).is_file()
    if sealed:
        problems = verify(run_dir)
        if problems:
            raise UserError(f"{run_dir}: sealed run does not match its {MANIFEST} "
                            f"({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}); "
                            "not re-rendered")
        if out_dir is None and not rewrite:
            raise UserError(f"{run_dir}: sealed run ({MANIFEST} holds); give --out DIR to render "
                            "elsewhere, or --rewrite to re-render in place and seal it again")
    if out_dir is not None and out_dir.resolve() != run_dir.resolve():
        refuse_sealed(out_dir, "--out")  # never into another sealed run, nor inside this one
    run = load_run(run_dir)
    if not (run_dir / "decisions.json").is_file():
        raise UserError(f"{run_dir}: no decisions.json (run `fusedqk decide {run_dir}` first)")
    out_dir = out_dir or run_dir
    ctx = context(run)
    rule = (ctx["decisions"] or {}).get("rule", {})
    threshold = 1 + rule["min_gain"] if "min_gain" in rule else None
    plots = {"throughput": throughput_plot(run), "speedup": speedup_plot(run, threshold),
             "latency": latency_plot(run)}
    env = _env()
    md = env.get_template("report.md.j2").render(
        **ctx, plots={k: f"plots/{k}.png" for k, v in plots.items() if v})
    html = env.get_template("report.html.j2").render(
        **ctx, plots={k: base64.b64encode(v).decode() for k, v in plots.items() if v})
    # The plots and both reports as one set: a full disk leaves none of them, not a half.
    written = write_files({**{out_dir / "plots" / f"{name}.png": png
                              for name, png in plots.items() if png is not None},
                           out_dir / "report.md": md, out_dir / "report.html": html})
    if sealed and out_dir == run_dir:
        write_manifest(run_dir)
    return written
