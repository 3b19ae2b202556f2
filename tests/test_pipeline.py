"""The Snakemake pipeline: lint, the DAG per backend, config errors, and the embedded default."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fusedqk import archive, plan

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the pipeline names runs by git commit")


def snakemake(*args, cwd=ROOT, timeout=1800):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("backend, models", [
    ("cpu", ["qwen3-tiny", "qwen3-moe-tiny"]),
    ("cuda", ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"]),
    ("metal", ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"]),
])
def test_dry_run_shows_the_dag_even_where_the_backend_is_absent(backend, models, tmp_path):
    proc = snakemake("-n", "--config", f"backends=[{backend}]", f"results_dir={tmp_path}",
                     "device_label=test-device")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for model in models:
        for job in ("bench", "identity", "blockbench"):
            assert f"{tmp_path}/{backend}-test-device/" in out and f"{model}/status-{job}.json" in out
    for rule in ("environment", "aggregate", "decide", "report", "manifest"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out


@pytest.mark.parametrize("checks", [None, 1])
def test_identity_checks_go_first_together_and_no_timing_job_starts_beside_them(checks, tmp_path):
    """Checks take one `checks` slot each, at priority 1; a timing job takes the `measure` slot
    and every `checks` slot (3 by default, or what --resources grants)."""
    extra = [] if checks is None else ["--resources", f"checks={checks}"]
    proc = snakemake("-n", *extra, "--config", "backends=[cuda]", f"results_dir={tmp_path}",
                     "device_label=test-device")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = proc.stdout.split("\nrule ")[1:]
    by_rule = {}
    for job in jobs:
        by_rule.setdefault(job.split(":", 1)[0], []).append(job)
    slots = checks or 3
    assert len(by_rule["identity"]) == 3 and len(by_rule["bench"]) == 3
    for job in by_rule["identity"]:
        assert "priority: 1" in job and "checks=1," in job and "measure=" not in job
    for job in by_rule["bench"] + by_rule["blockbench"]:
        assert f"measure=1, checks={slots}," in job and "priority" not in job


def test_dry_run_with_podman_adds_the_image_build(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["container"]["engine"] = "podman"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "-p", "--configfile", str(tmp_path / "c.yaml"), "--config",
                     f"results_dir={tmp_path}", "backends=[cpu]", "run_name=my-run")
    assert proc.returncode == 0 and "image.json" in proc.stdout, proc.stdout + proc.stderr
    # The image records the tree's commit, whatever the run is named.
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    assert f"FUSEDQK_GIT_COMMIT={commit}" in proc.stdout, proc.stdout


BROKEN = [
    ("unknown top-level key", lambda c: c.update(colour="blue"), "colour"),
    ("unknown backend", lambda c: c.update(backends=["tpu"]), "tpu"),
    ("bad engine", lambda c: c["container"].update(engine="lxc"), "lxc"),
    ("bad type", lambda c: c["backend_settings"]["cpu"]["bench"].update(rounds="many"), "many"),
    ("value out of range", lambda c: c["backend_settings"]["cpu"]["bench"].update(rounds=1), "rounds"),
    ("bad impl", lambda c: c["backend_settings"]["cpu"].update(impls=["turbo"]), "turbo"),
    ("bad bits", lambda c: c["backend_settings"]["cpu"]["quantization"].update(bits=3), "3"),
    ("bad policy", lambda c: c["decision"].update(identity_policy="close"), "close"),
    ("bad run name", lambda c: c.update(run_name="a b"), "a b"),
    ("unknown model", lambda c: c["backend_settings"]["cpu"].update(models=["qwen3-nope"]),
     "'qwen3-nope' is not a registry model"),
    ("path as model", lambda c: c["backend_settings"]["cpu"].update(models=["../../etc"]),
     "'../../etc' is not accepted; a model name is"),
    ("too many rounds", lambda c: c["backend_settings"]["cpu"]["bench"].update(rounds=10**12),
     "maximum of 10000"),
    ("min_gain too large", lambda c: c["decision"].update(min_gain=1e9), "maximum of 1"),
    ("max_measure_s not a number", lambda c: c["backend_settings"]["cpu"]["bench"].update(
        target_half_width=0.01, max_measure_s="soon"), "backend_settings.cpu.bench.max_measure_s"),
    ("max_rounds below rounds", lambda c: c["backend_settings"]["cpu"]["bench"].update(
        rounds=5, max_rounds=3, target_half_width=0.01), "max_rounds 3 is below rounds 5"),
    ("absent backend", lambda c: c.update(backends=["cuda"]), "give device_label too"),
    ("a model twice", lambda c: c["backend_settings"]["cpu"].update(models=["qwen3-tiny"] * 2),
     "names qwen3-tiny more than once"),
    # README.md is a file in every checkout: a results or checkpoints folder cannot be it.
    ("results_dir a file", lambda c: c.update(results_dir=str(ROOT / "README.md")),
     "results_dir"),
    ("results_dir under a file", lambda c: c.update(results_dir=str(ROOT / "README.md" / "r")),
     "is a file, not a folder"),
    ("checkpoints_dir a file", lambda c: c.update(checkpoints_dir=str(ROOT / "README.md")),
     "checkpoints_dir"),
    ("run_name too long", lambda c: c.update(run_name="r" * 300), "run_name"),
    ("device_label too long", lambda c: c.update(device_label="d" * 300), "device_label"),
]


@pytest.mark.parametrize("what, breaks, needle", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_config_stops_before_any_job_with_one_line(what, breaks, needle, tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    breaks(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", str(path))
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "config error" in ln]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_nested_numbers_and_booleans_on_the_command_line_validate_as_such(tmp_path):
    proc = snakemake("-n", "--config", "backend_settings={cpu: {bench: {rounds: 5}}}",
                     f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for flag in ("false", "True"):  # nested booleans too, as YAML spells them
        proc = snakemake("-n", "--config", f"results_dir={tmp_path}", "backend_settings={cpu: "
                         f"{{identity: {{cudnn_sdpa: {flag}, concurrent_controls: {flag}}}}}}}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = snakemake("-n", "--config", f"results_dir={tmp_path}",
                     "backend_settings={cpu: {identity: {cudnn_sdpa: no}}}")
    assert proc.returncode != 0 and "cudnn_sdpa: 'no' is not of type 'boolean'" in proc.stderr
    proc = snakemake("-n", "--config", "decision={min_gain: nan}", f"results_dir={tmp_path}")
    assert proc.returncode != 0 and "decision.min_gain: 'nan' is not of type 'number'" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_overrides_merge_key_by_key_over_the_base_configuration(tmp_path):
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "f": [1, 2]}
    merged = plan.merge_config(base, {"a": {"c": {"d": 9}}, "f": [3], "g": "new"})
    assert merged == {"a": {"b": 1, "c": {"d": 9, "e": 3}}, "f": [3], "g": "new"}
    assert base["a"]["c"]["d"] == 2  # the base is left as it was
    (tmp_path / "base.yaml").write_text((ROOT / "config/config.yaml").read_text())
    schema = str(ROOT / "workflow/schemas/config.schema.yaml")
    got = plan.workflow_config(str(tmp_path / "base.yaml"),
                               {"backend_settings": {"cpu": {"bench": {"rounds": "7"}}}}, schema)
    assert got["backend_settings"]["cpu"]["bench"]["rounds"] == 7  # text from --config, a number
    assert got["backend_settings"]["cpu"]["models"] == ["qwen3-tiny", "qwen3-moe-tiny"]
    with pytest.raises(plan.ConfigError) as refused:
        plan.workflow_config(str(tmp_path / "base.yaml"),
                             {"backend_settings": {"cpu": {"bench": {"rounds": "seven"}}}}, schema)
    assert str(refused.value).startswith("config error: backend_settings.cpu.bench.rounds: ")


def test_the_round_limit_rule_is_spelled_by_each_interface():
    from fusedqk.results import BenchSettings

    as_flag = "--{}".format
    assert BenchSettings(rounds=5, max_rounds=9, target_half_width=0.01).round_limit_problem() is None
    assert BenchSettings(rounds=5).round_limit_problem() is None
    low = BenchSettings(rounds=5, max_rounds=3, target_half_width=0.01)
    assert low.round_limit_problem() == ("max_rounds 3 is below rounds 5; accepted: at least "
                                         "rounds")
    assert low.round_limit_problem(as_flag).startswith("--max_rounds 3 is below --rounds 5")
    alone = BenchSettings(rounds=5, max_rounds=9).round_limit_problem()
    assert alone == "max_rounds: only with target_half_width (otherwise rounds is the count)"
    timed = BenchSettings(rounds=5, max_measure_s=60).round_limit_problem(as_flag)
    assert timed == "--max_measure_s: only with --target_half_width (otherwise --rounds is the count)"


def test_the_cuda_bench_job_carries_every_round_limit_of_the_configuration():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    args = plan.job_args(config["backend_settings"]["cuda"], "cuda", "bench")
    flags = ("-r", "--target-half-width", "--max-rounds", "--max-measure-s")
    assert {flag: args[args.index(flag) + 1] for flag in flags} == {
        "-r": "6", "--target-half-width": "0.01", "--max-rounds": "40",
        "--max-measure-s": "60"}


def test_a_missing_key_is_one_line(tmp_path):
    """--configfile merges over config/config.yaml, so run where that file itself lacks a key."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    del cfg["decision"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--snakefile", str(ROOT / "Snakefile"), cwd=tmp_path)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "config error" in ln]
    assert proc.returncode != 0 and len(lines) == 1 and "decision" in lines[0], proc.stderr


