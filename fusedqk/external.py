"""Bench and identity for an engine file (``fusedqk.engines``: command and server engines): the
rounds are handed to the one instrument (``fusedqk.instrument``), so the statistics, stop rule
and summary are the built-in's; a command engine's rounds are whole-process.

Bench: R rounds, each running every arm once in a fresh process, in a seeded order; a round's
speedup is the fused arm's decode tok/s over the graph arm's (the two ran back to back), and the
speedup is the geometric mean over rounds with the same bootstrap CI, adaptive length and halves
check as ``fusedqk bench``. The instrument is recorded (``meta.instrument``) so that a
whole-process ratio is never mixed with a turn-paired one.

Identity: K greedy prompts per arm, compared arm against arm, and a control that runs each arm's
first prompt again in a fresh process. EQUAL / DIFFERS / INCONCLUSIVE as ``fusedqk.identity``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from fusedqk import instrument, stats
from fusedqk.engines import server
from fusedqk.engines.command import ARMS, COMMAND, METRICS, SERVER, EngineSpec, fill_template, run_arm
from fusedqk.engines.process import EngineFailure, Finished
from fusedqk.envinfo import environment, now_utc
from fusedqk.errors import UserError
from fusedqk.results import BenchRun, BenchSettings, first_divergence, variety_line, verdict

INSTRUMENT = "whole-process: each arm in a fresh process per round, rounds paired"
SERVER_INSTRUMENT = ("server: one long-lived server per arm, the arms taking turns of streamed "
                     "completions ABBA, rounds paired")
INSTRUMENTS = {COMMAND: INSTRUMENT, SERVER: SERVER_INSTRUMENT}
# What an engine file's ``models`` entry may say instead of a path: fusedqk writes the synthetic
# weights once per machine, as an MLX checkpoint or as a GGUF file (llama.cpp).
EXPORTS = ("export", "export-gguf")


def checkpoint_dir(spec: EngineSpec, model: str, bits: int, group_size: int, dtype: str,
                   seed: int, backend: str, root: str | None = None) -> Path:
    """The checkpoint an engine runs ``model`` from: a directory the engine file names, the
    model itself when it is a directory, or fusedqk's cached export of its synthetic weights
    (``fusedqk.caches``, made once, outside any timed region) under ``root`` when given."""
    if Path(model).is_dir():
        return Path(model)
    if Path(model).is_file() and model.endswith(".gguf"):
        return Path(model)
    where = spec.checkpoint(model)
    if where not in EXPORTS:
        if where.endswith(".gguf") and Path(where).is_file():
            return Path(where)
        if not Path(where).is_dir():
            raise UserError(f"engine {spec.source}: models.{model}: {where!r} is not a checkpoint "
                            "directory or a .gguf file")
        return Path(where)
    from fusedqk.caches import checkpoints_root, synthetic_checkpoint, synthetic_gguf

    made = synthetic_gguf if where == "export-gguf" else synthetic_checkpoint
    return made(model, bits, group_size, dtype, seed, backend, checkpoints_root(root))[0]


def vocab_size(checkpoint: Path) -> int:
    """The checkpoint's vocabulary size (its config.json, or a GGUF file's token list), for the
    seeded prompts."""
    if Path(checkpoint).is_file():
        return gguf_vocab_size(Path(checkpoint))
    path = Path(checkpoint) / "config.json"
    try:
        value = json.loads(path.read_text()).get("vocab_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise UserError(f"checkpoint {str(checkpoint)!r}: no readable config.json (an MLX checkpoint "
                        "directory has one)") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 3:
        raise UserError(f"checkpoint {str(checkpoint)!r}: config.json vocab_size {value!r} is not a "
                        "vocabulary size")
    return value


def gguf_vocab_size(path: Path) -> int:
    try:
        from gguf import GGUFReader

        tokens = GGUFReader(path).fields["tokenizer.ggml.tokens"]
        return len(tokens.data)
    except (OSError, ValueError, KeyError, IndexError):
        raise UserError(f"checkpoint {str(path)!r}: not a GGUF file with a token list") from None


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench(spec: EngineSpec, model: str, path: Path, backend: str, vocab_size: int,
          settings: BenchSettings, argv: list[str] | None = None) -> BenchRun:
    """Paired rounds of both arms: fresh processes each round for a command engine, one
    streamed completion per arm and round, in ABBA order, from each arm's long-lived server for a
    server engine. Raises EngineFailure on the first failed run. A round whose arms decoded
    different numbers of tokens (an early end of sequence in one of them) is refused, recorded
    in ``meta.refused_rounds``, and never enters the speedup."""
    result = BenchRun(settings, list(ARMS))
    checked = spec.check_requirements(backend)
    result.meta = {"started_at": now_utc(), "argv": argv or [], "instrument": INSTRUMENTS[spec.kind],
                   "engine": spec.describe(checked), "model_path": str(path),
                   "refused_rounds": []}
    values = {"model": model, "model_path": path, "prompt_tokens": settings.prompt_tokens,
              "generation_tokens": settings.generation_tokens,
              "warmup_tokens": settings.warmup * settings.generation_tokens, "seed": settings.seed,
              "prompt": prompt_text(vocab_size, settings.prompt_tokens, settings.seed)}
    if spec.kind == SERVER:
        # Checked before any server starts: a machine without the cores is one line, at once.
        shared = server.shared_cpus(spec.server.shared_cpus, sorted(os.sched_getaffinity(0)),
                                    spec.source)
        with _arm_servers(spec, values, vocab_size, settings.prompt_tokens) as (servers, cpus):
            result.meta["server_start_s"] = {arm: s.started_s for arm, s in servers.items()}
            result.meta["arm_confirmation"] = {arm: s.confirmation for arm, s in servers.items()
                                               if s.confirmation is not None}
            if cpus:
                result.meta["cpus"] = {k: sorted(v) for k, v in cpus.items()}
            if shared:
                result.meta["round_cpus"] = []
            for arm in ARMS:  # untimed: compilation, caches, the allocator's first growth
                for w in range(max(1, settings.warmup)):
                    seed = settings.seed + settings.round_limit + w  # no round's prompt
                    servers[arm].stream(prompt_text(vocab_size, settings.prompt_tokens, seed),
                                        settings.generation_tokens)
            def server_round(rnd: int) -> list[dict]:
                if shared:
                    result.meta["round_cpus"].append(sorted(server.share_cores(servers, shared, rnd)))
                return _server_round(servers, rnd, vocab_size, settings, model, backend,
                                     result.tokens)

            ratios, speedup = _paired_rounds(spec, settings, result, server_round)
    else:
        order_rng = np.random.default_rng(settings.seed)
        ratios, speedup = _paired_rounds(
            spec, settings, result,
            lambda rnd: [_bench_trial(spec, arm, slot, rnd, values, settings, model, backend)
                         for slot, arm in enumerate(ARMS[i] for i in order_rng.permutation(len(ARMS)))])
    _summarise(result, ratios, speedup)
    return result


def _paired_rounds(spec: EngineSpec, settings: BenchSettings, result: BenchRun,
                   run_round) -> tuple[list[float], stats.Speedup]:
    """Rounds from ``run_round(rnd)`` (one trial per arm) through the one instrument
    (``fusedqk.instrument``); a round whose arms decoded different numbers of tokens, or none,
    is recorded and refused."""
    ratios: list[float] = []

    def play_round(rnd: int) -> bool:
        trials = run_round(rnd)
        decoded = {t["path"]: t["generated_tokens"] for t in trials}
        if len(set(decoded.values())) > 1 or 0 in decoded.values():
            result.meta["refused_rounds"].append({"round": rnd, "generated_tokens": decoded})
            result.tokens = [t for t in result.tokens if t["round"] != rnd]
            _note(f"round {rnd + 1}: refused, the arms decoded {decoded} tokens (an early end "
                  "of sequence, or none at all); its speeds are not comparable")
            if len(result.meta["refused_rounds"]) > settings.round_limit // 2:
                raise EngineFailure(f"engine {spec.name}, bench: {len(result.meta['refused_rounds'])}"
                                    " rounds refused because the arms decoded different numbers of "
                                    f"tokens (last: {decoded}); check the engine's end-of-sequence "
                                    "handling")
            return False
        result.trials += trials
        ratios.append(_round_ratio(trials))
        return True

    def tally():
        return {"fused": ratios}, {"fused": stats.speedup_ci(ratios, seed=settings.seed,
                                                             p_value=stats.paired_p(ratios))}

    _, speedups = instrument.paired_rounds(result, play_round, tally, _note)
    if not speedups:
        raise EngineFailure(f"engine {spec.name}, bench: every round was refused")
    return ratios, speedups["fused"]


def _round_ratio(trials: list[dict]) -> float:
    """A round's speedup: turn-paired (``stats.round_speedup``) where the arms took turns, else
    fused over graph decode tok/s. The per-turn times leave the trial rows here (tokens.csv keeps
    every gap)."""
    by_arm = {t["path"]: t for t in trials}
    turns = {arm: t.pop("turn_decode_s", None) for arm, t in by_arm.items()}
    if turns["graph"] is not None and turns["fused"] is not None:
        return stats.round_speedup(turns["graph"], turns["fused"])
    return by_arm["fused"]["decode_tok_s"] / by_arm["graph"]["decode_tok_s"]


def _summarise(result: BenchRun, ratios: list[float], speedup: stats.Speedup) -> None:
    """The refused rounds named, then the instrument's summary; the graph arm's time per token
    in each round kept tells the host's faster rounds from its slower ones."""
    if result.meta["refused_rounds"]:
        refused = result.meta["refused_rounds"]
        rounds = ", ".join(f"{r['round'] + 1} ({r['generated_tokens']})" for r in refused[:5])
        result.warnings.append(f"{len(refused)} round(s) refused: an arm decoded fewer tokens "
                               f"than the other, or none (round (tokens per arm): {rounds}"
                               f"{', …' if len(refused) > 5 else ''})")
    result.meta.update({"finished_at": now_utc(), "environment": environment()})
    graph = pd.DataFrame(result.trials).query("path == 'graph'")
    instrument.summarize(result, {"fused": ratios}, {"fused": speedup},
                         (1 / graph.decode_tok_s).tolist(),
                         ESTIMATORS[result.meta["instrument"]], PAIRED_TEST)


