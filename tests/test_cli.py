"""The command line: outputs, and one clear line (no traceback) for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT


def fusedqk(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fusedqk", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedqk: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_generate_graph_and_composite_print_identical_varied_ids(model):
    graph = fusedqk("generate", "-m", model, "--path", "graph", "--backend", "cpu")
    fused = fusedqk("generate", "-m", model, "--path", "fused", "--impl", "composite",
                    "--backend", "cpu")
    assert graph.returncode == 0 and fused.returncode == 0, graph.stderr + fused.stderr
    ids = graph.stdout.split()
    assert len(ids) == 64 and len(set(ids)) >= 8
    assert graph.stdout == fused.stdout


@pytest.mark.slow
def test_generate_json_and_env_and_models():
    out = json.loads(fusedqk("generate", "-m", "qwen3-tiny", "-n", "8", "--json").stdout)
    assert len(out["tokens"]) == 8 and out["path"] == "graph"
    env = json.loads(fusedqk("env", "--json").stdout)
    assert env["backend"] == "cpu" and env["fused_qk_norm"] is False and env["mlx"]
    env = json.loads(fusedqk("env", "--json", env={"FUSEDQK_FUSED_QK_NORM": "on"}).stdout)
    assert env["fused_qk_norm"] is True and env["impl"] == "composite"
    models = json.loads(fusedqk("models", "--json").stdout)
    assert {m["model"] for m in models} >= {"qwen3-0.6b", "qwen3-30b-a3b", "qwen3-tiny"}


def test_a_named_git_commit_wins_over_the_trees_git(monkeypatch):
    from fusedqk.envinfo import ENV_GIT_COMMIT, git_state

    monkeypatch.delenv(ENV_GIT_COMMIT, raising=False)
    asked = git_state()["git_commit"]
    if (ROOT / ".git").exists():  # a checkout: its own commit; an unpacked tree has none
        assert asked is not None and len(asked) == 40
    else:
        assert asked is None
    monkeypatch.setenv(ENV_GIT_COMMIT, "4176a4f29fa59b75379188f7fe6c771f6759342e")
    assert git_state() == {"git_commit": "4176a4f29fa59b75379188f7fe6c771f6759342e",
                           "git_dirty": None}


def test_bench_sizes_mlx_graph_cache_unless_the_caller_did(monkeypatch):
    from fusedqk import bench

    monkeypatch.delenv(bench.GRAPH_CACHE_ENV, raising=False)
    bench.size_graph_cache()
    assert os.environ[bench.GRAPH_CACHE_ENV] == bench.GRAPH_CACHE_SIZE
    monkeypatch.setenv(bench.GRAPH_CACHE_ENV, "400")
    bench.size_graph_cache()
    assert os.environ[bench.GRAPH_CACHE_ENV] == "400"


@pytest.mark.slow
def test_bench_records_the_graph_cache_it_ran_with(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_GRAPH_CACHE_SIZE"}
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "-m", "qwen3-tiny",
                           "--backend", "cpu", "--paths", "graph,composite", "-p", "4", "-g", "4",
                           "-r", "2", "-w", "1", "-c", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert meta["environment"]["mlx_environment"]["MLX_CUDA_GRAPH_CACHE_SIZE"] == "4000"


@pytest.mark.slow
def test_bench_adds_rounds_up_to_the_maximum_while_the_ci_is_wider_than_asked(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "-m", "qwen3-tiny",
                           "--backend", "cpu", "--paths", "graph,composite", "-p", "4", "-g", "4",
                           "-r", "2", "--max-rounds", "4", "--target-half-width", "1e-9",
                           "-w", "1", "-c", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    trials = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 4 * 2  # header, 4 rounds of 2 paths
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert meta["stopped"].startswith("max rounds 4 reached")
    # Each round's wall time holds its trials' timed and untimed parts, and little else.
    rows = pd.read_csv(tmp_path / "trials.csv")
    spent = (rows.prefill_s + rows.decode_s + rows.untimed_s).groupby(rows["round"]).sum()
    assert (rows.untimed_s > 0).all() and len(meta["round_wall_s"]) == 4
    assert all(s <= w <= s + 0.5 for s, w in zip(spent, meta["round_wall_s"], strict=True))
    assert "rounds: max rounds 4 reached" in proc.stdout


def test_bench_stops_once_every_ci_is_as_narrow_as_asked():
    from fusedqk import bench, results

    settings = results.BenchSettings(rounds=3, target_half_width=0.01, max_rounds=50, chunk_tokens=2)
    result = results.BenchRun(settings, ["graph", "kernel"])
    for rnd, drift in enumerate([1.0, 0.7, 1.3]):  # shared drift, a constant 1.2x speedup
        for path, latency in (("graph", 0.012 * drift), ("kernel", 0.010 * drift)):
            result.trials.append({"model": "m", "path": path, "round": rnd,
                                  "decode_tok_s": 1 / latency})
            result.tokens += [{"model": "m", "path": path, "round": rnd, "step": step,
                               "latency_s": latency} for step in range(1, 5)]
        _, speedups = bench._speedups(result)
        stopped = results.stop_reason(settings, rnd + 1, speedups, measured_s=rnd + 1.0)
        assert (stopped is None) == (rnd + 1 < 3)
    assert stopped == "every speedup CI half-width <= 1.00% after 3 rounds"
    assert speedups["kernel"].point == pytest.approx(1.2)


def test_bench_stops_when_its_measuring_budget_is_spent_though_the_ci_is_wide():
    from fusedqk import results
    from fusedqk.stats import speedup_ci

    settings = results.BenchSettings(rounds=3, target_half_width=0.01, max_rounds=50,
                                     max_measure_s=30)
    wide = {"kernel": speedup_ci([1.1, 1.3, 1.2, 1.4], p_value=0.01, seed=0)}
    assert results.stop_reason(settings, 2, wide, measured_s=40) is None  # fewer than rounds
    assert results.stop_reason(settings, 4, wide, measured_s=29.9) is None
    stopped = results.stop_reason(settings, 4, wide, measured_s=31.2)
    assert stopped.startswith("the 30-s measuring budget spent after 4 rounds (31 s) with a CI "
                              "half-width of ")
    assert stopped.endswith("(target 1.00%)")


def test_record_config_writes_the_pipelines_configuration_as_yaml(tmp_path):
    import yaml

    from fusedqk import cli

    config = {"backends": ["cpu"], "backend_settings": {"cpu": {"models": ["qwen3-tiny"]}},
              "run_name": "it's \"quoted\" $HOME"}
    out = tmp_path / "config.yaml"
    assert cli.main(["record-config", "--config", json.dumps(config), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == config


def test_a_checkpoint_is_recorded_as_what_it_is_not_as_the_flags_say(tmp_path, monkeypatch):
    """--bits 4 --group-size 128 on an 8-bit g64 checkpoint folder: it runs 8-bit g64, and
    bench.json says so (a note names the flags that did not apply)."""
    import json
    import subprocess
    import sys

    ckpt = tmp_path / "ck8"
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    subprocess.run([sys.executable, "-m", "fusedqk", "export", "qwen3-tiny", "--out", str(ckpt),
                    "--bits", "8"], check=True, capture_output=True, env=env)
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "-m", str(ckpt), "--bits", "4",
                           "--group-size", "128", "-r", "1", "-p", "8", "-g", "8", "--out-dir",
                           str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the checkpoint is 8-bit g64" in proc.stderr
    recorded = json.loads((tmp_path / "b" / "bench.json").read_text())["meta"]["environment"]
    assert (recorded["bits"], recorded["group_size"]) == (8, 64)


def test_a_status_file_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk when the status is written: one line, exit 2, no traceback."""
    import errno

    from fusedqk import atomic, cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_with", full)
    monkeypatch.setenv("FUSEDQK_LOCK_DIR", str(tmp_path / "locks"))
    code = cli.main(["bench", "-m", "qwen3-tiny", "-r", "1", "-p", "4", "-g", "4",
                     "--out-dir", str(tmp_path / "b"), "--status", str(tmp_path / "status.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "No space left on device" in err[-1] and "status is lost" in err[-1]
