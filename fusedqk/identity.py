"""Is the fused path's output the graph path's, byte for byte? With controls that say whether the
question can be answered at all.

- teacher-forced: one token sequence fed to both paths; every step's logits compared bit for bit;
- free-running: greedy decoding of N tokens from K seeded prompts, and seeded sampling at
  temperature 1, compared token for token;
- controls: every path's teacher-forced logits again in one fresh process (one more model build,
  not one per path), bitwise, step by step; a path that does not reproduce itself makes a
  difference between paths uninterpretable. The free-running decodes are not repeated there:
  they run the same kernels over the same contexts, and the teacher-forced logits are the more
  sensitive test (a bit, not a token); repeating them cost as long as the check itself.

Verdict: EQUAL (comparisons identical, both controls deterministic), DIFFERS (fused differs while
the graph path reproduces itself), INCONCLUSIVE (a control is not deterministic).

Attention is not part of the fused block, but it can make the controls fail: MLX's CUDA backend
hands single-token attention to cuDNN once the context reaches 256 in a cache allocated in steps
of 256 (mlx-lm's KVCache), and on the H100 that path does not reproduce itself across processes
(docs/perf-log.md). ``cudnn_sdpa=False`` keeps MLX on its own attention kernel for the whole check.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from fusedqk import phases
from fusedqk.backend import select_backend
from fusedqk.decode import generate, make_sampler, random_prompt, teacher_forced_logits
from fusedqk.engines.builtin import ModelRef
from fusedqk.engines.builtin import prepare as prepare_model
from fusedqk.envinfo import environment, now_utc
from fusedqk.errors import UserError
from fusedqk.results import first_divergence, variety_line, verdict

if TYPE_CHECKING:
    from fusedqk.engines.builtin import Prepared


@dataclass(frozen=True)
class IdentitySettings:
    prompt_tokens: int = 64
    tokens: int = 256
    prompts: int = 3
    seed: int = 0
    cudnn_sdpa: bool = True  # False: MLX's own attention kernel only, never cuDNN
    concurrent_controls: bool = False  # the controls' process runs alongside the check


# What a control repeats in its fresh process (recorded with every result).
CONTROL_SCOPE = "teacher-forced logits"

# MLX reads this once, at its first attention call on CUDA; other backends ignore it.
MLX_CUDNN_SDPA_ENV = "MLX_CUDA_USE_CUDNN_SDPA"


def prepare(ref: ModelRef, s: IdentitySettings) -> Prepared:
    """The model, with the attention switch set first, before any model runs, in this process
    and so in the controls (they inherit the environment)."""
    if not s.cudnn_sdpa:
        os.environ[MLX_CUDNN_SDPA_ENV] = "0"
    return prepare_model(ref)


@dataclass
class Trace:
    """What one path produced, small enough to pass between processes."""

    path: str
    logit_digests: list[str]  # sha256 of each teacher-forced step's logits bytes
    greedy: list[list[int]]  # empty in a control trace
    sampled: list[int]


def _teacher_sequence(vocab: int, s: IdentitySettings) -> mx.array:
    return random_prompt(vocab, s.prompt_tokens + s.tokens, s.seed + 1000)


def _logits(prep: Prepared, path: str, s: IdentitySettings) -> list[np.ndarray]:
    prep.paths.use(path)
    seq = _teacher_sequence(prep.loaded.config["vocab_size"], s)
    # float32 holds every bf16/fp16 value exactly and one-to-one, so bitwise comparisons in float32
    # are bitwise comparisons of the logits themselves (numpy has no bfloat16).
    steps = teacher_forced_logits(prep.loaded.model, seq, s.prompt_tokens)
    return [np.array(step.astype(mx.float32)) for step in steps]


def _digests(logits: list[np.ndarray]) -> list[str]:
    return [hashlib.sha256(step.tobytes()).hexdigest() for step in logits]


def trace(prep: Prepared, path: str, s: IdentitySettings, logits: list[np.ndarray]) -> Trace:
    """Run ``path`` through the free-running comparisons; ``logits`` are its teacher-forced steps,
    already run."""
    prep.paths.use(path)
    vocab = prep.loaded.config["vocab_size"]
    model = prep.loaded.model
    greedy = [generate(model, random_prompt(vocab, s.prompt_tokens, s.seed + k), s.tokens,
                       make_sampler(0.0, s.seed)).tokens for k in range(s.prompts)]
    sampled = generate(model, random_prompt(vocab, s.prompt_tokens, s.seed), s.tokens,
                       make_sampler(1.0, s.seed)).tokens
    prep.paths.use("graph")
    return Trace(path, _digests(logits), greedy, sampled)


def control_trace(prep: Prepared, path: str, s: IdentitySettings) -> Trace:
    """What the controls repeat: the teacher-forced logits' digests."""
    return Trace(path, _digests(_logits(prep, path, s)), [], [])


