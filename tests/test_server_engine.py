"""Server engines (``kind: server``): one long-lived server per arm, streamed completions in
ABBA order, greedy identity with a fresh-server control, and servers that never outlive the
measurement. Most tests run against the stand-in mlxcel-server (tests/fakes/mlxcel.py); the
pipeline test and one kill test run mlx-lm's own server on a tiny exported model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fusedqk import external
from fusedqk.engines import server
from fusedqk.engines.command import load_engine
from fusedqk.engines.process import EngineFailure, end_group, group_pids, pin_group
from fusedqk.engines.server import field_path
from fusedqk.errors import UserError
from fusedqk.results import BenchSettings

ROOT = Path(__file__).resolve().parents[1]
MLXCEL_SERVER = ROOT / "config" / "engines" / "mlxcel-server.yaml"
MLX_LM_SERVER = ROOT / "config" / "engines" / "mlx-lm-server.yaml"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    where = tmp_path / "server-ckpt"
    where.mkdir()
    (where / "config.json").write_text(json.dumps({"vocab_size": 997, "model_type": "qwen3"}))
    return where


@pytest.fixture
def mlxcel_server(fake_mlxcel):
    return load_engine(MLXCEL_SERVER)


def edited(tmp_path: Path, source: Path, edit) -> Path:
    doc = yaml.safe_load(source.read_text())
    edit(doc)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def servers_of(marker: str, besides: int | None = None) -> list[int]:
    """Live processes whose command line holds ``marker`` (a test's own checkpoint path), but
    this one and ``besides`` (the orchestrator)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), besides):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_the_mlxcel_server_file_names_the_source_it_was_derived_from():
    spec = load_engine(MLXCEL_SERVER)
    assert spec.kind == "server" and spec.variable == "MLXCEL_FUSED_QK_NORM"
    assert "lablup/mlxcel@01c2035" in spec.derived_from
    assert "mlxcel-server" in (ROOT / "docs" / "engines.md").read_text()


def test_bench_alternates_the_arms_abba_and_reads_the_stream(mlxcel_server, checkpoint):
    run = external.bench(mlxcel_server, "qwen3-tiny", checkpoint, "cpu", 997,
                        BenchSettings(8, 16, rounds=4))
    (sp,) = run.speedups
    assert 1.15 < sp["point"] < 1.35  # the fake's 150 vs 120 tok/s
    assert run.meta["instrument"].startswith("server:")
    first = [next(t["path"] for t in run.trials if t["round"] == r and t["slot"] == 0)
             for r in range(4)]
    assert first == ["graph", "fused", "graph", "fused"]  # A B | B A | A B | B A
    assert {t["generated_tokens"] for t in run.trials} == {16}
    assert {t["timing"] for t in run.trials} == {"stream"}
    assert set(run.meta["server_start_s"]) == {"graph", "fused"}
    assert run.meta["arm_confirmation"] == {}  # the mlxcel file declares no expect line
    assert servers_of(str(checkpoint)) == []


def test_bench_turns_alternate_abba_and_every_gap_is_kept(mlxcel_server, checkpoint):
    run = external.bench(mlxcel_server, "qwen3-tiny", checkpoint, "cpu", 997,
                        BenchSettings(8, 16, rounds=2, chunk_tokens=4))
    (sp,) = run.speedups
    # The fake's 150 vs 120 tok/s; each 4-token turn adds a request's host work to both arms,
    # which pulls the ratio toward 1 on a busy machine (1.148 seen on two loaded cores).
    assert 1.05 < sp["point"] < 1.35
    assert {(t["turns"], t["chunk_tokens"], t["timed_tokens"], t["generated_tokens"])
            for t in run.trials} == {(4, 4, 16, 20)}  # 4 completions of 5 tokens, 4 gaps timed each
    tokens = pd.DataFrame(run.tokens)
    assert tokens.groupby(["path", "round"]).size().to_dict() == {
        (arm, r): 16 for arm in ("graph", "fused") for r in (0, 1)}
    assert (tokens.latency_s > 0).all() and "turn_decode_s" not in run.trials[0]
    assert servers_of(str(checkpoint)) == []