def test_a_malformed_config_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("backends: [cpu\nmodels: {\n")
    proc = snakemake("-n", "--snakefile", str(ROOT / "Snakefile"), cwd=tmp_path)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()
             and not ln.startswith("Using workflow specific profile")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("config error: config/config.yaml is not valid YAML") and \
        "line 2" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snakemake", "config"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["config"]


@pytest.mark.slow
def test_an_absent_backend_fails_with_a_clear_message(tmp_path):
    proc = snakemake("--cores", "1", "--config", "backends=[cuda]", f"results_dir={tmp_path}",
                     "device_label=absent")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "backend 'cuda' is not available on this machine" in out
    assert not list(tmp_path.rglob("environment.json"))


@pytest.mark.slow
def test_embedded_default_runs_end_to_end_and_archives(tmp_path):
    proc = snakemake("--cores", "all", "--config", f"results_dir={tmp_path}", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("cpu-*/*") if p.is_dir()]
    for name in ("config.yaml", "environment.json", "trials.csv", "summaries.csv",
                 "decisions.json", "report.md", "report.html", "MANIFEST.sha256"):
        assert (run / name).is_file(), name
    assert archive.verify(run) == []
    text = (run / "report.md").read_text()
    assert "## Recommendation" in text and "qwen3-moe-tiny" in text and "EQUAL" in text
    assert "Speedup: geometric mean over rounds" in text
    assert "Rounds per model:\n- qwen3-moe-tiny: 5 rounds (fixed)\n- qwen3-tiny: 5 rounds (fixed)" in text \
        or "Rounds per model:\n- qwen3-tiny: 5 rounds (fixed)\n- qwen3-moe-tiny: 5 rounds (fixed)" in text
    before = (run / "report.md").read_bytes()
    subprocess.run([sys.executable, "-m", "fusedqk", "report", "--from", str(run), "--rewrite"],
                   check=True)
    assert (run / "report.md").read_bytes() == before
    assert archive.verify(run) == []


