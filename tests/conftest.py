"""Shared fixtures: tiny synthetic models built once per session (CPU, seconds)."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest

from fusedqk.cli import prepare


def tiny_args(model: str = "qwen3-tiny", **kw) -> argparse.Namespace:
    base = dict(model=model, backend="cpu", bits=4, group_size=64, dtype="bfloat16", seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="session", params=["qwen3-tiny", "qwen3-moe-tiny"])
def tiny(request):
    mx.set_default_device(mx.cpu)
    return prepare(tiny_args(request.param))


@pytest.fixture(scope="session")
def dense_tiny():
    mx.set_default_device(mx.cpu)
    return prepare(tiny_args("qwen3-tiny"))