@pytest.mark.slow
def test_identity_equal_with_a_fresh_server_control(mlxcel_server, checkpoint):
    result = external.identity(mlxcel_server, "qwen3-tiny", checkpoint, "cpu", 997, 8, 12, 2, 0)
    assert result["verdict"] == "EQUAL" and result["compared"] == "tokens"
    assert "fresh server" in result["controls"]["scope"]
    assert result["outputs"]["graph"][0][0].startswith(" t")  # mlxcel's token texts
    assert servers_of(str(checkpoint)) == []


@pytest.mark.slow
def test_identity_sees_a_fused_arm_that_differs(mlxcel_server, checkpoint, monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_DIFFER", "1")
    result = external.identity(mlxcel_server, "qwen3-tiny", checkpoint, "cpu", 997, 8, 12, 1, 0)
    assert result["verdict"] == "DIFFERS"
    assert result["free_running"]["greedy_first_divergence"] == [3]


def test_a_server_that_fails_to_start_is_one_line(mlxcel_server, tmp_path):
    """A checkpoint the server cannot load: it exits with anyhow's error chain, and the job
    ends with one line naming the engine, the arm and the server's last words."""
    empty = tmp_path / "no-config"
    empty.mkdir()
    with pytest.raises(EngineFailure, match=r"server, graph arm: mlxcel-server exited with status 1:"
                                            r" Error: failed to load model$"):
        external.bench(mlxcel_server, "qwen3-tiny", empty, "cpu", 997, BenchSettings(8, 16, rounds=2))


@pytest.mark.slow
def test_a_server_that_never_becomes_healthy_times_out(fake_mlxcel, checkpoint, tmp_path):
    def never(doc):
        doc["server"].update(health="/never", startup_timeout_s=2)
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER, never))
    start = time.monotonic()
    with pytest.raises(EngineFailure, match=r"/never did not answer 200 within 2 s"):
        external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=2))
    assert time.monotonic() - start < 20
    assert servers_of(str(checkpoint)) == []


@pytest.mark.slow
def test_a_wrong_token_path_is_one_line(fake_mlxcel, checkpoint, tmp_path):
    def wrong(doc):
        doc["server"]["identity_tokens"] = "logprobs.content.id"  # mlx-lm's, not mlxcel's
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER, wrong))
    with pytest.raises(EngineFailure, match=r"choices\[0\] has no logprobs.content.id"):
        external.identity(spec, "qwen3-tiny", checkpoint, "cpu", 997, 8, 12, 1, 0)


BAD_FILES = [
    ("server kind with bench", lambda d: d.update(bench={"command": ["x"]}),
     "bench: not a key of kind server"),
    ("no server", lambda d: d.pop("server"), "server: required for kind server"),
    ("no port", lambda d: d["server"].update(command=["mlxcel-server", "-m", "{model_path}"]),
     "server.command: needs {port}"),
    ("a bench placeholder", lambda d: d["server"]["command"].append("{generation_tokens}"),
     "placeholder {generation_tokens} is not one of this command's"),
    ("a reserved field", lambda d: d["server"].update(request={"stream": False}),
     "server.request: stream are set by fusedqk"),
    ("an unknown key", lambda d: d["server"].update(url="http://x"), "unknown key 'url'"),
    ("a route without /", lambda d: d["server"].update(health="health"), "server.health"),
    ("a bad field path", lambda d: d["server"].update(identity_tokens="a..b"), "server.identity_tokens"),
    ("an unknown kind", lambda d: d.update(kind="rpc"), "kind"),
    ("two placements", lambda d: d["server"].update(cpus_per_arm=1, shared_cpus=1),
     "server.shared_cpus: and server.cpus_per_arm are two placements"),
]


