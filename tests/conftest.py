"""Shared fixtures: tiny synthetic models built once per session (CPU, seconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from fusedqk.engines.builtin import ModelRef, prepare


def tiny_args(model: str = "qwen3-tiny", **kw) -> ModelRef:
    return ModelRef(**{"model": model, "backend": "cpu", **kw})


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
    for name in ("mlxcel", "mlxcel-bench-decode"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {fake} {name} "$@"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir
