"""What sets a server engine's per-request decode speed: one pair of long-lived servers (an
engine file's two arms), streamed greedy completions in ABBA rounds, under CPU placements that
are switched on the running servers, block by block, so that every placement sees the same
stretch of the machine's time.

    python tools/server_noise.py ENGINE_FILE MODEL [--layouts unpinned,phys2,freeze]
                                 [--rounds 16] [--block 4] [--tokens 128] [--out FILE]

Placements (``--layouts``):
  unpinned   every thread may run on every core (what the pipeline does by default)
  physN      each arm's server on N physical cores of its own (all their hardware threads),
             the client on the rest
  sharedN    both arms' servers on the same N physical cores (only one serves at a time), the
             client on the rest: whether a core's own speed, not the arm, sets a token's time
  rotN       both arms' servers on the same N cores, the next N cores each round
             (``server.shared_cpus``), the client on the rest
  freeze     unpinned, and the arm not being timed is stopped (SIGSTOP) until its turn
  physN+freeze, sharedN+freeze  both
``--switch-interval-us N`` starts both servers with Python's thread switch interval at N µs
(CPython's default is 5000) through a ``sitecustomize`` module on their PYTHONPATH: whether a
token waits for the GIL between the server's generation thread and its HTTP thread.
Before each request the client times a fixed piece of pure-Python work (``probe ms``): if the
machine's own speed drifts, the probe drifts with the requests' gaps, and the table shows how
closely. Each request also records the time the hypervisor took from the machine's CPUs
(``steal`` in /proc/stat) and the core its server's busiest thread ended on. Prints a table per
placement: per-arm CV of request tok/s, the arms' correlation, the SD of the rounds' log
speedups, the speedup with its bootstrap CI, gap percentiles, steal, and each server thread's CPU
share (a thread near 100 % spins); ``--out`` writes every request's gaps as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np

from fusedqk import stats
from fusedqk.backend import current_backend
from fusedqk.engines import measure, server
from fusedqk.engines.command import ARMS, fill_template, load_engine
from fusedqk.engines.measure import checkpoint_dir, prompt_text, vocab_size
from fusedqk.engines.process import background, pin_group


def physical_cores(allowed: set[int]) -> list[list[int]]:
    """The machine's logical CPUs grouped by physical core (hardware-thread siblings together),
    limited to the CPUs this process may use."""
    groups: dict[tuple[str, str], list[int]] = {}
    for cpu in sorted(allowed):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(),
                   (topo / "core_id").read_text().strip())
        except OSError:
            key = ("?", str(cpu))
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def placement(name: str) -> tuple[int | None, str, bool]:
    """``physN`` / ``sharedN`` / ``rotN`` / ``unpinned``, each with an optional ``+freeze``, as
    (physical cores per arm or None, the kind, freeze)."""
    parts = name.split("+")
    freeze = "freeze" in parts
    cores = [p for p in parts if p not in ("freeze", "unpinned")]
    kind = cores[0].rstrip("0123456789") if cores else ""
    if len(cores) > 1 or (cores and (kind not in ("phys", "shared", "rot") or kind == cores[0])):
        raise SystemExit(f"--layouts: {name!r} is not unpinned, freeze, physN, sharedN, rotN or "
                         "one of them +freeze")
    return (int(cores[0][len(kind):]) if cores else None), kind, freeze


def cpu_sets(everything: set[int], per_arm: int | None, kind: str = "",
             rnd: int = 0) -> dict[str, set[int]]:
    """Round ``rnd``'s cores for each arm's server and the client, out of ``everything`` (the
    cores this process could use when it started)."""
    if per_arm is None:
        return dict.fromkeys([*ARMS, "client"], everything)
    if kind == "rot":
        rotation = measure.shared_cpus(per_arm, sorted(everything), "--layouts")
        cores = set(rotation[rnd % len(rotation)])
        return {"graph": cores, "fused": cores, "client": everything - cores}
    shared = kind == "shared"
    cores = physical_cores(everything)
    taken = per_arm if shared else 2 * per_arm
    if len(cores) < taken + 1:
        raise SystemExit(f"{'shared' if shared else 'phys'}{per_arm} needs {taken + 1} physical "
                         f"cores; this machine offers {len(cores)}")
    sets = {arm: {c for core in cores[(0 if shared else i) * per_arm:][:per_arm] for c in core}
            for i, arm in enumerate(ARMS)}
    sets["client"] = {c for core in cores[taken:] for c in core}
    return sets


def thread_cpu_s(pid: int) -> dict[str, tuple[float, int]]:
    """CPU seconds (user + system) of each thread of ``pid`` and the core it last ran on, by
    ``tid:name``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[f"{tid}:{name}"] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[36]))
    return out


