"""The pipeline through a real SLURM: Debian's slurm-wlm on this one machine (tests/slurm/cluster.sh
starts munge, MariaDB, slurmdbd, slurmctld and slurmd by hand), the tiny cpu models, the
documented profile `workflow/profiles/slurm` and one site setting (SBATCH_PARTITION).

Asserted: every measurement and the environment job ran as its own SLURM job, the bookkeeping
ran locally, no two measurement jobs overlapped in time, a measurement job cancelled with
scancel fails the run (the profile's status command sees it), and the same command run again
finishes a run that verifies. Skipped, with the reason, where SLURM's daemons are not installed
or this is not root (tests/run.sh installs them when run as root).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from fusedqk import archive

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests/slurm/cluster.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
MEASURING = ("bench", "identity", "blockbench")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="starts SLURM's daemons: needs root"),
    pytest.mark.skipif(not all(shutil.which(d) for d in ("slurmctld", "slurmd", "slurmdbd",
                                                         "munged", "mariadbd")),
                       reason="SLURM's daemons are not installed (tests/slurm/cluster.sh install)"),
]


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's temporary folders: those are private to root, and MariaDB runs as mysql.
    state = Path(tempfile.mkdtemp(prefix="fusedqk-slurm-"))
    try:
        started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], timeout=300,
                                 capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def pipeline(results: Path, workload: str) -> list[str]:
    # Status checks every 2 s: at the profile's 10 s, waiting to notice that a job ended was most
    # of this test's time (each of its short jobs waits once).
    return [*SNAKEMAKE, "--workflow-profile", "workflow/profiles/slurm",
            "--seconds-between-status-checks", "2", "--slurm-init-seconds-before-status-checks", "2",
            "--config", f"results_dir={results}", "run_name=slurm", workload]


def site_env() -> dict[str, str]:
    return {**os.environ, "SBATCH_PARTITION": "debug"}


def sacct_jobs(since: str) -> list[dict]:
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-S", since, "-o",
                          "JobID,Comment%300,State,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        job_id, comment, state, start, end = line.split("|")
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        jobs.append({"id": job_id, "rule": rule, "state": state, "start": start, "end": end})
    return jobs


def running_measurement(timeout: float = 300) -> dict:
    """The first measurement job squeue shows running (sacct has a job's comment only once it
    has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            job_id, comment, state = line.split("|")
            rule = comment.removeprefix("rule_").split("_wildcards_")[0]
            if rule in MEASURING and state == "RUNNING":
                return {"id": job_id, "rule": rule}
        time.sleep(1)
    raise AssertionError("no measurement job started running")


def test_pipeline_through_slurm_cancel_and_rerun(cluster, tmp_path, small_cpu_workload):
    since = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    results = tmp_path / "results"
    first = subprocess.Popen(pipeline(results, small_cpu_workload), cwd=ROOT, env=site_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        victim = running_measurement()
        subprocess.run(["scancel", victim["id"]], check=True)
        out, _ = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode != 0, out[-3000:]
    assert "CANCELLED" in out, out[-3000:]

    rerun = subprocess.run(pipeline(results, small_cpu_workload), cwd=ROOT, env=site_env(), text=True,
                           capture_output=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (run,) = [p for p in results.glob("cpu-*/slurm") if p.is_dir()]
    assert archive.verify(run) == []

    jobs = sacct_jobs(since)
    rules = sorted(j["rule"] for j in jobs if j["state"] == "COMPLETED")
    # One environment job and the model's three measurements, each its own SLURM job; the
    # bookkeeping (aggregate, decide, report, manifest, failures) on the submitting host.
    assert rules == sorted(["environment", *MEASURING]), jobs
    assert [j["rule"] for j in jobs if j["state"].startswith("CANCELLED")] == [victim["rule"]]
    spans = sorted((j["start"], j["end"]) for j in jobs if j["rule"] in MEASURING
                   and j["start"] not in ("", "None", "Unknown"))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two measurement jobs overlapped: {spans}"