@pytest.mark.parametrize("what, edit, needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_broken_server_file_is_one_line_naming_the_key(what, edit, needle, tmp_path):
    with pytest.raises(UserError, match=None) as e:
        load_engine(edited(tmp_path, MLXCEL_SERVER, edit))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_command_file_carries_a_server_for_identity_only_instead_of_identity(tmp_path):
    path = edited(tmp_path, ROOT / "config" / "engines" / "mlxcel.yaml",
                  lambda d: d.update(server={"command": ["x", "{port}"]}))
    with pytest.raises(UserError, match="identity: not a key of kind command beside server"):
        load_engine(path)
    path = edited(tmp_path, ROOT / "config" / "engines" / "mlxcel.yaml",
                  lambda d: (d.pop("identity"), d.update(server={"command": ["x", "{port}"]})))
    spec = load_engine(path)
    assert spec.kind == "command" and spec.identity is None and spec.identity_by_server


@pytest.mark.parametrize("key", ["startup_timeout_s", "request_timeout_s"])
def test_a_timeout_that_is_not_a_number_is_refused(key, tmp_path):
    with pytest.raises(UserError, match=f"server.{key}"):
        load_engine(edited(tmp_path, MLXCEL_SERVER, lambda d: d["server"].update({key: float("nan")})))


TRICKLE = r"""
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
        if sys.argv[2] == "health":
            for _ in range(60):
                self.wfile.write(b"o"); self.wfile.flush(); time.sleep(1)
        self.wfile.write(b"ok")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for _ in range(120):
            self.wfile.write(b": ping\n\n"); self.wfile.flush(); time.sleep(0.5)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stalls", ["health", "stream"])
def test_a_server_that_trickles_is_ended_within_its_timeout(stalls, checkpoint, tmp_path):
    """A health route that sends a byte a second, or a stream of keep-alive lines that never
    ends: each is one line within its timeout, and no server is left."""
    script = tmp_path / "trickle.py"
    script.write_text(TRICKLE)

    def trickle(doc):
        doc["server"].update(command=["{python}", str(script), "{port}", stalls],
                             startup_timeout_s=3, request_timeout_s=3)
        doc["arms"] = {"graph": {"env": {"MLXCEL_FUSED_QK_NORM": "0"}},
                       "fused": {"env": {"MLXCEL_FUSED_QK_NORM": "1"}}}
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER, trickle))
    start = time.monotonic()
    with pytest.raises(EngineFailure, match=r"did not answer 200 within 3 s|did not finish within 3 s"):
        external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=2))
    assert time.monotonic() - start < 30
    assert servers_of(str(script)) == []


HOSTILE = r"""
import http.server, json, sys, time
mode = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if body.get("stream") else "application/json")
        self.end_headers()
        def event(text):
            self.wfile.write(b"data: " + text.encode() + b"\n\n"); self.wfile.flush()
        good = json.dumps({"choices": [{"text": " t1", "index": 0}]})
        if mode == "silent-after-headers":
            time.sleep(60)
        elif not body.get("stream"):
            self.wfile.write({"choices-number": b'{"choices": 5}',
                              "choices-object": b'{"choices": {"text": "t1"}}',
                              "deep": b"[" * 200000 + b"]" * 200000}.get(mode, good.encode()))
        elif mode == "choices-number":
            event('{"choices": 5}'); event("[DONE]")
        elif mode == "choices-object":
            event('{"choices": {"text": "t1"}}'); event("[DONE]")
        elif mode == "deep":
            event("[" * 200000 + "]" * 200000); event("[DONE]")
        elif mode in ("timing-inf", "timing-huge", "timing-bool"):
            value = {"timing-inf": "Infinity", "timing-huge": "1e309", "timing-bool": "true"}[mode]
            for _ in range(4):
                event(good)
            event('{"choices": [{"text": "", "finish_reason": "length"}], '
                  '"timings": {"predicted_per_second": ' + value + '}}')
            event("[DONE]")
        elif mode == "close-mid":
            event(good); self.wfile.flush()
            self.connection.shutdown(2); self.connection.close()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode, phase", [
    ("choices-number", "bench"), ("choices-object", "bench"), ("deep", "bench"),
    ("timing-inf", "bench"), ("timing-huge", "bench"), ("timing-bool", "bench"),
    ("close-mid", "bench"), ("silent-after-headers", "bench"),
    ("choices-number", "identity"), ("choices-object", "identity"), ("deep", "identity"),
    ("silent-after-headers", "identity"),
])
def test_a_hostile_server_answer_is_one_line_within_the_timeout(mode, phase, checkpoint, tmp_path):
    """Answers no real server gives (choices as a number or an object, JSON nested 200,000
    deep, a decode rate of Infinity, 1e309 or true, a connection closed mid-stream, silence
    after the headers): each ends the job with one line naming the engine and the arm, within
    the request timeout, and no server is left."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)

    def hostile(doc):
        doc["server"].update(command=["{python}", str(script), "{port}", mode],
                             startup_timeout_s=20, request_timeout_s=3,
                             timing_field="timings.predicted_per_second")
        doc["arms"] = {"graph": {"env": {"MLXCEL_FUSED_QK_NORM": "0"}},
                       "fused": {"env": {"MLXCEL_FUSED_QK_NORM": "1"}}}
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER, hostile))
    start = time.monotonic()
    with pytest.raises(EngineFailure) as failed:
        if phase == "bench":
            external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 4, rounds=2))
        else:
            external.identity(spec, "qwen3-tiny", checkpoint, "cpu", 997, 8, 4, 1, 0)
    line = str(failed.value)
    assert "\n" not in line and "mlxcel-server" in line and " arm" in line, line
    assert time.monotonic() - start < 40
    assert servers_of(str(script)) == []


def test_field_paths_map_over_lists():
    choice = {"logprobs": {"content": [{"id": 5}, {"id": 7}]}}
    assert field_path(choice, "logprobs.content.id") == [5, 7]
    with pytest.raises(KeyError):
        field_path(choice, "logprobs.tokens")


def _orchestrator(engine: Path, checkpoint: Path, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "lock")}
    return subprocess.Popen([sys.executable, "-m", "fusedqk", "bench", "-m", str(checkpoint),
                             "--engine", str(engine), "--backend", "cpu", "-p", "8", "-g", "64",
                             "--rounds", "500"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_once_both_serve(orchestrator: subprocess.Popen, marker: str, sig: int,
                          wait_s: float) -> list[int]:
    stop = time.monotonic() + wait_s
    servers: list[int] = []
    while time.monotonic() < stop and orchestrator.poll() is None:
        servers = servers_of(marker, besides=orchestrator.pid)
        if len(servers) >= 2:
            break
        time.sleep(0.2)
    assert orchestrator.poll() is None, "the bench ended before both servers ran"
    time.sleep(1.0)  # into the measured rounds
    orchestrator.send_signal(sig)
    orchestrator.wait()
    return servers


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_orchestrator_leaves_no_server(sig, fake_mlxcel, checkpoint, tmp_path):
    orchestrator = _orchestrator(MLXCEL_SERVER, checkpoint, tmp_path)
    assert _kill_once_both_serve(orchestrator, str(checkpoint), sig, 60)
    stop = time.monotonic() + 15
    while servers_of(str(checkpoint)) and time.monotonic() < stop:
        time.sleep(0.2)
    assert servers_of(str(checkpoint)) == [], "a server outlived its orchestrator"


@pytest.mark.slow
def test_killing_the_orchestrator_leaves_no_mlx_lm_server(tmp_path):
    from fusedqk.export import export
    from fusedqk.models import Quantization

    checkpoint = tmp_path / "mlx-lm-ckpt"
    export("qwen3-tiny", checkpoint, Quantization(4, 64, "bfloat16"), 0)
    orchestrator = _orchestrator(MLX_LM_SERVER, checkpoint, tmp_path)
    assert _kill_once_both_serve(orchestrator, str(checkpoint), signal.SIGKILL, 180)
    stop = time.monotonic() + 15
    while servers_of(str(checkpoint)) and time.monotonic() < stop:
        time.sleep(0.2)
    assert servers_of(str(checkpoint)) == [], "an mlx-lm server outlived its orchestrator"


def test_pinned_arms_get_disjoint_cores_and_the_client_the_rest():
    cpus = server.arm_cpus(2, [0, 1, 2, 3, 4, 5, 6], "e.yaml")
    assert cpus == {"graph": {0, 1}, "fused": {2, 3}, "client": {4, 5, 6}}
    assert server.arm_cpus(None, [0, 1], "e.yaml") == {}
    with pytest.raises(UserError, match=r"e\.yaml: server\.cpus_per_arm 2 needs 5 cores .* "
                                         r"may use 4; accepted here: at most 1"):
        server.arm_cpus(2, [0, 1, 2, 3], "e.yaml")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 3, reason="pinning needs 3 cores: two servers "
                    "and the client")
def test_pinned_servers_run_on_their_own_cores(fake_mlxcel, checkpoint, tmp_path):
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER,
                              lambda d: d["server"].update(cpus_per_arm=1)))
    before = os.sched_getaffinity(0)
    run = external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 8, rounds=2))
    cores = sorted(before)
    assert run.meta["cpus"] == {"graph": [cores[0]], "fused": [cores[1]], "client": cores[2:]}
    assert os.sched_getaffinity(0) == before  # the client's own cores are given back


def test_shared_cores_cycle_through_every_core_and_leave_the_client_one():
    assert server.shared_cpus(2, [0, 1, 2, 3, 4], "e.yaml") == [{0, 1}, {2, 3}, {4, 0}]
    assert server.shared_cpus(1, [3, 5], "e.yaml") == [{3}, {5}]
    assert server.shared_cpus(None, [0, 1], "e.yaml") == []
    with pytest.raises(UserError, match=r"e\.yaml: server\.shared_cpus 2 needs 3 cores .* "
                                         r"may use 2; accepted here: at most 1"):
        server.shared_cpus(2, [0, 1], "e.yaml")


def test_pin_group_moves_every_thread_of_every_process_in_the_group():
    # A process with a second thread, and a child of it, in a group of their own.
    code = ("import os, subprocess, sys, threading, time; threading.Thread(target=time.sleep, "
            "args=(30,), daemon=True).start(); subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)']); print('up', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"up"
        core = min(os.sched_getaffinity(0))
        pin_group(proc.pid, {core})
        pids = group_pids(proc.pid)
        assert len(pids) == 2
        tids = [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) >= 3
        assert all(os.sched_getaffinity(t) == {core} for t in tids)
    finally:
        end_group(proc.pid)
        proc.wait()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="shared cores need 2: the servers' "
                    "and the client's")
def test_shared_cores_move_both_servers_together_round_by_round(fake_mlxcel, checkpoint, tmp_path,
                                                                 monkeypatch):
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER,
                              lambda d: d["server"].update(shared_cpus=1)))
    during: list[dict] = []  # where every thread was as each round began
    real_round = external._server_round

    def looked_at(servers, *args):
        pids = [p for s in servers.values() for p in group_pids(s.process.proc.pid)]
        during.append({"servers": {frozenset(os.sched_getaffinity(int(t)))
                                   for pid in pids for t in os.listdir(f"/proc/{pid}/task")},
                       "client": os.sched_getaffinity(0)})
        return real_round(servers, *args)

    monkeypatch.setattr(external, "_server_round", looked_at)
    before = os.sched_getaffinity(0)
    run = external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 8, rounds=3))
    cores = sorted(before)
    assert run.meta["round_cpus"] == [[cores[r % len(cores)]] for r in range(3)]
    for rnd, seen in enumerate(during):
        core = {cores[rnd % len(cores)]}
        assert seen["servers"] == {frozenset(core)}  # every thread of both servers, together
        assert seen["client"] == before - core
    assert os.sched_getaffinity(0) == before


def test_shared_cores_this_machine_lacks_are_refused_before_any_server_starts(
        fake_mlxcel, checkpoint, tmp_path, monkeypatch):
    spec = load_engine(edited(tmp_path, MLXCEL_SERVER,
                              lambda d: d["server"].update(shared_cpus=1)))

    def no_server(*args, **kwargs):
        raise AssertionError("a server started")

    monkeypatch.setattr(external.server, "running", no_server)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        with pytest.raises(UserError, match=r"server\.shared_cpus 1 needs 2 cores"):
            external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 8, rounds=2))
    finally:
        os.sched_setaffinity(0, before)


def test_a_watchdog_killed_from_outside_costs_nothing_the_block_made():
    """`kill -9` of the watchdog while an engine runs: the block's work stands, the engine's
    group is still ended by its own block, and no BrokenPipeError escapes."""
    from fusedqk.engines import process

    engine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    made = []
    with process._watched(engine.pid):
        children = [int(p) for p in os.listdir("/proc") if p.isdigit()
                    and _ppid(int(p)) == os.getpid() and int(p) != engine.pid]
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        made.append("measurement")
    assert made == ["measurement"]
    engine.kill()
    engine.wait()


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


ESCAPER = r"""
import os, sys, time
# A child that leaves the engine's process group three ways, then the engine itself waits.
for how in ("setsid", "setpgid", "double-fork"):
    if os.fork() == 0:
        if how == "double-fork":
            if os.fork():
                os._exit(0)
            os.setsid()
        elif how == "setsid":
            os.setsid()
        else:
            os.setpgid(0, 0)
        time.sleep(120)
        os._exit(0)
