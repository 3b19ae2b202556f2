"""Bench and identity for a command engine: the same statistics and verdicts as the built-in
instrument, measured whole-process.

Bench: R rounds, each running every arm once in a fresh process, in a seeded order; a round's
speedup is the fused arm's decode tok/s over the graph arm's (the two ran back to back), and the
speedup is the geometric mean over rounds with the same bootstrap CI, adaptive length and halves
check as ``fusedqk bench``. The instrument is recorded (``meta.instrument``) so that a
whole-process ratio is never mixed with a turn-paired one.

Identity: K greedy prompts per arm, compared arm against arm, and a control that runs each arm's
first prompt again in a fresh process. EQUAL / DIFFERS / INCONCLUSIVE as ``fusedqk.identity``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fusedqk import stats
from fusedqk.bench import BenchRun, BenchSettings, stop_reason
from fusedqk.decide import variety_line
from fusedqk.engines.command import ARMS, METRICS, EngineFailure, EngineSpec, Outcome, run_arm
from fusedqk.envinfo import environment, now_utc
from fusedqk.errors import UserError
from fusedqk.identity import first_divergence, verdict

INSTRUMENT = "whole-process: each arm in a fresh process per round, rounds paired"
ENV_CHECKPOINTS = "FUSEDQK_CHECKPOINTS"


def checkpoint_dir(spec: EngineSpec, model: str, bits: int, group_size: int, dtype: str,
                   seed: int, root: str | None = None) -> Path:
    """The checkpoint an engine runs ``model`` from: a directory the engine file names, the
    model itself when it is a directory, or fusedqk's export (made here once, outside any timed
    region) under ``root`` (default $FUSEDQK_CHECKPOINTS, else ~/.cache/fusedqk/checkpoints)."""
    if Path(model).is_dir():
        return Path(model)
    where = spec.checkpoint(model)
    if where != "export":
        if not Path(where).is_dir():
            raise UserError(f"engine {spec.source}: models.{model}: {where!r} is not a directory")
        return Path(where)
    from fusedqk.export import export
    from fusedqk.models import Quantization

    base = Path(root or os.environ.get(ENV_CHECKPOINTS) or Path.home() / ".cache/fusedqk/checkpoints")
    out = base / f"{model}-q{bits}g{group_size}-{dtype}-s{seed}"
    if not (out / "config.json").is_file():
        print(f"fusedqk: exporting {model} to {out}", file=sys.stderr, flush=True)
        export(model, out, Quantization(bits, group_size, dtype), seed)
    return out


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench(spec: EngineSpec, model: str, path: Path, backend: str, settings: BenchSettings,
          argv: list[str] | None = None) -> BenchRun:
    """Whole-process rounds of both arms; raises EngineFailure on the first failed run."""
    result = BenchRun(settings, list(ARMS))
    result.meta = {"started_at": now_utc(), "argv": argv or [], "instrument": INSTRUMENT,
                   "engine": spec.describe(), "model_path": str(path)}
    values = {"model": model, "model_path": path, "prompt_tokens": settings.prompt_tokens,
              "generation_tokens": settings.generation_tokens,
              "warmup_tokens": settings.warmup * settings.generation_tokens, "seed": settings.seed}
    order_rng = np.random.default_rng(settings.seed)
    ratios: list[float] = []
    result.meta["round_wall_s"] = []
    speedup = None
    for rnd in range(settings.round_limit):
        start = time.perf_counter()
        tok_s = {}
        for slot, i in enumerate(order_rng.permutation(len(ARMS))):
            arm = ARMS[i]
            out = run_arm(spec, spec.bench, arm, values)
            read = spec.bench.reader.read(out.output, METRICS, ("decode_tok_s",))
            tok_s[arm] = _positive(read["decode_tok_s"], "decode_tok_s", arm)
            prefill = read.get("prefill_tok_s")
            memory = (float(read["peak_memory_bytes"]) if "peak_memory_bytes" in read else
                      float(read["peak_memory_gb"]) * 1e9 if "peak_memory_gb" in read else None)
            result.trials.append({
                "model": model, "backend": backend, "path": arm, "round": rnd, "slot": slot,
                "prompt_tokens": settings.prompt_tokens,
                "generation_tokens": settings.generation_tokens,
                "prefill_tok_s": float(prefill) if prefill is not None else None,
                "decode_s": settings.generation_tokens / tok_s[arm], "decode_tok_s": tok_s[arm],
                "process_wall_s": out.wall_s,
                "peak_memory_bytes": int(memory) if memory is not None else None,
            })
        ratios.append(tok_s["fused"] / tok_s["graph"])
        speedup = stats.speedup_ci(ratios, seed=settings.seed, p_value=stats.paired_p(ratios))
        result.meta["round_wall_s"].append(time.perf_counter() - start)
        _note(f"round {rnd + 1} of at most {settings.round_limit}: fused {speedup.point:.3f} "
              f"± {speedup.relative_half_width:.1%}")
        result.meta["stopped"] = stop_reason(settings, rnd + 1, {"fused": speedup})
        if result.meta["stopped"]:
            break
    result.meta.update({"finished_at": now_utc(), "environment": environment()})
    df = pd.DataFrame(result.trials)
    for arm in ARMS:
        sub = df[df.path == arm]
        tok = sub.decode_tok_s.to_numpy()
        result.summary.append({
            "model": model, "backend": backend, "path": arm, "rounds": len(sub),
            "decode_tok_s_mean": float(tok.mean()),
            "decode_tok_s_sd": float(tok.std(ddof=1)) if len(tok) > 1 else 0.0,
            "decode_tok_s_median": float(np.median(tok)), "cv": stats.cv(tok),
            "prefill_tok_s_median": _median(sub.prefill_tok_s),
            "peak_memory_bytes": _max(sub.peak_memory_bytes),
        })
        result.warnings += stats.stability_warnings(arm, tok, len(sub), float(sub.decode_s.median()))
    halves = stats.halves(ratios, seed=settings.seed)
    result.warnings += stats.drift_warnings("fused", halves)
    result.speedups.append({"model": model, "backend": backend, "path": "fused",
                            **speedup.as_dict(), "estimator": ESTIMATOR, "p_test": PAIRED_TEST,
                            "round_speedups": ratios,
                            "halves": halves.as_dict() if halves else None})
    return result


ESTIMATOR = ("geometric mean over rounds of fused / graph decode tok/s, both arms run back to back "
             "in fresh processes each round; 95% CI: bootstrap over rounds")
PAIRED_TEST = "Wilcoxon signed-rank on the rounds' log speedups (paired by round)"


def _positive(value: object, name: str, arm: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EngineFailure(f"{arm} arm: {name} {value!r} is not a number") from None
    if not number > 0 or not np.isfinite(number):
        raise EngineFailure(f"{arm} arm: {name} {value!r} is not a positive number")
    return number


def _median(column: pd.Series) -> float | None:
    column = column.dropna()
    return float(column.median()) if len(column) else None


def _max(column: pd.Series) -> int | None:
    column = column.dropna()
    return int(column.max()) if len(column) else None


def prompt_text(vocab_size: int, length: int, seed: int) -> str:
    """A seeded prompt in the exported tokenizer's words (``fusedqk.export.word``)."""
    from fusedqk.export import word

    ids = np.random.default_rng(seed).integers(2, vocab_size, length)
    return " ".join(word(int(i)) for i in ids)