@pytest.mark.slow
def test_a_run_whose_every_model_fails_is_still_reported_and_sealed(tmp_path):
    # An engine whose every run fails: every measurement job fails and records why.
    fails = ["{python}", "-c", "import sys; sys.exit('error: no cpu version of this engine')"]
    engine = {"name": "always-fails", "arms": {"graph": {"env": {"X": "0"}}, "fused": {"env": {"X": "1"}}},
              "bench": {"command": fails, "regex": {"decode_tok_s": "(?P<value>[0-9.]+) tok/s"}},
              "identity": {"command": fails, "compare": "text", "generated": "(?P<value>.*)"},
              "models": {"qwen3-tiny": "export", "qwen3-moe-tiny": "export"}}
    (tmp_path / "fails.yaml").write_text(json.dumps(engine))
    proc = snakemake("--cores", "1", "--config", f"results_dir={tmp_path}", "run_name=all-fail",
                     f"checkpoints_dir={tmp_path}/ckpt",
                     f"backend_settings={{cpu: {{engine: {tmp_path}/fails.yaml}}}}")
    out = proc.stdout + proc.stderr  # the last step's lines, teed from its log
    assert proc.returncode != 0
    assert "fusedqk: failed:" in out and "qwen3-moe-tiny" in out
    (run,) = tmp_path.glob("cpu-*/all-fail")
    assert archive.verify(run) == []
    decision = archive.read_json(run / "decisions.json")["backends"]["cpu"]
    assert decision["recommendation"] == "inconclusive"
    assert "no speedup was measured; qwen3-tiny: failed:" in decision["reason"]  # smallest first
    report = (run / "report.md").read_text()
    assert "## Failed jobs" in report and "no cpu version" in report