print("Decode: 100.0 ms (100.0 tok/s)", flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.parametrize("seconds", ["0", "30"])
def test_engine_children_that_leave_the_group_are_ended_too(tmp_path, seconds):
    """setsid, setpgid and a double fork: none outlives the run, whether the engine ends by
    itself or its timeout ends it."""
    from fusedqk.engines import process

    script = tmp_path / "escaper.py"
    script.write_text(ESCAPER)
    try:
        process.run_bounded([sys.executable, str(script), seconds], dict(os.environ), 3, "escaper")
    except EngineFailure as e:
        assert "did not finish in 3 s" in str(e)
    time.sleep(0.3)
    alive = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if str(script) in Path(f"/proc/{pid}/cmdline").read_bytes().decode() and state != "Z":
                alive.append(pid)
        except OSError:
            continue
    for pid in alive:  # leave nothing behind, whatever the verdict
        os.kill(int(pid), signal.SIGKILL)
    assert alive == []


@pytest.mark.slow
def test_a_request_without_model_is_refused_as_mlxcel_refuses_it(fake_mlxcel, checkpoint, tmp_path):
    """mlxcel's CompletionRequest requires `model`: the shipped file sends one, and a file that
    does not fails in one line with mlxcel's own words, naming the engine and the arm."""
    spec = load_engine(MLXCEL_SERVER)
    assert spec.server.request.get("model")
    run = external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=2))
    assert run.speedups
    bare = load_engine(edited(tmp_path, MLXCEL_SERVER, lambda d: d["server"].pop("request")))
    with pytest.raises(EngineFailure, match=r"mlxcel-server, server, graph arm: POST /v1/completions "
                                            r"answered 422: .*missing field `model`"):
        external.bench(bare, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=2))
    assert servers_of(str(checkpoint)) == []
