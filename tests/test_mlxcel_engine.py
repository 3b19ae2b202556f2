"""config/engines/mlxcel.yaml against a strict stand-in built from mlxcel's source (tests/fakes/
mlxcel.py), the arms against the declared toggle, and engine processes that never outlive a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fusedqk import external
from fusedqk.engines.command import load_engine
from fusedqk.engines.process import EngineFailure, run_bounded
from fusedqk.errors import UserError
from fusedqk.results import BenchSettings

ROOT = Path(__file__).resolve().parents[1]
MLXCEL_FILE = ROOT / "config" / "engines" / "mlxcel.yaml"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    # A checkpoint directory whose path has many words: none of them may count as output.
    where = tmp_path / "a path with many distinct words one two three four five six" / "ckpt"
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps({"vocab_size": 997}))
    return where


@pytest.fixture
def mlxcel(fake_mlxcel):
    return load_engine(MLXCEL_FILE)


def engine_copy(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(MLXCEL_FILE.read_text())
    edit(doc)
    path = tmp_path / "mlxcel-edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_file_names_the_source_commit_it_was_derived_from():
    spec = load_engine(MLXCEL_FILE)
    assert "lablup/mlxcel@56c3d08" in spec.derived_from
    assert "56c3d08" in (ROOT / "docs" / "engines.md").read_text()
    assert spec.variable == "MLXCEL_FUSED_QK_NORM"


def test_bench_through_the_strict_fake_reads_every_line(mlxcel, checkpoint):
    run = external.bench(mlxcel, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=3))
    (sp,) = run.speedups
    assert 1.22 < sp["point"] < 1.28  # the fake's 150 vs 120 tok/s
    assert {t["generated_tokens"] for t in run.trials} == {16}
    assert {round(t["peak_memory_bytes"] / 1e9, 2) for t in run.trials} == {0.35}
    assert all(t["prefill_tok_s"] > 0 for t in run.trials)
    assert run.meta["refused_rounds"] == []
    assert run.meta["engine"]["version"] == "mlxcel 0.0.0"  # clap's format, the stand-in's number


def test_identity_counts_only_the_generated_tokens(mlxcel, checkpoint):
    result = external.identity(mlxcel, "qwen3-tiny", checkpoint, "cpu", 997, 8, 24, 2, 0)
    assert result["verdict"] == "EQUAL"
    words = result["outputs"]["graph"][0]
    assert len(words) == 24 and not {"Generating...", "path", "many", "Loading"} & set(words)
    assert result["graph_distinct_greedy_tokens"] == sorted({len(set(o)) for o in result["outputs"]["graph"]})


def test_identity_of_a_differing_fused_arm_names_the_word(mlxcel, checkpoint, monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_DIFFER", "1")
    result = external.identity(mlxcel, "qwen3-tiny", checkpoint, "cpu", 997, 8, 24, 1, 0)
    assert result["verdict"] == "DIFFERS"
    assert result["free_running"]["greedy_first_divergence"] == [3]
    assert "first differing word [3]" in external.render_identity(result)


def test_a_round_whose_arms_decoded_different_counts_is_refused(mlxcel, checkpoint, monkeypatch):
    monkeypatch.setenv("FAKE_MLXCEL_EOS_AFTER", "5")
    with pytest.raises(EngineFailure, match="decoded different numbers of tokens") as info:
        external.bench(mlxcel, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=3))
    assert "\n" not in str(info.value)


def test_an_arm_that_decodes_nothing_refuses_the_round_not_the_model(mlxcel, checkpoint, monkeypatch):
    """End of sequence as the first token: mlxcel prints `Generated tokens: 0` and 0.00 tok/s.
    That round is refused (named in meta.refused_rounds), like any round of unequal counts;
    only when most rounds are refused does the model fail, saying why."""
    monkeypatch.setenv("FAKE_MLXCEL_EOS_AFTER", "0")
    with pytest.raises(EngineFailure, match="rounds refused") as info:
        external.bench(mlxcel, "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16, rounds=3))
    assert "0}" in str(info.value) and "\n" not in str(info.value)


def test_a_flag_mlxcel_lacks_fails_with_one_line_naming_it(tmp_path, fake_mlxcel, checkpoint):
    path = engine_copy(tmp_path, lambda d: d["bench"]["command"].append("--ignore-eos"))
    with pytest.raises(EngineFailure, match="unexpected argument '--ignore-eos' found") as info:
        external.bench(load_engine(path), "qwen3-tiny", checkpoint, "cpu", 997, BenchSettings(8, 16))
    assert "engine mlxcel, bench" in str(info.value) and "\n" not in str(info.value)


def test_a_missing_required_flag_fails_as_mlxcel_would(tmp_path, fake_mlxcel, checkpoint):

    def drop_prompt(doc):
        cmd = doc["bench"]["command"]
        i = cmd.index("-p")
        del cmd[i:i + 2]

    with pytest.raises(EngineFailure, match="required arguments were not provided"):
        external.bench(load_engine(engine_copy(tmp_path, drop_prompt)), "qwen3-tiny", checkpoint,
                      "cpu", 997, BenchSettings(8, 16))


def test_an_output_format_drift_fails_loudly(tmp_path, fake_mlxcel, checkpoint):
    path = engine_copy(tmp_path, lambda d: d["identity"].update(generated=r"(?s)^Output:\n(?P<value>.*)$"))
    with pytest.raises(EngineFailure, match="no generated text found"):
        external.identity(load_engine(path), "qwen3-tiny", checkpoint, "cpu", 997, 8, 8, 1, 0)


@pytest.mark.parametrize("graph, fused, needle", [
    ({}, {"MLXCEL_FUSED_QK_NORM": "1"}, None),                      # unset means off to mlxcel
    ({"MLXCEL_FUSED_QK_NORM": "0"}, {"MLXCEL_FUSED_QK_NORM": "TRUE"}, None),
    ({}, {"MLXCEL_FUSED_QK_NORM": "0"}, "fused.env.MLXCEL_FUSED_QK_NORM: '0' means off"),
    ({"MLXCEL_FUSED_QK_NORM": "yes"}, {"MLXCEL_FUSED_QK_NORM": "1"},
     "graph.env.MLXCEL_FUSED_QK_NORM: 'yes' means on"),
    ({"MLXCEL_FUSED_QK_NORM": "0"}, {"OTHER": "1"}, "fused.env.MLXCEL_FUSED_QK_NORM: unset means off"),
])
def test_the_arms_are_checked_against_the_declared_toggle(tmp_path, graph, fused, needle):
    path = engine_copy(tmp_path, lambda d: d["arms"].update(graph={"env": graph}, fused={"env": fused}))
    if needle is None:
        load_engine(path)
        return
    with pytest.raises(UserError, match=needle):
        load_engine(path)


def test_an_engine_whose_unset_means_its_default_needs_both_arms_set(tmp_path):
    path = ROOT / "config" / "engines" / "fusedqk-generate.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["arms"]["graph"]["env"] = {}
    copy = tmp_path / "e.yaml"
    copy.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="unset means default"):
        load_engine(copy)


TREE = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_timeout_ends_the_whole_process_tree(tmp_path):
    script, pid_file = tmp_path / "tree.py", tmp_path / "child.pid"
    script.write_text(TREE)
    with pytest.raises(EngineFailure, match="did not finish in 2 s"):
        run_bounded([sys.executable, str(script), str(pid_file)], dict(os.environ), 2, "engine t")
    assert _wait_gone(int(pid_file.read_text()))


def test_output_is_capped(tmp_path):
    argv = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"]
    with pytest.raises(EngineFailure, match="printed more than 1 MiB"):
        run_bounded(argv, dict(os.environ), 30, "engine t", max_output_bytes=2**20)


def test_a_pathological_pattern_cannot_hang_the_reader(tmp_path):
    doc = yaml.safe_load(MLXCEL_FILE.read_text())
    doc["bench"]["regex"]["decode_tok_s"] = r"^(a|aa)+(?P<value>b)$"
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = load_engine(path)
    start = time.monotonic()
    with pytest.raises(EngineFailure, match="took longer than the run's timeout_s"):
        spec.bench.reader.read("a" * 60, ("decode_tok_s",), ("decode_tok_s",), 0.5)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_sigkill_of_the_orchestrator_leaves_no_engine_process(tmp_path):
    script, pid_file = tmp_path / "tree.py", tmp_path / "child.pid"
    script.write_text(TREE)
    orchestrator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from fusedqk.engines.process import run_bounded
        run_bounded([sys.executable, {str(script)!r}, {str(pid_file)!r}], dict(os.environ), 120, "t")
    """)], cwd=ROOT)
    stop = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < stop:
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    orchestrator.send_signal(signal.SIGKILL)
    orchestrator.wait()
    assert _wait_gone(grandchild), "an engine process outlived its orchestrator"