@pytest.mark.slow
@pytest.mark.parametrize("engine, model, instrument", [
    ("mlx-lm", "qwen3-moe-tiny", "whole-process"), ("fusedqk-generate", "qwen3-tiny", "whole-process"),
    ("mlxcel", "qwen3-tiny", "whole-process"), ("mlxcel-ignore-eos", "qwen3-tiny", "whole-process"),
    ("mlxcel-server", "qwen3-tiny", "server"), ("mlx-lm-server", "qwen3-tiny", "server")])
def test_the_pipeline_runs_end_to_end_with_an_engine(engine, model, instrument, tmp_path, request,
                                                     monkeypatch):
    # A tiny model through an engine's own command line or server (mlx-lm, its server and
    # fusedqk-generate; mlxcel through its strict stand-in, whose server tests/test_server_engine.py
    # drives): bench, identity, decide, report and manifest; the checkpoint is fusedqk's export.
    if engine.startswith("mlxcel"):
        request.getfixturevalue("fake_mlxcel")
        # The stand-in of the bench binary each file supports (config/engines/facts/mlxcel.yaml).
        monkeypatch.setenv("FAKE_MLXCEL_BENCH", "10bee85" if "ignore-eos" in engine else "56c3d08")
    overlay = {"checkpoints_dir": str(tmp_path / "ckpt"), "backend_settings": {"cpu": {
        "engine": f"config/engines/{engine}.yaml", "models": [model],
        "bench": {"prompt_tokens": 8, "generation_tokens": 16, "rounds": 2, "warmup": 1,
                  "chunk_tokens": 8},
        "identity": {"prompt_tokens": 8, "tokens": 16, "prompts": 1, "cudnn_sdpa": True}}}}
    (tmp_path / "engine.yaml").write_text(yaml.safe_dump(overlay))
    proc = snakemake("--cores", "1", "--configfile", str(tmp_path / "engine.yaml"), "--config",
                     f"results_dir={tmp_path}/results", "backends=[cpu]", "run_name=engine-run",
                     "device_label=test-device")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "results" / "cpu-test-device" / "engine-run"
    assert archive.verify(run) == []
    assert not list(run.glob("*/blockbench"))  # a command engine has no block benchmark
    report = (run / "report.md").read_text()
    name = "mlxcel" if engine == "mlxcel-ignore-eos" else engine
    assert f"Engine: **{name}**" in report and f"Instrument: {instrument}" in report
    bench = archive.read_json(run / model / "bench" / "bench.json", "bench")
    assert bench["format"] == "fusedqk-bench/2" and bench["speedups"][0]["path"] == "fused"
    ident = archive.read_json(run / model / "identity-fused.json", "identity")
    assert ident["verdict"] == "EQUAL", ident["controls"]
    if engine == "mlx-lm-server":  # each server's own line where its arm's expect matched
        confirmed = bench["meta"]["arm_confirmation"]
        assert confirmed["graph"].startswith("fusedqk: model not patched")
        assert confirmed["fused"].startswith("fusedqk: fused QK-norm decode path (composite) on 4")
        assert f"fused `{confirmed['fused']}`" in report


