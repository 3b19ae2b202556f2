"""llama.cpp as an engine, for real: the pinned source built on this machine (CPU), the GGUF
export of the synthetic weights loaded by the built llama-server, the pipeline end to end through
both llama.cpp engine files, and its bad input as one line.

The build takes minutes on two cores, once per machine: tests/run.sh starts it in the background
before pytest, and the fixture here waits for it (the build holds a lock). Where it cannot be
built (no cmake or ninja, no network for the source), these tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from fusedqk import archive, llama_cpp
from fusedqk.engines.command import load_engine
from fusedqk.engines.server import free_port
from fusedqk.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
pytestmark = pytest.mark.slow


# Where tests/run.sh builds llama.cpp in the background: one build per checkout, not per test
# session (each session has a cache folder of its own, conftest.py).
BUILD_CACHE = ROOT / ".venv" / "fusedqk-cache"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """The CPU build (waiting for tests/run.sh's, or building it), named to every process the
    tests start through FUSEDQK_LLAMA_CPP."""
    saved = os.environ.get("FUSEDQK_CACHE_DIR")
    os.environ["FUSEDQK_CACHE_DIR"] = str(BUILD_CACHE)
    try:
        folder = llama_cpp.build("cpu", jobs=2).folder
    except UserError as e:
        pytest.skip(f"llama.cpp could not be built here: {e}")
    finally:
        if saved is None:
            os.environ.pop("FUSEDQK_CACHE_DIR")
        else:
            os.environ["FUSEDQK_CACHE_DIR"] = saved
    os.environ[llama_cpp.ENV_BIN] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "qwen3-tiny.gguf"
    done = subprocess.run([sys.executable, "-m", "fusedqk", "export", "qwen3-tiny", "--out",
                           str(out), "--format", "gguf", "--dtype", "bfloat16"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def serve(binary: Path, model: Path, port: int, **env) -> subprocess.Popen:
    return subprocess.Popen([str(binary / "llama-server"), "-m", str(model), "--host",
                             "127.0.0.1", "--port", str(port), "-c", "1024", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, start_new_session=True)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError("llama-server never became healthy")


def test_the_built_server_loads_the_gguf_export_and_decodes_varied_greedy_tokens(llama_bin,
                                                                                tiny_gguf):
    port = free_port()
    proc = serve(llama_bin, tiny_gguf, port)
    try:
        wait_healthy(port, proc)
        body = {"prompt": [300, 301, 1200, 77, 2900, 5, 4000, 123], "max_tokens": 32,
                "temperature": 0, "return_tokens": True, "ignore_eos": True}
        doc = requests.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=120).json()
        ids = doc["tokens"]
        assert len(ids) == 32 and all(0 <= i < 4096 for i in ids)
        # The decision's min_distinct rule (config/config.yaml): greedy output that repeats one
        # or two tokens proves nothing about identity.
        assert len(set(ids)) >= 4, ids
        assert doc["timings"]["predicted_per_second"] > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_engine_files_name_only_flags_the_pinned_llama_cpp_has(llama_bin):
    """Every flag an engine file passes appears in the built binaries' own --help."""
    helps = {name: subprocess.run([str(llama_bin / name), "--help"], capture_output=True,
                                  text=True, timeout=60) for name in llama_cpp.BINARIES}
    for file in ("llama-bench", "llama-server"):
        spec = load_engine(ROOT / "config" / "engines" / f"{file}.yaml")
        for argv in (spec.bench.argv if spec.bench else [], spec.server.argv):
            if not argv:
                continue
            text = helps[Path(argv[0]).name]
            out = text.stdout + text.stderr
            for flag in (a for a in argv[1:] if a.startswith("-")):
                assert flag in out, f"{file}: {flag} is not in {Path(argv[0]).name} --help"


@pytest.mark.parametrize("engine", ["llama-server", "llama-bench"])
def test_the_pipeline_decides_through_llama_cpp_end_to_end(engine, llama_bin, tmp_path):
    overlay = {"checkpoints_dir": str(tmp_path / "ckpt"), "backend_settings": {"cpu": {
        "engine": f"config/engines/{engine}.yaml", "models": ["qwen3-tiny"],
        "bench": {"prompt_tokens": 8, "generation_tokens": 16, "rounds": 2, "warmup": 1,
                  "chunk_tokens": 16},
        "identity": {"prompt_tokens": 8, "tokens": 16, "prompts": 1, "cudnn_sdpa": True}}}}
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump(overlay))
    proc = subprocess.run([*SNAKEMAKE, "--cores", "1", "--configfile", str(tmp_path / "engine.yaml"),
                           "--config", f"results_dir={tmp_path}/results", "backends=[cpu]",
                           "run_name=llama-run", "device_label=test-device"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "results" / "cpu-test-device" / "llama-run"
    assert archive.verify(run) == []
    report = (run / "report.md").read_text()
    assert f"Engine: **{engine}**" in report
    bench = archive.read_json(run / "qwen3-tiny" / "bench" / "bench.json", "bench")
    ident = archive.read_json(run / "qwen3-tiny" / "identity-fused.json", "identity")
    # On CPU the switch changes nothing: the same tokens, and no confident ON.
    assert ident["verdict"] == "EQUAL" and ident["compared"] == "tokens", ident["controls"]
    decided = json.loads((run / "decisions.json").read_text())["backends"]["cpu"]
    assert decided["recommendation"] == "inconclusive" and not decided["fused_qk_norm"]
    assert "GGML_CUDA_DISABLE_FUSION acts on cuda only" in decided["reason"]
    build = ident["engine"]["llama_cpp_build"]
    assert build["commit"] == llama_cpp.COMMIT and "-DGGML_NATIVE=OFF" in build["cmake_flags"]
    # The run's environment names the engine, its build flags and what its binary checks saw.
    recorded = json.loads((run / "environment.json").read_text())["engine"]
    assert recorded["name"] == engine and recorded["llama_cpp_build"]["cmake_flags"] == \
        llama_cpp.cmake_flags("cpu", "90")
    assert any("(build 11312, commit 0c1e570)" in m for m in recorded["requires_matched"])
    assert bench["speedups"][0]["path"] == "fused"
    assert not _llama_processes(str(tmp_path)), "a llama.cpp process outlived the pipeline"


def _llama_processes(naming: str) -> list[str]:
    """The llama.cpp processes whose command line names ``naming`` (this test's files: other
    tests run servers of their own beside it), zombies included."""
    out = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if ("llama-server" in line or "llama-bench" in line) and naming in line]


def test_a_missing_llama_cpp_folder_is_one_line_naming_the_variable(tmp_path):
    env = {**os.environ, "FUSEDQK_LLAMA_CPP": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "--engine",
                           "config/engines/llama-bench.yaml", "-m", "qwen3-tiny", "-r", "1"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.strip().splitlines() if "note:" not in line]
    assert len(errors) == 1 and "FUSEDQK_LLAMA_CPP" in errors[0] and "llama-server" in errors[0]


def test_the_built_binaries_say_the_pinned_build_and_no_cuda_device(llama_bin):
    """The engine files' checks against the real CPU build: its build number passes the version
    check, and on cuda its --list-devices (no CUDA device) is refused in one line."""
    for file in ("llama-bench", "llama-server"):
        spec = load_engine(ROOT / "config" / "engines" / f"{file}.yaml")
        assert all("build 11312" in m for m in spec.check_requirements("cpu"))
        with pytest.raises(UserError) as refused:
            spec.check_requirements("cuda")
        line = str(refused.value)
        assert "\n" not in line and "--list-devices" in line and "(none)" in line
        assert "GGML_CUDA=ON" in line


def _stand_in_build(folder: Path, build: int) -> Path:
    """A folder whose two "binaries" print an older llama.cpp's version line and device list:
    only the version check meets them, and it must refuse them before anything starts."""
    folder.mkdir()
    for name in llama_cpp.BINARIES:
        tool = folder / name
        tool.write_text("#!/bin/sh\n"
                        f"echo 'version: 0.0.1 (build {build}, commit 1234567)' >&2\n")
        tool.chmod(0o755)
    return folder


@pytest.mark.parametrize("engine", ["llama-bench", "llama-server"])
def test_an_older_llama_cpp_is_refused_in_one_line_before_any_run(engine, tmp_path):
    env = {**os.environ, "FUSEDQK_LLAMA_CPP": str(_stand_in_build(tmp_path / "old", 5000))}
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "--engine",
                           f"config/engines/{engine}.yaml", "-m", "qwen3-tiny", "-r", "1",
                           "--checkpoint-dir", str(tmp_path / "ckpt"),
                           "--out-dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if "note:" not in line]
    assert len(errors) == 1, errors
    assert "build 5000" in errors[0] and "build 11312" in errors[0] and engine in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_gguf_the_server_refuses_is_one_line_and_leaves_no_server(llama_bin, tmp_path):
    """A GGUF that reads as one (a vocabulary, qwen3's keys) but holds no tensors: llama-server
    refuses it, and fusedqk says so in one line naming the engine, with no server left."""
    from gguf import GGUFWriter

    from fusedqk.gguf_export import byte_level_vocab

    bad = tmp_path / "no-tensors.gguf"
    writer = GGUFWriter(str(bad), "qwen3")
    tokens, types = byte_level_vocab(300)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(["t 1"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "identity", "--engine",
                           "config/engines/llama-server.yaml", "-m", str(bad), "--out-dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if "note:" not in line]
    assert len(errors) == 1 and "llama-server" in errors[0], errors
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))
    assert not _llama_processes(str(tmp_path))


def test_the_build_command_takes_its_source_from_the_environment_where_no_flag_names_one(tmp_path):
    """A machine without PyPI names the source once (FUSEDQK_LLAMA_CPP_SOURCE) for every build:
    a file that is not a source archive is then refused in one line naming it, not downloaded."""
    import shutil

    bogus = tmp_path / "not-a-source.tar.xz"
    bogus.write_bytes(b"not an archive")
    path = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    if not (shutil.which("cmake", path=path) and shutil.which("ninja", path=path)):
        pytest.skip("cmake and ninja (the dev extras) are not installed here")
    env = {**os.environ, "FUSEDQK_LLAMA_CPP_SOURCE": str(bogus),
           "FUSEDQK_CACHE_DIR": str(tmp_path / "cache"), "PATH": path}
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "build-llama-cpp", "--backend", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert str(bogus) in proc.stderr and "not a readable source archive" in proc.stderr
    assert "Traceback" not in proc.stderr