def compare_logits(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """Bitwise comparison of two paths' teacher-forced logits, step by step."""
    equal = total = top1 = 0
    first_diff = None
    max_abs = 0.0
    sq = 0.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        same = x.view(np.uint32) == y.view(np.uint32)
        equal += int(same.sum())
        total += same.size
        if first_diff is None and not same.all():
            first_diff = i
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        max_abs = max(max_abs, float(d.max()))
        sq += float((d**2).sum())
        top1 += int(np.argmax(x) == np.argmax(y))
    return {
        "steps": len(a), "equal_fraction": equal / total if total else 1.0,
        "bitwise_equal": equal == total, "max_abs_diff": max_abs,
        "rms_diff": (sq / total) ** 0.5 if total else 0.0,
        "top1_agreement": top1 / len(a) if a else 1.0, "first_differing_step": first_diff,
    }


def compare_free_running(a: Trace, b: Trace) -> dict:
    """Do two traces' greedy and sampled tokens agree, and where do they part?"""
    greedy_diffs = [first_divergence(x, y) for x, y in zip(a.greedy, b.greedy, strict=True)]
    sampled_diff = first_divergence(a.sampled, b.sampled)
    same = all(d is None for d in greedy_diffs) and sampled_diff is None
    return {"identical": same, "greedy_first_divergence": greedy_diffs,
            "sampled_first_divergence": sampled_diff}


def compare_control(run: Trace, control: Trace) -> dict:
    """Does a path reproduce its own teacher-forced logits in a fresh process, and from which step
    not?"""
    first = first_divergence(run.logit_digests, control.logit_digests)
    return {"identical": first is None, "first_differing_logit_step": first}


WORKER_FORMAT = "fusedqk-identity-worker/1"


def worker_spec(ref: ModelRef, s: IdentitySettings, paths: list[str]) -> str:
    """What the control worker (``python -m fusedqk.identity_worker``) reads on stdin: the model
    reference and the settings as their dataclasses' fields, so no flag is ever copied."""
    return json.dumps({"format": WORKER_FORMAT, "model": asdict(ref), "settings": asdict(s),
                       "paths": paths})


def read_worker_spec(text: str) -> tuple[ModelRef, IdentitySettings, list[str]]:
    try:
        doc = json.loads(text)
        if doc.get("format") != WORKER_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {WORKER_FORMAT}")
        return ModelRef(**doc["model"]), IdentitySettings(**doc["settings"]), list(doc["paths"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"identity worker: the spec on stdin is not a {WORKER_FORMAT} object ({e})") from None


def _start_controls(ref: ModelRef, s: IdentitySettings, paths: list[str]) -> subprocess.Popen:
    """The same traces from one new process (the controls), one model build for all paths. It
    inherits this process's environment, the attention switch included."""
    proc = subprocess.Popen([sys.executable, "-m", "fusedqk.identity_worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(worker_spec(ref, s, paths))
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() only reads
    return proc


def _control_traces(proc: subprocess.Popen, paths: list[str]) -> dict[str, Trace]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"control run of {', '.join(paths)} failed: {last}")
    return {t["path"]: Trace(**t) for t in json.loads(out)}


def check_identity(ref: ModelRef, s: IdentitySettings, impls: str = "fused",
                   controls: bool = True) -> list[dict]:
    """The full check of every fused implementation in ``impls`` (a comma list) against graph
    for one model, ``controls`` included; the graph path (and its control) runs once for all."""
    from fusedqk.bench import expand_paths

    start = time.perf_counter()
    if not [n for n in impls.split(",") if n.strip() and n.strip() != "graph"]:
        raise UserError(f"--impls {impls!r}: name the fused implementations to check against "
                        "graph (e.g. fused, or kernel,composite); graph itself always runs")
    fused_paths = expand_paths(f"graph,{impls}", select_backend(ref.backend), "auto",
                               flag="--impls")[1:]  # refused before any weights are made
    prep = prepare(ref, s)
    paths = ["graph", *fused_paths]
    # Concurrent controls share the device with this run (two model copies must fit); decode
    # is mostly host-bound, so the check takes about the longer of the two instead of the sum.
    concurrent = s.concurrent_controls and controls
    control = _start_controls(ref, s, paths) if concurrent else None
    with phases.phase("measure"):
        graph_logits = _logits(prep, "graph", s)
        graph_trace = trace(prep, "graph", s, graph_logits)
        compared = []
        for fused in fused_paths:
            fused_logits = _logits(prep, fused, s)
            logits_cmp = compare_logits(graph_logits, fused_logits)
            fused_trace = trace(prep, fused, s, fused_logits)
            del fused_logits
            free = compare_free_running(graph_trace, fused_trace)
            compared.append((fused, logits_cmp, free, fused_trace))
    env = environment(prep)
    if control is None and controls:
        # Sequential controls: free this model first, or two copies of a large model (and
        # MLX's buffer cache) need not fit the device together.
        del prep, graph_logits
        gc.collect()
        mx.clear_cache()
        control = _start_controls(ref, s, paths)
    with phases.phase("controls"):  # what is left of them once the check is done
        fresh = _control_traces(control, paths) if control else {}
    graph_control = compare_control(graph_trace, fresh["graph"]) if fresh else {}
    results = []
    for fused, logits_cmp, free, fused_trace in compared:
        recorded: dict = {"run": controls, "scope": CONTROL_SCOPE}
        graph_det = fused_det = None
        if controls:
            recorded["graph"] = graph_control
            recorded["fused"] = compare_control(fused_trace, fresh[fused])
            graph_det, fused_det = graph_control["identical"], recorded["fused"]["identical"]
        equal = logits_cmp["bitwise_equal"] and free["identical"]
        results.append({
            "model": env["model"], "backend": env["backend"], "impl": fused,
            "verdict": verdict(equal, graph_det, fused_det),
            "teacher_forced": logits_cmp, "free_running": free, "controls": recorded,
            "graph_distinct_greedy_tokens": sorted({len(set(q)) for q in graph_trace.greedy}),
            "settings": asdict(s), "wall_s": time.perf_counter() - start,
            "finished_at": now_utc(), "environment": env,
        })
    return results


def render_verdict(result: dict) -> str:
    tf, fr = result["teacher_forced"], result["free_running"]
    lines = [
        f"{result['model']} on {result['backend']}, graph vs {result['impl']}: {result['verdict']}",
        f"  teacher-forced logits: {tf['equal_fraction']:.6%} bitwise equal over {tf['steps']} steps,"
        f" max |diff| {tf['max_abs_diff']:.3g}, top-1 agreement {tf['top1_agreement']:.2%},"
        f" first differing step {tf['first_differing_step']}",
        f"  free-running: identical={fr['identical']} greedy divergence "
        f"{fr['greedy_first_divergence']} sampled divergence {fr['sampled_first_divergence']}",
    ]
    lines.append(variety_line(result))
    c = result["controls"]
    if c["run"]:
        for path in ("graph", "fused"):
            lines.append(f"  control {path} vs fresh process: identical={c[path]['identical']}"
                         f" (first logit step differing: {c[path]['first_differing_logit_step']})")
    else:
        lines.append("  controls not run: determinism unknown")
    return "\n".join(lines)