def test_a_scheduled_job_reads_its_plan_from_its_run_directory(tmp_path):
    """Inside a SLURM job the plan is the one the starting host made (its target's run
    directory), not one detected again on the compute node."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    run = f"{tmp_path}/cuda-nvidia-h200/20261201-abc"
    got = plan.plan_for_job(cfg, [run])
    assert (got.backends, got.device_labels, got.run_name) == (["cuda"], {"cuda": "nvidia-h200"},
                                                                "20261201-abc")
    assert got.run_dir("cuda") == run
    with pytest.raises(plan.ConfigError, match="more than one run"):
        plan.plan_for_job(cfg, [run, f"{tmp_path}/cuda-nvidia-h200/other"])
    with pytest.raises(plan.ConfigError, match="is not <results_dir>/<backend>-<device>"):
        plan.plan_for_job(cfg, [f"{tmp_path}/gpu0/x"])


def test_a_job_on_a_node_that_sees_another_device_keeps_the_submitters_plan(tmp_path):
    """A job as the SLURM plugin starts it (remote mode, --target-jobs) for a run directory whose
    device this host would not detect: it plans that run, where detecting again crashed."""
    run = f"{tmp_path}/cpu-login-node-label/r1"
    assert plan.target_runs(["x", "--target-jobs", f"environment:run={run}", "--cores", "1"]) == [run]
    proc = snakemake("--target-jobs", f"environment:run={run}", "--allowed-rules", "environment",
                     "--mode", "remote", "--cores", "1", "-n", "--config",
                     f"results_dir={tmp_path}", "run_name=r1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "environment" in proc.stdout and run in proc.stdout


@pytest.mark.slow
def test_two_pipelines_on_one_machine_never_measure_at_once(tmp_path, small_cpu_workload):
    """Two `snakemake --cores all` with different run names, started together: every measurement
    holds the host's CPU lock (its history says who held it when), no timing measurement overlaps
    another hold, one of them waited, and each report says how long its benches waited."""
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    procs = [subprocess.Popen([*SNAKEMAKE, "--cores", "all", "--config",
                               f"results_dir={tmp_path}/results", f"run_name={name}",
                               small_cpu_workload],
                              cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for name in ("first", "second")]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    holds = [json.loads(line) for line in (tmp_path / "locks/cpu.history").read_text().splitlines()]
    assert len(holds) == 2 * 3  # two runs, one model: bench, identity, blockbench
    # Only identity checks, which hold the lock shared, may overlap.
    for held, other in itertools.combinations(holds, 2):
        overlap = held["acquired"] < other["released"] and other["acquired"] < held["released"]
        assert not overlap or held["mode"] == other["mode"] == "shared", (held, other)
    assert any(h["waited_s"] > 0.5 for h in holds)
    waits = []
    for name in ("first", "second"):
        (report,) = (tmp_path / "results").glob(f"cpu-*/{name}/report.md")
        text = report.read_text()
        assert "waited" in text and "s for the device" in text
        # "Where the time went": | model | job | wall | device wait | ...
        times = text.split("## Where the time went", 1)[1].split("\n## ", 1)[0]
        waits += [row.split("|")[4].strip() for row in times.splitlines()
                  if row.startswith("| qwen3-tiny | ")]
    assert len(waits) == 6 and any(w not in ("—", "0.0") for w in waits), waits


@pytest.mark.parametrize("yaml_text, key", [
    ("backend_settings:\n  cpu:\n    bench: {target_half_width: .nan}\n",
     "backend_settings.cpu.bench.target_half_width"),
    ("backend_settings:\n  cpu:\n    bench: {max_measure_s: .nan}\n",
     "backend_settings.cpu.bench.max_measure_s"),
    ("decision: {min_gain: .nan}\n", "decision.min_gain"),
])
def test_a_nan_in_a_config_file_stops_before_any_job(yaml_text, key, tmp_path):
    """YAML's .nan passes every bound of a schema (no comparison with NaN is true), and later
    left the run unreported and unsealed: refused at start, naming the key."""
    (tmp_path / "nan.yaml").write_text(yaml_text)
    proc = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "nan.yaml"),
                     "--config", f"results_dir={tmp_path}/r")
    assert proc.returncode != 0
    assert f"config error: {key} is not a finite number" in proc.stdout + proc.stderr


def test_a_kernel_impl_on_a_backend_without_the_kernel_stops_before_any_job(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--config", f"results_dir={tmp_path}/r",
                     "backend_settings={cpu: {impls: [kernel]}}")
    assert proc.returncode != 0
    assert "impls names kernel, but cpu has no fused kernel" in proc.stdout + proc.stderr


@pytest.mark.parametrize("setting, needle", [
    ("backend_settings={cpu: {bench: {prompt_tokens: 1048576}}}", "tokens of context is more than"),
    ("cache_dir=/etc/hostname", "is an existing file"),
])
def test_what_would_fail_every_job_stops_before_the_first(setting, needle, tmp_path):
    proc = snakemake("-n", "--cores", "1", "--config", f"results_dir={tmp_path}/r", setting)
    assert proc.returncode != 0 and needle in proc.stdout + proc.stderr


def test_a_second_pipeline_on_a_run_folder_in_use_stops_at_its_start(tmp_path, small_cpu_workload):
    """Two checkouts (two working directories, so Snakemake's own lock does not meet them) naming
    one run folder: the second stops before any job with one line naming the first, and the
    first's run is whole and verifies."""
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    config = ["--config", f"results_dir={tmp_path}/results", "run_name=shared",
              "device_label=test-device", small_cpu_workload]
    first = subprocess.Popen([*SNAKEMAKE, "--cores", "2", *config], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    other = tmp_path / "other-checkout"
    shutil.copytree(ROOT / "config", other / "config")
    lock = tmp_path / "results" / "cpu-test-device" / ".shared.pipeline.lock"
    for _ in range(600):
        if lock.is_file() and lock.read_text():
            break
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.1)
    second = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--cores", "2", *config],
                            cwd=other, env=env, capture_output=True, text=True, timeout=600)
    out = first.communicate(timeout=1800)[0]
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert "is being written by another pipeline" in second.stderr and str(ROOT) in second.stderr
    run = tmp_path / "results" / "cpu-test-device" / "shared"
    assert archive.verify(run) == []


