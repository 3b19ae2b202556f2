"""The machine's caches: synthetic checkpoints made once and loaded bit for bit, MLX's compiled
kernels in one shared folder, and where each job's time went."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import tiny_args
from mlx.utils import tree_flatten

from fusedqk import caches, phases
from fusedqk.engines.builtin import prepare
from fusedqk.errors import UserError
from fusedqk.models import Quantization, build_synthetic, get_spec

QUANT = Quantization(4, 64, "float32")


def _generate(cache: Path | str, model: str = "qwen3-moe-tiny") -> subprocess.CompletedProcess:
    env = {**os.environ, caches.ENV_CACHE_DIR: str(cache)}
    env.pop(caches.ENV_CHECKPOINTS, None)
    return subprocess.run([sys.executable, "-m", "fusedqk", "generate", "-m", model, "--backend",
                           "cpu", "-n", "12", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "checkpoints").glob("*") if p.is_dir())


def test_a_cached_checkpoint_loads_the_weights_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(caches.ENV_CHECKPOINTS, raising=False)
    built = dict(tree_flatten(build_synthetic(get_spec("qwen3-moe-tiny"), QUANT, 3).parameters()))
    first = caches.load_synthetic("qwen3-moe-tiny", QUANT, 3, "cpu")   # exports, then loads
    second = caches.load_synthetic("qwen3-moe-tiny", QUANT, 3, "cpu")  # loads
    assert len(_entries(tmp_path)) == 1
    for loaded in (first, second):
        params = dict(tree_flatten(loaded.model.parameters()))
        assert params.keys() == built.keys()
        for name, value in built.items():
            assert params[name].dtype == value.dtype, name
            assert mx.array_equal(params[name], value).item(), name
        assert loaded.name == "qwen3-moe-tiny" and loaded.source == "synthetic(seed=3)"


def test_processes_share_one_export_and_decode_the_same_tokens(tmp_path):
    runs = [_generate(tmp_path) for _ in range(2)]
    off = _generate("off")
    for r in (*runs, off):
        assert r.returncode == 0, r.stderr
    assert "exporting qwen3-moe-tiny" in runs[0].stderr
    assert "exporting" not in runs[1].stderr  # the second process loaded the first's export
    tokens = [json.loads(r.stdout)["tokens"] for r in (*runs, off)]
    assert tokens[0] == tokens[1] == tokens[2]
    assert len(_entries(tmp_path)) == 1


def test_concurrent_processes_make_one_export(tmp_path):
    env = {**os.environ, caches.ENV_CACHE_DIR: str(tmp_path)}
    env.pop(caches.ENV_CHECKPOINTS, None)
    argv = [sys.executable, "-m", "fusedqk", "generate", "-m", "qwen3-tiny", "--backend", "cpu",
            "-n", "4", "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sum("exporting" in err for _, err in outs) == 1
    assert len({json.dumps(json.loads(out)["tokens"]) for out, _ in outs}) == 1
    assert not list((tmp_path / "checkpoints").glob(".qwen3-tiny*.*.*"))  # no staging left


def test_a_damaged_cached_checkpoint_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(caches.ENV_CHECKPOINTS, raising=False)
    good = caches.load_synthetic("qwen3-tiny", QUANT, 0, "cpu")
    (entry,) = _entries(tmp_path)
    (entry / "model.safetensors").write_bytes(b"\x00" * 64)
    again = caches.load_synthetic("qwen3-tiny", QUANT, 0, "cpu")
    for (name, a), (_, b) in zip(tree_flatten(good.model.parameters()),
                                 tree_flatten(again.model.parameters()), strict=True):
        assert mx.array_equal(a, b).item(), name
    assert (entry / "model.safetensors").stat().st_size > 64


def test_off_builds_in_memory_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.ENV_CACHE_DIR, caches.OFF)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    loaded = caches.load_synthetic("qwen3-tiny", QUANT, 0, "cpu")
    assert loaded.name == "qwen3-tiny"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["", "   ", "relative/cache"])
def test_a_cache_folder_must_be_absolute(value, monkeypatch):
    monkeypatch.setenv(caches.ENV_CACHE_DIR, value)
    with pytest.raises(UserError, match=r"FUSEDQK_CACHE_DIR=.* is not accepted; give an absolute"):
        caches.cache_root()


def test_a_cache_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _generate(tmp_path / "file")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "FUSEDQK_CACHE_DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_default_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(caches.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caches.cache_root() == tmp_path / "xdg" / "fusedqk"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert caches.cache_root() == tmp_path / ".cache" / "fusedqk"


def test_the_fingerprint_changes_with_everything_the_weights_depend_on(monkeypatch):
    cfg = get_spec("qwen3-tiny").config
    base = caches.fingerprint(cfg, 4, 64, "float32", 0, "cpu")
    others = {caches.fingerprint({**cfg, "rms_norm_eps": 1e-5}, 4, 64, "float32", 0, "cpu"),
              caches.fingerprint(cfg, 8, 64, "float32", 0, "cpu"),
              caches.fingerprint(cfg, 4, 32, "float32", 0, "cpu"),
              caches.fingerprint(cfg, 4, 64, "bfloat16", 0, "cpu"),
              caches.fingerprint(cfg, 4, 64, "float32", 1, "cpu"),
              caches.fingerprint(cfg, 4, 64, "float32", 0, "cuda")}
    monkeypatch.setattr(caches, "SYNTHETIC_VERSION", caches.SYNTHETIC_VERSION + 1)
    others.add(caches.fingerprint(cfg, 4, 64, "float32", 0, "cpu"))
    assert base not in others and len(others) == 7


def test_the_kernel_cache_is_one_folder_per_device_on_cuda_only(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(caches.ENV_PTX_CACHE, raising=False)
    assert caches.use_shared_kernel_cache("cpu", "AMD EPYC") is None
    assert caches.ENV_PTX_CACHE not in os.environ
    folder = caches.use_shared_kernel_cache("cuda", "NVIDIA H200")
    assert folder == tmp_path / "ptx" / f"nvidia-h200-mlx{mx.__version__}" and folder.is_dir()
    assert os.environ[caches.ENV_PTX_CACHE] == str(folder)
    monkeypatch.setenv(caches.ENV_PTX_CACHE, "/elsewhere")  # the user's own setting wins
    assert caches.use_shared_kernel_cache("cuda", "NVIDIA H100") == Path("/elsewhere")


def test_phases_add_up_within_the_process_time():
    with phases.phase("weights"):
        prepare(tiny_args())
    snap = phases.snapshot()
    assert 0 < snap["weights_s"] <= snap["process_s"]
    with pytest.raises(ValueError, match="unknown phase"), phases.phase("lunch"):
        pass


def test_a_status_file_says_where_the_job_time_went(tmp_path):
    status = tmp_path / "status.json"
    r = subprocess.run([sys.executable, "-m", "fusedqk", "blockbench", "-m", "qwen3-tiny",
                        "--backend", "cpu", "--reps", "2", "--bandwidth", "100",
                        "--status", str(status)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seconds = json.loads(status.read_text())["seconds"]
    assert {"process_s", "weights_s", "warmup_s", "measure_s"} <= seconds.keys()
    assert sum(v for k, v in seconds.items() if k != "process_s") <= seconds["process_s"]
    # Python's start-up and imports count too: the process is older than its first phase.
    assert seconds["process_s"] > seconds["weights_s"] + seconds["measure_s"]