def steal_s() -> float:
    """CPU seconds the hypervisor has taken from this machine's CPUs so far (/proc/stat)."""
    with suppress(OSError, IndexError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def probe_ms() -> float:
    """Milliseconds of a fixed piece of pure-Python work on the client's core (~1 ms here)."""
    start = time.perf_counter()
    total = 0
    for i in range(40_000):
        total += i * i
    return (time.perf_counter() - start) * 1e3


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine")
    parser.add_argument("model")
    parser.add_argument("--layouts", default="unpinned,phys2,freeze")
    parser.add_argument("--rounds", type=int, default=16, help="rounds per placement")
    parser.add_argument("--block", type=int, default=4, help="rounds in a row per placement")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per completion")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--switch-interval-us", type=float,
                        help="the servers' sys.setswitchinterval, in µs")
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    spec = load_engine(args.engine)
    path = checkpoint_dir(spec, args.model, 4, 64, "bfloat16", 0, current_backend())
    vocab = vocab_size(path)
    layouts = args.layouts.split(",")
    shapes = {name: placement(name) for name in layouts}
    everything = set(os.sched_getaffinity(0))
    for per_arm, kind, _ in shapes.values():  # a placement this machine lacks fails before start
        cpu_sets(everything, per_arm, kind)
    values = {"model": args.model, "model_path": path, "python": sys.executable}
    warm = prompt_text(vocab, 8, 0)
    env = dict(os.environ)
    with ExitStack() as stack:
        if args.switch_interval_us:
            site = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (site / "sitecustomize.py").write_text(
                f"import sys\nsys.setswitchinterval({args.switch_interval_us / 1e6!r})\n")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        procs = {arm: stack.enter_context(background(
            fill_template(spec.server.argv, {**values, "host": server.HOST, "port": port}),
            {**env, **spec.arms[arm]}, f"{arm} server"))
            for arm, port in ((arm, server.free_port()) for arm in ARMS)}
        # Both servers start at once; the ports were taken just before.
        servers = {}
        for arm, proc in procs.items():
            port = int(proc.proc.args[proc.proc.args.index("--port") + 1])
            servers[arm] = server.ArmServer(proc, port, spec.server, f"{arm} server")
        for arm, s in servers.items():
            s.wait_healthy()
            s.greedy(warm, 2)
            s.expect(spec.expect.get(arm), f"arms.{arm}.expect")
            for w in range(2):
                s.stream(prompt_text(vocab, args.prompt_tokens, 10_000 + w), args.tokens)
            print(f"{arm} server healthy after {s.started_s:.1f} s", file=sys.stderr, flush=True)
        rows = {name: [] for name in layouts}
        cpu = {name: {arm: {} for arm in ARMS} for name in layouts}
        wall = dict.fromkeys(layouts, 0.0)
        rnd = 0
        for block in range(-(-args.rounds // args.block)):
            for name in layouts if block % 2 == 0 else layouts[::-1]:
                per_arm, kind, freeze = shapes[name]
                start = time.perf_counter()
                for _ in range(args.block):
                    sets = cpu_sets(everything, per_arm, kind, rnd)
                    for arm in ARMS:
                        pin_group(servers[arm].process.proc.pid, sets[arm])
                    os.sched_setaffinity(0, sets["client"])
                    prompt = prompt_text(vocab, args.prompt_tokens, rnd)
                    order = ARMS if rnd % 2 == 0 else ARMS[::-1]
                    row = {"layout": name, "round": rnd, "order": list(order),
                           "cpus": {k: sorted(v) for k, v in sets.items() if k in ARMS}}
                    for arm in order:
                        pid = servers[arm].process.proc.pid
                        other = servers[ARMS[1 - ARMS.index(arm)]].process.proc.pid
                        if freeze:
                            os.killpg(other, signal.SIGSTOP)
                        probe = probe_ms()
                        threads, stolen = thread_cpu_s(pid), steal_s()
                        started = time.time()  # to line requests up with a GPU clock log
                        try:
                            out = servers[arm].stream(prompt, args.tokens)
                        finally:
                            if freeze:
                                os.killpg(other, signal.SIGCONT)
                        stolen = steal_s() - stolen
                        used = {tid: (s - threads.get(tid, (0.0, 0))[0], core)
                                for tid, (s, core) in thread_cpu_s(pid).items()}
                        for tid, (s, _) in used.items():
                            cpu[name][arm][tid] = cpu[name][arm].get(tid, 0.0) + s
                        busiest = max(used.items(), key=lambda kv: kv[1][0])
                        row[arm] = {"tok_s": out.stream_tok_s, "probe_ms": probe,
                                    "start_unix": started, "end_unix": time.time(),
                                    "steal_s": stolen, "busiest_thread": busiest[0],
                                    "busiest_core": busiest[1][1],
                                    "gaps_ms": [1e3 * g for g in out.gaps]}
                    rows[name].append(row)
                    rnd += 1
                wall[name] += time.perf_counter() - start
    if args.out:
        with args.out.open("w") as f:
            for name in layouts:
                for row in rows[name]:
                    f.write(json.dumps(row) + "\n")
    print("| placement | rounds | graph tok/s CV | fused tok/s CV | arms' corr | round log-ratio SD "
          "| speedup [95 % CI] | gap ms p10/p50/p90 (graph; fused) | probe ms CV "
          "| corr(probe, ms/token) graph/fused | steal ms per request p50/p90 | corr(steal, ms/token) "
          "| busiest thread CPU share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in layouts:
        tok = {arm: np.array([r[arm]["tok_s"] for r in rows[name]]) for arm in ARMS}
        ms = {arm: 1e3 / tok[arm] for arm in ARMS}
        ratios = list(tok["fused"] / tok["graph"])
        sp = stats.speedup_ci(ratios, p_value=1.0)
        gaps = {arm: np.concatenate([r[arm]["gaps_ms"] for r in rows[name]]) for arm in ARMS}
        pct = "; ".join("/".join(f"{v:.1f}" for v in np.percentile(gaps[arm], [10, 50, 90]))
                        for arm in ARMS)
        probes = {arm: np.array([r[arm]["probe_ms"] for r in rows[name]]) for arm in ARMS}
        corr = "/".join(_corr(probes[arm], ms[arm]) for arm in ARMS)
        steal = np.array([1e3 * r[arm]["steal_s"] for r in rows[name] for arm in ARMS])
        steal_corr = _corr(steal, np.concatenate([[ms[arm][i] for arm in ARMS]
                                                   for i in range(len(rows[name]))]))
        busiest = max(((s / wall[name], f"{arm} {tid.split(':', 1)[1]}")
                       for arm in ARMS for tid, s in cpu[name][arm].items()), default=(0, "-"))
        print(f"| {name} | {len(ratios)} | {stats.cv(tok['graph']):.3f} | {stats.cv(tok['fused']):.3f} "
              f"| {_corr(ms['graph'], ms['fused'])} | {np.std(np.log(ratios), ddof=1):.3f} "
              f"| {sp.point:.3f} [{sp.lo:.3f}, {sp.hi:.3f}] | {pct} "
              f"| {stats.cv(np.concatenate(list(probes.values()))):.3f} | {corr} "
              f"| {np.percentile(steal, 50):.1f}/{np.percentile(steal, 90):.1f} | {steal_corr} "
              f"| {busiest[0]:.0%} ({busiest[1]}) |")
    print(f"\nphysical cores here: {physical_cores(everything)}")
    for name in layouts:
        shares = {arm: sorted(((round(s / wall[name], 2), tid) for tid, s in cpu[name][arm].items()
                               if s / wall[name] > 0.05), reverse=True) for arm in ARMS}
        print(f"{name}: threads above 5 % of the wall time: {shares}")
        by_core: dict[int, list[float]] = {}
        for r in rows[name]:
            for arm in ARMS:
                by_core.setdefault(r[arm]["busiest_core"], []).append(1e3 / r[arm]["tok_s"])
        print(f"{name}: ms/token by the core the busiest thread ended on (median, requests): "
              + ", ".join(f"{c}: {np.median(v):.1f} ({len(v)})" for c, v in sorted(by_core.items())))


def _corr(a, b) -> str:
    return f"{np.corrcoef(a, b)[0, 1]:.2f}" if len(a) > 2 else "-"


if __name__ == "__main__":
    main()