def test_a_link_planted_as_a_run_folders_pipeline_lock_is_refused(tmp_path, small_cpu_workload):
    target = tmp_path / "not-yours"
    target.write_text("keep")
    labelled = tmp_path / "results" / "cpu-test-device"
    labelled.mkdir(parents=True)
    (labelled / ".planted.pipeline.lock").symlink_to(target)
    proc = snakemake("--cores", "1", "--config", f"results_dir={tmp_path}/results",
                     "run_name=planted", "device_label=test-device", small_cpu_workload)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot open its pipeline lock" in proc.stderr
    assert target.read_text() == "keep" and not (labelled / "planted").exists()


def test_models_are_dealt_over_the_gpus_and_pinned_natively_or_in_a_container(monkeypatch):
    models = ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"]
    assert [plan.gpu_of(models, m, ["0", "1"]) for m in models] == ["0", "1", "0"]
    assert plan.gpu_of(models, "qwen3-8b", []) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")  # a scheduler's grant wins over the host
    assert plan.gpu_devices({"devices": "auto", "parallel_timing": False}) == ["2", "3"]
    assert plan.gpu_devices({"devices": [0, "GPU-1a2b"], "parallel_timing": False}) == ["0", "GPU-1a2b"]
    native = ["python", "-m", "fusedqk"]
    assert plan.pinned(native, "1", False) == ["env", "CUDA_VISIBLE_DEVICES=1", *native]
    assert plan.pinned(["podman", "run", "--rm", "img"], "1", True) == \
        ["podman", "run", "-e", "CUDA_VISIBLE_DEVICES=1", "--rm", "img"]
    assert plan.pinned(native, None, False) == native


@pytest.mark.parametrize("parallel", [False, True])
def test_a_cuda_run_pins_each_models_jobs_to_its_gpu(parallel, tmp_path):
    """Dry run of a cuda run on two GPUs (a fake device list): every measuring job of a model
    runs with that model's CUDA_VISIBLE_DEVICES; with gpus.parallel_timing its timing jobs take
    no host-wide slot (the GPU's own lock serialises them), without it one slot as before."""
    proc = snakemake("-n", "-p", "--cores", "4", "--config", "backends=[cuda]",
                     "device_label=two-gpus", f"results_dir={tmp_path}",
                     f"gpus={{devices: [0, 1], parallel_timing: {str(parallel).lower()}}}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    commands = [line for line in out.splitlines() if " -m fusedqk " in line and " -m qwen3" in line]
    pins = {(line.split(" -m qwen3")[1].split()[0], line.split("CUDA_VISIBLE_DEVICES=")[1][0])
            for line in commands}
    assert pins == {("-0.6b", "0"), ("-8b", "1"), ("-30b-a3b", "0")}, pins
    slots = {line.split("measure=")[1].split(",")[0] for line in out.splitlines()
             if "measure=" in line}
    assert slots == ({"0"} if parallel else {"1"})
