"""Shared fixtures: tiny synthetic models built once per session (CPU, seconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from fusedqk.compare import committed_runs
from fusedqk.engines.builtin import ModelRef, prepare

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def pytest_collection_modifyitems(config, items):
    """The SLURM and container tests first: each takes one to two minutes, mostly waiting on
    daemons, images and jobs, so begun early they overlap the many short tests on the other
    worker instead of running alone at the end of the suite."""
    items.sort(key=lambda item: not (item.get_closest_marker("slurm")
                                     or item.get_closest_marker("container")))


def committed_archives(pattern: str = "*/*") -> list[Path]:
    """The sealed runs under results/ that git tracks: a user's own runs there are theirs, and
    no test reads them."""
    tracked = committed_runs(RESULTS) or set()
    return sorted(p for p in RESULTS.glob(pattern)
                  if (p / "MANIFEST.sha256").is_file() and p.resolve() in tracked)


def tiny_args(model: str = "qwen3-tiny", **kw) -> ModelRef:
    return ModelRef(**{"model": model, "backend": "cpu", **kw})


@pytest.fixture(scope="session", autouse=True)
def own_lock_dir(tmp_path_factory):
    """Every measurement the tests start takes its device lock in a directory of this test
    session (of this worker, under pytest-xdist): nothing else on the host holds the tests up,
    and the tests never hold up anything else. Tests about the lock itself set their own."""
    path = tmp_path_factory.mktemp("locks")
    old = os.environ.get("FUSEDQK_LOCK_DIR")
    os.environ["FUSEDQK_LOCK_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FUSEDQK_LOCK_DIR", None)
    else:
        os.environ["FUSEDQK_LOCK_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """The tests' synthetic checkpoints and compiled kernels go to a folder of this session (of
    this worker), shared by every test and process it starts: never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("FUSEDQK_CACHE_DIR", "FUSEDQK_CHECKPOINTS")}
    os.environ["FUSEDQK_CACHE_DIR"] = str(path)
    os.environ.pop("FUSEDQK_CHECKPOINTS", None)
    yield path
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@pytest.fixture(scope="session", params=["qwen3-tiny", "qwen3-moe-tiny"])
def tiny(request):
    mx.set_default_device(mx.cpu)
    return prepare(tiny_args(request.param))


@pytest.fixture(scope="session")
def dense_tiny():
    mx.set_default_device(mx.cpu)
    return prepare(tiny_args("qwen3-tiny"))


@pytest.fixture
def small_cpu_workload() -> str:
    """A --config value that makes the cpu pipeline small: one tiny model, a few short rounds.
    For tests of how jobs are run (scheduling, locking), not of what they measure."""
    return ("backend_settings={cpu: {models: [qwen3-tiny], bench: {rounds: 3, prompt_tokens: 8, "
            "generation_tokens: 8, chunk_tokens: 4}, identity: {prompt_tokens: 8, tokens: 8, "
            "prompts: 1}, blockbench: {reps: 3}}}")


@pytest.fixture
def fake_mlxcel(tmp_path, monkeypatch) -> Path:
    """`mlxcel` and `mlxcel-bench-decode` in front of PATH: wrapper scripts (a process tree, as
    a launcher-installed binary would be) around tests/fakes/mlxcel.py, the strict stand-in made
    from mlxcel's source."""
    fake = Path(__file__).resolve().parent / "fakes" / "mlxcel.py"
    bin_dir = tmp_path / "fake-mlxcel-bin"
    bin_dir.mkdir()
    for name in ("mlxcel", "mlxcel-bench-decode", "mlxcel-server"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} {name} "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir
