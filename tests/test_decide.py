"""The decision rule on synthetic run directories: on, off, inconclusive, and failed models."""

from __future__ import annotations

import json

import pytest

from fusedqk.decide import Rule, decide
from fusedqk.toggle import load_defaults


def write_model(run, model, point, lo, hi, verdict="EQUAL", impl="kernel", tokens_identical=True):
    d = run / model
    (d / "bench").mkdir(parents=True)
    sp = {"path": impl, "point": point, "lo": lo, "hi": hi, "level": 0.95, "p_value": 0.01,
          "rounds": 15, "model": model, "backend": "cuda"}
    (d / "bench" / "bench.json").write_text(json.dumps({
        "summary": [], "speedups": [sp], "warnings": [], "settings": {},
        "meta": {"environment": {"backend": "cuda", "device_name": "test GPU"}}}))
    (d / f"identity-{impl}.json").write_text(json.dumps({
        "verdict": verdict, "free_running": {"identical": tokens_identical}}))


def rec(tmp_path, rule=None):
    return decide(tmp_path, rule or Rule())["backends"]["cuda"]


def test_on_when_every_model_is_equal_and_faster(tmp_path):
    write_model(tmp_path, "a", 1.10, 1.05, 1.15)
    write_model(tmp_path, "b", 1.04, 1.02, 1.06)
    d = rec(tmp_path)
    assert d["recommendation"] == "on" and d["fused_qk_norm"] is True and d["impl"] == "kernel"


def test_off_when_one_model_regresses(tmp_path):
    write_model(tmp_path, "a", 1.10, 1.05, 1.15)
    write_model(tmp_path, "b", 0.97, 0.95, 0.99)
    d = rec(tmp_path)
    assert d["recommendation"] == "off" and d["fused_qk_norm"] is False
    assert "regresses" in d["per_impl"]["kernel"]["models"]["b"]["why"]


def test_off_when_identity_differs_even_if_faster(tmp_path):
    write_model(tmp_path, "a", 1.50, 1.40, 1.60, verdict="DIFFERS", tokens_identical=False)
    assert rec(tmp_path)["recommendation"] == "off"


def test_greedy_tokens_policy_accepts_differing_logits_with_identical_tokens(tmp_path):
    write_model(tmp_path, "a", 1.50, 1.40, 1.60, verdict="DIFFERS", tokens_identical=True)
    assert rec(tmp_path, Rule(identity_policy="greedy-tokens"))["recommendation"] == "on"


def test_inconclusive_when_ci_straddles_with_rounds_estimate(tmp_path):
    write_model(tmp_path, "a", 1.05, 0.98, 1.12)
    d = rec(tmp_path)
    m = d["per_impl"]["kernel"]["models"]["a"]
    assert d["recommendation"] == "inconclusive" and m["rounds_needed"] > 15


def test_inconclusive_identity_blocks_on_and_no_round_count_is_promised(tmp_path):
    write_model(tmp_path, "a", 1.20, 1.10, 1.30, verdict="INCONCLUSIVE")
    d = rec(tmp_path)
    m = d["per_impl"]["kernel"]["models"]["a"]
    assert d["recommendation"] == "inconclusive" and m["rounds_needed"] is None
    assert "speed alone would say on" in m["why"]


def test_failed_model_makes_it_inconclusive_and_is_named(tmp_path):
    write_model(tmp_path, "a", 1.20, 1.10, 1.30)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "status-bench.json").write_text(
        json.dumps({"ok": False, "command": "bench", "error": "out of memory"}))
    d = rec(tmp_path)
    assert d["recommendation"] == "inconclusive"
    assert "out of memory" in d["per_impl"]["kernel"]["models"]["b"]["why"]


def test_min_gain_is_a_parameter(tmp_path):
    write_model(tmp_path, "a", 1.04, 1.02, 1.06)
    assert rec(tmp_path, Rule(min_gain=0.05))["recommendation"] == "inconclusive"


@pytest.mark.parametrize("point", [1.10, 0.95])
def test_decisions_are_a_valid_defaults_file(tmp_path, point):
    write_model(tmp_path, "a", point, point - 0.02, point + 0.02)
    out = tmp_path / "decisions.json"
    out.write_text(json.dumps(decide(tmp_path, Rule())))
    table = load_defaults(str(out))
    assert table.backends["cuda"].fused_qk_norm is (point > 1)


def test_gain_words_never_say_minus_zero():
    from fusedqk.report import _gain_words

    assert _gain_words([0.9996, 1.0004]) == "decode speed ±0.0 %"
    assert _gain_words([1.0004, 1.2]) == "0.0–20.0 % faster decode"
    assert _gain_words([0.92, 1.28]) == "decode speed -8 to +28 %"


def test_an_absurd_round_count_is_not_offered_as_advice(tmp_path):
    write_model(tmp_path, "a", 1.0105, 0.5, 1.9)
    why = rec(tmp_path)["per_impl"]["kernel"]["models"]["a"]["why"]
    assert "more than 10000 rounds would be needed" in why and "about" not in why