def _compared(spec: EngineSpec, out: Outcome) -> list | str:
    """What identity compares from one run's standard output: token ids, or the text with the
    lines the engine file strips (banners, timing) removed."""
    ident = spec.identity
    output = out.stdout
    if ident.compare == "tokens":
        tokens = ident.reader.read(output, ("tokens",), ("tokens",))["tokens"]
        if not isinstance(tokens, list):
            raise EngineFailure(f"identity output field {ident.reader.json_fields['tokens']!r} is not a list")
        return tokens
    lines = [ln for ln in output.splitlines() if not any(p.search(ln) for p in ident.strip)]
    return "\n".join(lines).strip()


def identity(spec: EngineSpec, model: str, path: Path, backend: str, vocab_size: int,
             prompt_tokens: int, tokens: int, prompts: int, seed: int) -> dict:
    start = time.perf_counter()
    def values(k: int) -> dict[str, object]:  # the placeholders of prompt k
        return {"model": model, "model_path": path, "prompt_tokens": prompt_tokens,
                "max_tokens": tokens, "seed": seed, "prompt_seed": seed + k,
                "prompt": prompt_text(vocab_size, prompt_tokens, seed + k)}

    outputs: dict[str, list] = {arm: [] for arm in ARMS}
    for k in range(prompts):
        for arm in ARMS:
            outputs[arm].append(_compared(spec, run_arm(spec, spec.identity, arm, values(k))))
    if any(not o for arm in ARMS for o in outputs[arm]):
        raise EngineFailure("identity: an arm printed nothing to compare (check identity.strip)")
    controls = {arm: _compared(spec, run_arm(spec, spec.identity, arm, values(0))) for arm in ARMS}
    divergence = [first_divergence(list(g), list(f))
                  for g, f in zip(outputs["graph"], outputs["fused"], strict=True)]
    equal = all(d is None for d in divergence)
    control = {arm: {"identical": controls[arm] == outputs[arm][0],
                     "first_difference": first_divergence(list(controls[arm]), list(outputs[arm][0]))}
               for arm in ARMS}
    distinct = sorted({len(set(o if isinstance(o, list) else o.split())) for o in outputs["graph"]})
    return {
        "model": model, "backend": backend, "impl": "fused",
        "verdict": verdict(equal, control["graph"]["identical"], control["fused"]["identical"]),
        "engine": spec.describe(), "compared": spec.identity.compare,
        "free_running": {"identical": equal, "greedy_first_divergence": divergence,
                         "sampled_first_divergence": None},
        "controls": {"run": True, "scope": f"greedy output of prompt 0 ({spec.identity.compare})",
                     **control},
        "graph_distinct_greedy_tokens": distinct,
        "outputs": {arm: [o if isinstance(o, list) else o[:2000] for o in outputs[arm]] for arm in ARMS},
        "settings": {"prompt_tokens": prompt_tokens, "tokens": tokens, "prompts": prompts,
                     "seed": seed},
        "model_path": str(path), "wall_s": time.perf_counter() - start, "finished_at": now_utc(),
        "environment": environment(),
    }



def render_identity(result: dict) -> str:
    fr, c = result["free_running"], result["controls"]
    lines = [f"{result['model']} on {result['backend']} ({result['engine']['name']}), graph vs fused "
             f"arm: {result['verdict']}",
             f"  greedy {result['compared']} identical={fr['identical']} over "
             f"{result['settings']['prompts']} prompts; first divergence {fr['greedy_first_divergence']}"]
    lines.append(variety_line(result))
    for arm in ARMS:
        lines.append(f"  control {arm} vs fresh process: identical={c[arm]['identical']}"
                     f" (first difference: {c[arm]['first_difference']})")
    return "\n".join(lines)
