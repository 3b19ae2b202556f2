"""The identity check catches a single-ULP change, and controls catch a nondeterministic path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusedqk import identity
from fusedqk.engines.builtin import ModelRef
from fusedqk.results import verdict


def logits(seed, steps=5, vocab=64):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=vocab).astype(np.float32) for _ in range(steps)]


def one_ulp_up(a: np.ndarray, index: int) -> np.ndarray:
    b = a.copy()
    b.view(np.uint32)[index] += 1
    return b


def test_bitwise_equal_logits():
    a = logits(0)
    cmp = identity.compare_logits(a, [x.copy() for x in a])
    assert cmp["bitwise_equal"] and cmp["equal_fraction"] == 1.0 and cmp["first_differing_step"] is None


def test_a_single_ulp_in_one_logit_is_caught():
    a = logits(1)
    b = [x.copy() for x in a]
    b[3] = one_ulp_up(b[3], 17)
    cmp = identity.compare_logits(a, b)
    assert not cmp["bitwise_equal"]
    assert cmp["first_differing_step"] == 3
    assert cmp["equal_fraction"] == pytest.approx(1 - 1 / (5 * 64))
    assert 0 < cmp["max_abs_diff"] < 1e-6 and cmp["top1_agreement"] == 1.0


def test_verdicts():
    assert verdict(True, True, True) == "EQUAL"
    assert verdict(False, True, True) == "DIFFERS"
    assert verdict(False, True, False) == "DIFFERS"
    assert verdict(True, False, True) == "INCONCLUSIVE"
    assert verdict(False, False, True) == "INCONCLUSIVE"
    assert verdict(True, None, None) == "INCONCLUSIVE"


def test_trace_comparisons_report_divergence():
    a = identity.Trace("graph", ["x", "y", "z"], [[1, 2, 3]], [4, 5])
    b = identity.Trace("graph", ["x", "y", "w"], [[1, 9, 3]], [4, 5])
    free = identity.compare_free_running(a, b)
    assert not free["identical"]
    assert free["greedy_first_divergence"] == [1] and free["sampled_first_divergence"] is None
    # A control repeats only the teacher-forced logits (its trace has no tokens).
    control = identity.compare_control(a, identity.Trace("graph", ["x", "y", "w"], [], []))
    assert control == {"identical": False, "first_differing_logit_step": 2}
    assert identity.compare_control(a, identity.Trace("graph", ["x", "y", "z"], [], []))["identical"]


TINY = ModelRef("qwen3-tiny", "cpu")


def settings(**kw) -> identity.IdentitySettings:
    return identity.IdentitySettings(**{"prompt_tokens": 8, "tokens": 12, "prompts": 1, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("concurrent", [False, True], ids=["controls-after", "controls-alongside"])
def test_tiny_model_is_equal_with_deterministic_controls(monkeypatch, concurrent):
    # --no-cudnn-sdpa changes nothing on the CPU, but it must be recorded and reach the controls.
    monkeypatch.setenv(identity.MLX_CUDNN_SDPA_ENV, "1")  # restored after the test
    commands = []
    real_popen = subprocess.Popen

    def spy(cmd, **kw):
        commands.append(cmd)
        return real_popen(cmd, **kw)

    monkeypatch.setattr(identity.subprocess, "Popen", spy)
    (result,) = identity.check_identity(
        TINY, settings(cudnn_sdpa=False, concurrent_controls=concurrent), "composite")
    assert result["verdict"] == "EQUAL"
    assert result["controls"]["graph"]["identical"] and result["controls"]["fused"]["identical"]
    assert result["controls"]["scope"] == identity.CONTROL_SCOPE
    assert result["settings"]["cudnn_sdpa"] is False
    assert result["settings"]["concurrent_controls"] is concurrent
    assert result["environment"]["mlx_environment"][identity.MLX_CUDNN_SDPA_ENV] == "0"
    controls = [cmd for cmd in commands if "fusedqk.identity_worker" in cmd]
    assert len(controls) == 1


def test_the_worker_spec_round_trips_every_model_and_settings_field():
    from dataclasses import fields

    # A value unlike each field's default, so that a field the spec dropped would show.
    ref = ModelRef("qwen3-moe-tiny", "cpu", 8, 32, "float16", 7)
    s = identity.IdentitySettings(9, 11, 2, 5, False, True)
    assert all(getattr(ref, f.name) != f.default for f in fields(ModelRef))
    assert all(getattr(s, f.name) != f.default for f in fields(identity.IdentitySettings))
    assert identity.read_worker_spec(identity.worker_spec(ref, s, ["graph", "composite"])) == (
        ref, s, ["graph", "composite"])


@pytest.mark.parametrize("spec", ["", "[]", '{"format": "other"}',
                                  '{"format": "fusedqk-identity-worker/1", "model": {"colour": 1}}'])
def test_a_bad_worker_spec_is_one_line(spec):
    proc = subprocess.run([sys.executable, "-m", "fusedqk.identity_worker"], input=spec,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "fusedqk-identity-worker/1" in proc.stderr


NOISY_GRAPH = textwrap.dedent('''
    import os
    import mlx.core as mx
    from mlx_lm.models import qwen3

    _call = qwen3.Attention.__call__

    def noisy(self, x, mask=None, cache=None):
        # Test-only: a graph path that is not reproducible (fresh noise every process).
        out = _call(self, x, mask, cache)
        seed = int.from_bytes(os.urandom(4), "little")
        return out + 1e-2 * mx.random.normal(out.shape, key=mx.random.key(seed)).astype(out.dtype)

    qwen3.Attention.__call__ = noisy
''')


@pytest.mark.slow
def test_controls_turn_a_nondeterministic_graph_path_into_inconclusive(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(NOISY_GRAPH)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "identity", "-m", "qwen3-tiny",
                           "--backend", "cpu", "--impls", "composite", "-p", "8", "-n", "12",
                           "-k", "1", "--out-dir", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "identity-composite.json").read_text())
    assert result["verdict"] == "INCONCLUSIVE"
    assert result["controls"]["graph"]["identical"] is False