@contextmanager
def _arm_servers(spec: EngineSpec, values: dict, vocab_size: int, prompt_tokens: int):
    """Both arms' servers, started one after the other, running for the block, and the cores
    each has and the client keeps (``server.cpus_per_arm``; empty when unpinned)."""
    def argv_for(host: str, port: int) -> list[str]:
        return fill_template(spec.server.argv, {"python": sys.executable, **values, "host": host,
                                         "port": port})
    warm = prompt_text(vocab_size, min(prompt_tokens, 8), 0)
    cpus = server.arm_cpus(spec.server.cpus_per_arm, sorted(os.sched_getaffinity(0)), spec.source,
                            ARMS)
    with ExitStack() as stack:
        # The client's cores, given back when the block ends: it keeps the cores no server has
        # (cpus_per_arm), or moves round by round (shared_cpus).
        stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
        if cpus:
            os.sched_setaffinity(0, cpus["client"])
        servers = {arm: stack.enter_context(server.running(
            spec.server, argv_for, spec.arm_env(arm),
            f"engine {spec.name}, server, {arm} arm", spec.expect.get(arm), f"arms.{arm}.expect",
            warm, spec.max_output_bytes, cpus.get(arm))) for arm in ARMS}
        yield servers, cpus


def _server_round(servers: dict, rnd: int, vocab_size: int, settings: BenchSettings, model: str,
                  backend: str, tokens: list[dict]) -> list[dict]:
    """One round: each arm decodes ``generation_tokens`` in turns of ``chunk_tokens``, the arms
    alternating ABBA turn by turn, so both see the same moment's host state, as the built-in's
    turns do. A turn is one streamed completion of the round's seeded prompt with ``chunk_tokens``
    + 1 tokens: its first event (after prefill) starts the clock and the next ``chunk_tokens``
    gaps are timed. ``chunk_tokens`` >= ``generation_tokens`` is one completion per arm and round.
    Each gap is appended to ``tokens`` (tokens.csv)."""
    prompt = prompt_text(vocab_size, settings.prompt_tokens, settings.seed + rnd)
    chunk = min(settings.chunk_tokens, settings.generation_tokens)
    turns = -(-settings.generation_tokens // chunk)
    runs: dict[str, list] = {arm: [] for arm in ARMS}
    walls = dict.fromkeys(ARMS, 0.0)
    first_order = ARMS if rnd % 2 == 0 else ARMS[::-1]
    for turn in range(turns):
        for arm in first_order if turn % 2 == 0 else first_order[::-1]:
            start = time.perf_counter()
            runs[arm].append(servers[arm].stream(prompt, chunk + 1 if turns > 1 else chunk))
            walls[arm] += time.perf_counter() - start
    trials = []
    for slot, arm in enumerate(first_order):
        decode_s = [_turn_decode_s(servers[arm], out) for out in runs[arm]]
        timed = sum(out.chunks - 1 for out in runs[arm])
        step = 0
        for out in runs[arm]:
            for gap in out.gaps:
                step += 1
                tokens.append({"model": model, "path": arm, "round": rnd, "step": step,
                               "latency_s": gap})
        counts = [out.completion_tokens if out.completion_tokens is not None else out.chunks
                  for out in runs[arm]]
        first_s = float(np.median([out.first_token_s for out in runs[arm]]))
        trials.append({
            "model": model, "backend": backend, "path": arm, "round": rnd, "slot": slot,
            "prompt_tokens": settings.prompt_tokens, "generation_tokens": settings.generation_tokens,
            "chunk_tokens": chunk, "turns": turns, "generated_tokens": sum(counts),
            "timed_tokens": timed,
            "prefill_tok_s": settings.prompt_tokens / first_s,
            "decode_s": sum(decode_s), "decode_tok_s": timed / sum(decode_s),
            "process_wall_s": walls[arm], "peak_memory_bytes": None, "first_token_s": first_s,
            "stream_events": sum(out.chunks for out in runs[arm]),
            "timing": "server" if runs[arm][0].server_tok_s is not None else "stream",
            "turn_decode_s": decode_s})
    return trials


def _turn_decode_s(arm: server.ArmServer, out: server.Streamed) -> float:
    """One completion's decode time: its timed gaps, or its token count at the server's own
    rate where ``server.timing_field`` names one."""
    if out.server_tok_s is not None:  # the server's own figure: checked as every reported one
        return (out.chunks - 1) / _positive(out.server_tok_s, arm.command.timing_field, arm.label)
    if out.stream_tok_s is None or not out.stream_tok_s > 0:
        raise EngineFailure(f"{arm.label}: no decode rate (the stream's text events arrived all "
                            "at once)")
    return (out.chunks - 1) / out.stream_tok_s


def _bench_trial(spec: EngineSpec, arm: str, slot: int, rnd: int, values: dict, settings: BenchSettings,
                 model: str, backend: str) -> dict:
    """One fresh process of the bench command for ``arm``, and what it reported."""
    who = f"engine {spec.name}, bench, {arm} arm"
    out = run_arm(spec, spec.bench, arm, values)
    read = spec.bench.reader.read(out.output, METRICS, ("decode_tok_s",), out.time_left())
    decoded = (_count(read["generated_tokens"], who, settings.generation_tokens)
               if "generated_tokens" in read
               else settings.generation_tokens)
    # An arm that decoded nothing (end of sequence as its first token) reports no rate worth
    # reading (mlxcel prints 0.00 tok/s): the round is refused, not the model.
    tok_s = _positive(read["decode_tok_s"], "decode_tok_s", who) if decoded else float("nan")
    prefill = read.get("prefill_tok_s")
    memory = (_positive(read["peak_memory_bytes"], "peak_memory_bytes", who)
              if "peak_memory_bytes" in read else
              _positive(read["peak_memory_gb"], "peak_memory_gb", who) * 1e9
              if "peak_memory_gb" in read else None)
    return {"model": model, "backend": backend, "path": arm, "round": rnd, "slot": slot,
            "prompt_tokens": settings.prompt_tokens, "generation_tokens": settings.generation_tokens,
            "generated_tokens": decoded,
            "prefill_tok_s": _positive(prefill, "prefill_tok_s", who) if prefill is not None else None,
            "decode_s": decoded / tok_s, "decode_tok_s": tok_s, "process_wall_s": out.wall_s,
            "peak_memory_bytes": int(memory) if memory is not None else None}


ESTIMATOR = ("geometric mean over rounds of fused / graph decode tok/s, both arms run back to back "
             "in fresh processes each round; 95% CI: bootstrap over rounds")
SERVER_ESTIMATOR = ("geometric mean over rounds of the round's speedup (the median over turns of "
                    "graph / fused turn decode time), the arms taking turns ABBA, a turn being one "
                    "streamed completion of chunk_tokens + 1 tokens from the arm's long-lived "
                    "server (one completion per arm where chunk_tokens >= generation_tokens); "
                    "decode time from the stream's event gaps (or the server's own timing field); "
                    "95% CI: bootstrap over rounds")
ESTIMATORS = {INSTRUMENT: ESTIMATOR, SERVER_INSTRUMENT: SERVER_ESTIMATOR}
PAIRED_TEST = "Wilcoxon signed-rank on the rounds' log speedups (paired by round)"


# What an engine may report: ASCII numbers (no `1_000`, no full-width digits) in ranges a
# decode can have. Anything else is the engine's output misread, never a measurement.
_NUMBER = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
DECODE_TOK_S = (1e-3, 1e7)
PLAUSIBLE = {"decode_tok_s": DECODE_TOK_S, "prefill_tok_s": (1e-3, 1e9),
             "peak_memory_bytes": (1.0, 1e15), "peak_memory_gb": (1e-9, 1e6)}


def _positive(value: object, name: str, arm: str) -> float:
    """A reported figure as a finite positive number in the range a decode can have (a JSON
    true is not 1.0)."""
    text = str(value).strip()
    if isinstance(value, bool) or not _NUMBER.fullmatch(text):
        raise EngineFailure(f"{arm}: {name} {text[:40]!r} is not a number")
    number = float(text)
    # A server's own rate field (server.timing_field) is a decode rate whatever its name.
    low, high = PLAUSIBLE.get(name, DECODE_TOK_S)
    if not np.isfinite(number) or not low <= number <= high or number <= 0:
        raise EngineFailure(f"{arm}: {name} {text[:40]!r} is outside what a decode can report "
                            f"({low:g} to {high:g})")
    return number


def _count(value: object, arm: str, asked: int) -> int:
    """A reported token count: an ASCII integer from 0 to what was asked."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]{1,12}", text):
        raise EngineFailure(f"{arm}: generated_tokens {text[:40]!r} is not a count")
    count = int(text)
    if count > asked:
        raise EngineFailure(f"{arm}: generated_tokens {count} is more than the {asked} asked for")
    return count


def prompt_text(vocab_size: int, length: int, seed: int) -> str:
    """A seeded prompt in the exported tokenizer's words (``fusedqk.export.word``)."""
    from fusedqk.export import word

    ids = np.random.default_rng(seed).integers(2, vocab_size, length)
    return " ".join(word(int(i)) for i in ids)


def _compared(spec: EngineSpec, out: Finished, prompt: str) -> list:
    """What identity compares from one run's standard output: the token ids, or the generated
    text's words (``identity.generated``, the prompt's echo dropped), never banners or timing.
    The exported tokenizer is word-level, so on its checkpoints words are tokens."""
    ident = spec.identity
    who = f"engine {spec.name}, identity"
    if ident.compare == "tokens":
        tokens = ident.reader.read(out.stdout, ("tokens",), ("tokens",), out.time_left())["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    for t in tokens):
            raise EngineFailure(f"{who}: json.tokens field {ident.reader.json_fields['tokens']!r} "
                                "is not a list of token ids")
        return tokens
    try:
        found = ident.generated.search(out.stdout, timeout=max(out.time_left(), 0.01))
    except TimeoutError:
        raise EngineFailure(f"{who}.generated: matching took longer than the run's timeout_s") from None
    if found is None:
        first = (out.stdout.strip().splitlines() or ["no output"])[0][:120]
        raise EngineFailure(f"{who}.generated: no generated text found in the output (first line: "
                            f"{first!r}); the engine's output format may have changed")
    text = found.group("value")
    if ident.echoes_prompt:
        if not text.startswith(prompt):
            raise EngineFailure(f"{who}: identity.echoes_prompt is set but the generated text does "
                                f"not start with the prompt (it starts {text[:60]!r})")
        text = text[len(prompt):]
    return text.split()


def identity(spec: EngineSpec, model: str, path: Path, backend: str, vocab_size: int,
             prompt_tokens: int, tokens: int, prompts: int, seed: int) -> dict:
    start = time.perf_counter()
    checked = spec.check_requirements(backend)
    prompt_texts = [prompt_text(vocab_size, prompt_tokens, seed + k) for k in range(prompts)]

    if spec.identity_by_server:
        outputs, controls = _server_identity(spec, model, path, vocab_size, prompt_texts, tokens, seed)
    else:
        def decode(arm: str, k: int) -> list:
            values = {"model": model, "model_path": path, "prompt_tokens": prompt_tokens,
                      "max_tokens": tokens, "seed": seed, "prompt_seed": seed + k,
                      "prompt": prompt_texts[k]}
            return _compared(spec, run_arm(spec, spec.identity, arm, values), prompt_texts[k])

        outputs = {arm: [decode(arm, k) for k in range(prompts)] for arm in ARMS}
        controls = {arm: decode(arm, 0) for arm in ARMS}
    if any(not o for arm in ARMS for o in outputs[arm]):
        raise EngineFailure(f"engine {spec.name}, identity: an arm generated nothing to compare")
    divergence = [first_divergence(g, f) for g, f in zip(outputs["graph"], outputs["fused"], strict=True)]
    equal = all(d is None for d in divergence)
    control = {arm: {"identical": controls[arm] == outputs[arm][0],
                     "first_difference": first_divergence(controls[arm], outputs[arm][0])}
               for arm in ARMS}
    unit = "token" if _compares(spec) == "tokens" else "word"
    return {
        "model": model, "backend": backend, "impl": "fused",
        "verdict": verdict(equal, control["graph"]["identical"], control["fused"]["identical"]),
        "engine": spec.describe(checked), "compared": _compares(spec), "divergence_unit": unit,
        "free_running": {"identical": equal, "greedy_first_divergence": divergence,
                         "sampled_first_divergence": None},
        "controls": {"run": True, "scope": f"greedy output of prompt 0 ({unit}s) in a fresh "
                     f"{'server' if spec.identity_by_server else 'process'}", **control},
        "graph_distinct_greedy_tokens": sorted({len(set(o)) for o in outputs["graph"]}),
        "outputs": {arm: [o[:2000] for o in outputs[arm]] for arm in ARMS},
        "settings": {"prompt_tokens": prompt_tokens, "tokens": tokens, "prompts": prompts,
                     "seed": seed},
        "model_path": str(path), "wall_s": time.perf_counter() - start, "finished_at": now_utc(),
        "environment": environment(),
    }


def _compares(spec: EngineSpec) -> str:
    if spec.identity_by_server:
        return "tokens" if spec.server.identity_tokens else "text"
    return spec.identity.compare


def _server_identity(spec: EngineSpec, model: str, path: Path, vocab_size: int,
                     prompt_texts: list[str], tokens: int, seed: int) -> tuple[dict, dict]:
    """Greedy completions of every prompt from both arms' servers, then prompt 0 again from a
    fresh pair of servers (the control: does a server agree with a fresh one of itself?)."""
    values = {"model": model, "model_path": path, "seed": seed}
    with _arm_servers(spec, values, vocab_size, len(prompt_texts[0].split())) as (servers, _):
        outputs = {arm: [servers[arm].greedy(p, tokens) for p in prompt_texts] for arm in ARMS}
    with _arm_servers(spec, values, vocab_size, len(prompt_texts[0].split())) as (servers, _):
        controls = {arm: servers[arm].greedy(prompt_texts[0], tokens) for arm in ARMS}
    return outputs, controls


def render_identity(result: dict) -> str:
    fr, c = result["free_running"], result["controls"]
    lines = [f"{result['model']} on {result['backend']} ({result['engine']['name']}), graph vs fused "
             f"arm: {result['verdict']}",
             f"  greedy {result['compared']} identical={fr['identical']} over "
             f"{result['settings']['prompts']} prompts; first differing "
             f"{result.get('divergence_unit', 'token')} {fr['greedy_first_divergence']}"]
    lines.append(variety_line(result))
    where = "server" if result["engine"].get("kind") == SERVER else "process"
    for arm in ARMS:
        lines.append(f"  control {arm} vs fresh {where}: identical={c[arm]['identical']}"
                     f" (first difference: {c[arm]['first_difference']})")
    return "\n".join(lines)
