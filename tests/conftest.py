"""Shared fixtures: tiny synthetic models built once per session (CPU, seconds)."""

from __future__ import annotations

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
