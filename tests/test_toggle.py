"""FUSEDQK_FUSED_QK_NORM / FUSEDQK_FUSED_IMPL / FUSEDQK_DEFAULTS parsing and resolution."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fusedqk.errors import UserError
from fusedqk.toggle import FALSE_WORDS, TRUE_WORDS, load_defaults, parse_impl, parse_toggle, resolve


@pytest.mark.parametrize("word", [*TRUE_WORDS, " On ", "YES", "True\n"])
def test_every_true_spelling(word):
    assert parse_toggle(word) is True


@pytest.mark.parametrize("word", [*FALSE_WORDS, " off", "NO", "False "])
def test_every_false_spelling(word):
    assert parse_toggle(word) is False


@pytest.mark.parametrize("word", ["", "2", "enable", "maybe", "o n"])
def test_invalid_values_name_the_variable_and_the_accepted_values(word):
    with pytest.raises(UserError) as e:
        parse_toggle(word)
    msg = str(e.value)
    assert "FUSEDQK_FUSED_QK_NORM" in msg and "1/true/on/yes" in msg and "\n" not in msg


def test_impl_values():
    assert parse_impl(" Kernel ") == "kernel"
    with pytest.raises(UserError, match="auto, kernel, composite"):
        parse_impl("fast")


def test_shipped_table_follows_its_archived_evidence():
    table = load_defaults()
    assert set(table.backends) == {"cpu", "cuda", "metal"}
    for backend, entry in table.backends.items():
        assert entry.reason and entry.evidence
        # A measured default says what each archive it names decided.
        for run in re.findall(r"results/[^\s,()]+", entry.evidence):
            decided = json.loads((Path(run) / "decisions.json").read_text())["backends"][backend]
            assert entry.fused_qk_norm is decided["fused_qk_norm"], run
            assert entry.impl == decided["impl"], run
    assert table.backends["cuda"].fused_qk_norm is True  # the H100 and H200 runs: on
    assert table.backends["metal"].fused_qk_norm is False  # opt-in, from the request


def test_unset_uses_table_default_with_its_reason():
    res = resolve("metal", True, env={})
    assert res.path == "graph" and "M1 Ultra" in res.path_source
    assert res.impl == "composite"


def test_env_overrides_default():
    res = resolve("cuda", True, env={"FUSEDQK_FUSED_QK_NORM": "on"})
    assert res.path == "fused" and res.impl == "kernel_kv" and "FUSEDQK_FUSED_QK_NORM=on" in res.path_source


def test_auto_impl_without_kernel_is_composite():
    res = resolve("cpu", False, env={"FUSEDQK_FUSED_QK_NORM": "1", "FUSEDQK_FUSED_IMPL": "auto"})
    assert res.impl == "composite"


def test_decisions_file_overrides_table(tmp_path):
    f = tmp_path / "decisions.json"
    f.write_text(json.dumps({"schema": "fusedqk-defaults/1", "backends": {
        "cuda": {"fused_qk_norm": True, "impl": "kernel", "reason": "measured", "evidence": "run X"}}}))
    res = resolve("cuda", True, env={"FUSEDQK_DEFAULTS": str(f)})
    assert res.path == "fused" and str(f) in res.path_source
    # A backend the file does not list is off.
    assert resolve("metal", True, env={"FUSEDQK_DEFAULTS": str(f)}).path == "graph"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"schema": "other"}', "fusedqk-defaults/1"),
    ('{"schema": "fusedqk-defaults/1", "backends": []}', "backends"),
    ('{"schema": "fusedqk-defaults/1", "backends": {"cuda": {"fused_qk_norm": "yes"}}}', "true or false"),
    ('{"schema": "fusedqk-defaults/1", "backends": {"cuda": {"fused_qk_norm": true, "impl": "x"}}}',
     "impl"),
])
def test_malformed_decisions_file_is_one_clear_error(tmp_path, content, needle):
    f = tmp_path / "d.json"
    f.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_defaults(str(f))


def test_missing_decisions_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_defaults(str(tmp_path / "nope.json"))


def test_the_shipped_cuda_default_cites_the_evidence_of_each_card():
    from fusedqk.toggle import load_defaults

    cuda = load_defaults().backends["cuda"]
    h100 = cuda.card_evidence("NVIDIA H100 80GB HBM3")
    assert "20261127-703a49a8e9-kernel" in h100 and "20261126-05cb964ce6" in h100
    assert "20261201-e3538ceb0b-mlx-lm" in cuda.card_evidence("NVIDIA H200")
    unknown = cuda.card_evidence("NVIDIA B200")
    assert "NVIDIA B200 has never been measured" in unknown and "NVIDIA H200" in unknown
    for card in cuda.cards.values():
        for run in card["runs"]:
            assert (Path(run) / "MANIFEST.sha256").is_file(), run


@pytest.mark.parametrize("card, primitive", [("NVIDIA H100 80GB HBM3", True),
                                             ("NVIDIA H200", False), ("NVIDIA B200", True)])
def test_env_on_a_cuda_machine_fits_one_screen_and_says_what_runs_and_why(card, primitive):
    """`fusedqk env` on a CUDA machine: at most 25 lines of 100 columns; the default, its one-line
    reason, this card's measurement, and kernel_kv running as kernel where there is no primitive."""
    from fusedqk.envinfo import render_env

    report = {"fusedqk": "0.1.0", "mlx": "0.32.4", "mlx_lm": "0.32.2",
              "backends_available": ["cpu", "cuda"], "device_name": card,
              "memory_total_bytes": 80 << 30, "memory_free_bytes": 79 << 30,
              "driver_version": "580.159.04", "cuda_version": "13.0", "fused_qk_norm": True,
              "impl": "kernel_kv", "path_source": "default for cuda from fusedqk/data/defaults.json: …",
              "impl_source": "default for cuda from fusedqk/data/defaults.json",
              "kernel_available": True,
              "kernel_call": "primitive" if primitive else "cuda_kernel",
              "kernel_call_source": "the C++ extension loads" if primitive else "not built"}
    text = render_env(report, "cuda")
    lines = text.splitlines()
    assert len(lines) <= 25 and max(len(line) for line in lines) <= 100, text
    assert "fused path   on" in text and "impl         kernel_kv" in text
    assert bool(re.search(r"runs as +kernel: no C\+\+ primitive", text)) != primitive
    assert "docs/configuration.md" in text
    if card == "NVIDIA B200":
        assert "never measured" in text
    else:
        assert "kernel_kv" in text.split("this card", 1)[1]


def test_a_decisions_file_from_a_tampered_run_is_refused(tmp_path):
    """FUSEDQK_DEFAULTS naming a sealed run's decisions.json trusts it only while the run
    verifies: a copy whose decision was edited to on is refused in one line."""
    import shutil

    from conftest import committed_archives

    run = tmp_path / "run"
    shutil.copytree(committed_archives("cpu-*/*")[-1], run)
    decisions = run / "decisions.json"
    assert resolve("cpu", False, env={"FUSEDQK_DEFAULTS": str(decisions)}).path == "graph"
    doc = json.loads(decisions.read_text())
    doc["backends"]["cpu"]["fused_qk_norm"] = True
    decisions.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="does not match its manifest"):
        resolve("cpu", False, env={"FUSEDQK_DEFAULTS": str(decisions)})


def test_a_kernel_chosen_by_the_variable_on_a_backend_without_it_names_the_variable():
    from fusedqk.toggle import concrete_path

    with pytest.raises(UserError, match=r"^FUSEDQK_FUSED_IMPL=kernel: the kernel has no cpu version"):
        concrete_path(None, "cpu", False, env={"FUSEDQK_FUSED_QK_NORM": "1",
                                               "FUSEDQK_FUSED_IMPL": "kernel"})
