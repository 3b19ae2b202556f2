"""mlxcel as its source has it: the engine files against the facts table
(config/engines/facts/mlxcel.yaml, each entry citing file@commit), and the stand-in made from
that table refusing what mlxcel refuses, in mlxcel's words, through fusedqk as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from fusedqk import external
from fusedqk.engines.command import load_engine
from fusedqk.engines.process import EngineFailure
from fusedqk.engines.server import RESERVED_FIELDS, free_port
from fusedqk.errors import UserError
from fusedqk.results import BenchSettings

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "config" / "engines"
FACTS = yaml.safe_load((ENGINES / "facts" / "mlxcel.yaml").read_text())
FAKE = ROOT / "tests" / "fakes" / "mlxcel.py"
# Which section of the table holds each binary's facts.
SECTIONS = {"mlxcel-bench-decode": "bench_decode", "mlxcel": "generate", "mlxcel-server": "server"}
MLXCEL_FILES = sorted(ENGINES.glob("mlxcel*.yaml"))


def _flags(section: str, version: str) -> set[str]:
    out = set()
    for item in FACTS[section][version]["flags"]:
        for flag in item if isinstance(item, list) else [item]:
            out.add(f"--{flag['long']}")
            if flag.get("short"):
                out.add(f"-{flag['short']}")
    return out


def _commands(spec) -> list[list[str]]:
    return [c.argv for c in (spec.bench, spec.identity, spec.server) if c is not None]


@pytest.mark.parametrize("path", MLXCEL_FILES, ids=lambda p: p.stem)
def test_every_flag_an_mlxcel_file_passes_is_in_the_table_for_each_version_it_supports(path):
    spec = load_engine(path)
    assert spec.versions, f"{path.name} says no versions"
    cited = set(FACTS["commits"])
    assert set(spec.versions) <= cited, f"{path.name}: versions not in the facts table"
    for argv in _commands(spec) + ([spec.version_command] if spec.version_command else []):
        section = SECTIONS[argv[0]]
        versions = [v for v in spec.versions if v in FACTS[section]]
        assert versions, f"{path.name}: no supported version of {argv[0]} in the table"
        for version in versions:
            args = argv[2:] if argv[1:2] == ["generate"] else argv[1:]
            if args == ["--version"]:
                assert FACTS[section][version].get("version_flag"), (argv, version)
                continue
            used = {a for a in args if a.startswith("-")}
            missing = used - _flags(section, version)
            assert not missing, f"{path.name}: {sorted(missing)} not in {argv[0]}@{version}"
            required = {f"--{f['long']}" for f in FACTS[section][version]["flags"]
                        if isinstance(f, dict) and f.get("required")}
            short = {f"--{f['long']}": f"-{f['short']}" for f in FACTS[section][version]["flags"]
                     if isinstance(f, dict) and f.get("short")}
            for flag in required:
                assert flag in used or short.get(flag) in used, f"{path.name}: {flag} required"


def test_the_server_file_sends_only_fields_mlxcel_reads_and_every_field_it_requires():
    spec = load_engine(ENGINES / "mlxcel-server.yaml")
    facts = FACTS["server"][spec.versions[0]]
    command = spec.server
    sent = {*command.request, *command.identity_request, *RESERVED_FIELDS}
    assert set(facts["request_required"]) <= sent
    assert sent <= set(facts["request_fields"]), sent - set(facts["request_fields"])
    assert command.health in facts["routes"]["health"]
    assert command.completions in facts["routes"]["completions"]
    assert 0 <= command.identity_request["logprobs"] <= 5
    assert command.identity_tokens.split(".")[1] in facts["logprobs_fields"]
    assert not command.prompt_ids  # CompletionRequest.prompt is a String


def test_every_commit_the_table_cites_is_a_full_hash_of_its_short_name():
    for short, full in FACTS["commits"].items():
        assert len(full) == 40 and full.startswith(short)


# The stand-in, run as mlxcel's binaries are: its refusals are the table's, in clap's words.

def _run(binary: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE), binary, *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})


@pytest.mark.parametrize("args, needle", [
    (["-m", "x"], "error: the following required arguments were not provided:\n  --prompt <PROMPT>"),
    (["-m", "x", "-p", "t1", "--seed", "3"], "error: unexpected argument '--seed' found"),
    (["-m", "x", "-p", "t1", "--ignore-eos"], "error: unexpected argument '--ignore-eos' found"),
    (["-m", "x", "-p", "t1", "-n"], "error: a value is required for '--max-tokens <MAX_TOKENS>'"),
    (["-m", "x", "-p", "t1", "-n", "ten"], "error: invalid value 'ten' for '--max-tokens"),
])
def test_the_stand_in_refuses_what_clap_refuses_with_exit_status_2(args, needle):
    done = _run("mlxcel-bench-decode", *args, FAKE_MLXCEL_BENCH="56c3d08")
    assert done.returncode == 2 and needle in done.stderr and done.stdout == ""
    assert "For more information, try '--help'." in done.stderr


def test_the_newer_bench_takes_ignore_eos_and_prints_its_memory_lines(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    done = _run("mlxcel-bench-decode", "-m", str(tmp_path), "-p", "t1 t2", "-n", "4",
                "--ignore-eos", FAKE_MLXCEL_BENCH="10bee85", FAKE_MLXCEL_EOS_AFTER="1",
                MLXCEL_FUSED_QK_NORM="1")
    assert done.returncode == 0, done.stderr
    assert "  Generated tokens: 4" in done.stdout  # --ignore-eos decodes the whole budget
    assert done.stdout.startswith("[Memory] cache limit: ")
    assert "--ignore-eos" in _run("mlxcel-bench-decode", "--help",
                                  FAKE_MLXCEL_BENCH="10bee85").stdout


def test_generate_without_a_prompt_opens_the_chat_not_an_error():
    done = _run("mlxcel", "generate", "-m", "x")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


@pytest.fixture
def stand_in_server(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), "mlxcel-server", "-m", str(tmp_path),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            first = requests.get(base + "/health", timeout=2)
            break
        except requests.RequestException:
            time.sleep(0.05)
    yield base, first
    proc.kill()
    proc.wait()


def test_the_stand_in_server_answers_as_the_table_says(stand_in_server):
    base, first = stand_in_server
    facts = FACTS["server"]["01c2035"]
    assert first.status_code == 503 and first.json() == facts["health_loading"]["body"]
    time.sleep(0.6)
    assert requests.get(base + "/health", timeout=5).json()["status"] == "ok"
    assert requests.get(base + "/", timeout=5).status_code == 404  # not a health route here
    body = {"model": "m", "prompt": "t1 t2", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = [line for line in requests.post(base + "/v1/completions", json=body, timeout=10)
             .text.splitlines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert all(set(facts["chunk_fields"]) <= set(e) for e in events)
    assert all(set(facts["choice_fields"]) == set(e["choices"][0]) for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert set(events[-1]["usage"]) == set(facts["usage_fields"]) and events[-1]["choices"] == []
    plain = requests.post(base + "/v1/completions", json={**body, "stream": False,
                                                          "logprobs": 0}, timeout=10).json()
    lp = plain["choices"][0]["logprobs"]
    text = plain["choices"][0]["text"]
    assert lp["text_offset"] == [len(text.split(" t")[0].encode())] + [
        sum(len(t.encode()) for t in lp["tokens"][:i]) for i in range(1, len(lp["tokens"]))]


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "t1"}, 422, "missing field `model`"),
    ({"model": "m"}, 422, "missing field `prompt`"),
    ({"model": "m", "prompt": "   \n"}, 400, "at least one non-empty message content"),
    ({"model": "m", "prompt": "t1", "logprobs": 6}, 400, "logprobs must be between 0 and 5"),
])
def test_the_stand_in_server_refuses_what_mlxcel_refuses(stand_in_server, body, status, needle):
    base, _ = stand_in_server
    time.sleep(0.6)
    answer = requests.post(base + "/v1/completions", json=body, timeout=10)
    assert answer.status_code == status and needle in answer.text


# Through fusedqk, as a user meets mlxcel: each real refusal is one line naming the engine, the
# arm and mlxcel's own words.

@pytest.fixture
def checkpoint(tmp_path) -> Path:
    where = tmp_path / "ckpt"
    where.mkdir()
    (where / "config.json").write_text(json.dumps({"vocab_size": 997}))
    return where


def _edited(tmp_path: Path, name: str, edit) -> Path:
    doc = yaml.safe_load((ENGINES / name).read_text())
    edit(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["server"].pop("request"), "422: Failed to deserialize the JSON body into the "
                                           "target type: missing field `model`"),
    (lambda d: d["server"]["identity_request"].update(logprobs=6),
     "400: {\"error\": {\"message\": \"logprobs must be between 0 and 5\""),
])
def test_a_server_file_mlxcel_would_refuse_fails_in_one_line_with_its_words(
        edit, needle, fake_mlxcel, checkpoint, tmp_path):
    spec = load_engine(_edited(tmp_path, "mlxcel-server.yaml", edit))
    with pytest.raises(EngineFailure) as failed:
        external.identity(spec, "qwen3-tiny", checkpoint, "cpu", 997, 8, 4, 1, 0)
    line = str(failed.value)
    assert "\n" not in line and "mlxcel-server" in line and " arm" in line and needle in line


def test_a_bench_flag_mlxcel_lacks_fails_in_one_line_with_claps_words(fake_mlxcel, checkpoint,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_BENCH", "56c3d08")
    spec = load_engine(_edited(tmp_path, "mlxcel.yaml",
                               lambda d: d["bench"]["command"].append("--ignore-eos")))
    with pytest.raises(EngineFailure) as failed:
        external.bench(spec, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 8, rounds=2))
    line = str(failed.value)
    assert "\n" not in line and ("graph arm" in line or "fused arm" in line)
    assert "unexpected argument '--ignore-eos' found" in line


def test_the_ignore_eos_file_refuses_an_older_binary_naming_the_other_file(fake_mlxcel,
                                                                          monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_BENCH", "56c3d08")
    with pytest.raises(UserError) as refused:
        load_engine(ENGINES / "mlxcel-ignore-eos.yaml").check_requirements("cpu")
    assert "config/engines/mlxcel.yaml" in str(refused.value) and "10bee85" in str(refused.value)


def test_with_ignore_eos_no_round_is_refused_for_an_early_end(fake_mlxcel, checkpoint,
                                                              monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_BENCH", "10bee85")
    monkeypatch.setenv("FAKE_MLXCEL_EOS_AFTER", "3")
    run = external.bench(load_engine(ENGINES / "mlxcel-ignore-eos.yaml"), "qwen3-tiny",
                        checkpoint, "cpu", 997, BenchSettings(8, 8, rounds=2))
    assert run.meta["refused_rounds"] == [] and len(run.trials) == 4
