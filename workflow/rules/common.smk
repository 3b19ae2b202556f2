# Configuration checks, backend selection, run directories and the command prefix per backend.
import json
import os
import re
import shlex
import sys

from fusedqk import plan


# The configuration and the run's plan (backends, device labels, run name, job flags) are the
# package's: fusedqk/plan.py. config/config.yaml (relative to the working directory) is the base,
# overridden by what --configfile and --config gave (already in `config`), as a `configfile:`
# directive would do, but with one line for a bad file or key. The plan is made once, on the host
# that starts the workflow; a job a scheduler runs reads it back from the run directory its
# target names (`--target-jobs rule:run=...` on its command line), and detects nothing.
try:
    _merged = plan.workflow_config("config/config.yaml", config,
                                   os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"))
    config.clear()
    config.update(_merged)
    PLAN = plan.start(config, sys.argv if workflow.remote_exec else None)
    # The GPUs cuda jobs are dealt over (gpus.devices; auto: what this host, or a scheduler's
    # grant, shows), on cuda runs only.
    GPUS = plan.gpu_devices(config["gpus"]) if "cuda" in PLAN.backends else []
except plan.ConfigError as e:
    sys.stderr.write(f"{e}\n")
    sys.exit(1)
BACKENDS = PLAN.backends
GIT_COMMIT = PLAN.git_commit
RUN_NAME = PLAN.run_name
ENGINE = config["container"]["engine"]


# Before the first job of a real run (never in a dry run): one pipeline per run folder.
onstart:
    if workflow.is_main_process:
        try:
            plan.claim_runs([PLAN.run_dir(b) for b in BACKENDS])
        except plan.ConfigError as e:
            sys.stderr.write(f"{e}\n")
            sys.exit(1)


# Timing measurements must never share a device (or the CPU): one `measure` slot, unless a
# profile or --resources grants more (the SLURM profile does: one GPU per job there). Identity
# checks compare bits, so up to three run together (`checks`); the device lock keeps them apart
# from timing measurements (fusedqk/devicelock.py).
for slot, default in (("measure", 1), ("checks", 3)):
    if slot not in workflow.global_resources:
        workflow.register_resource(slot, default)
# Where jobs run on this host, a timing job also takes every `checks` slot, so it never starts
# beside a check, and the checks (priority 1) go first: left to the lock, a timing job that
# started with them could win it and make them wait (the H200 pipeline of 2026-12-03 lost
# five minutes so). A cluster spreads jobs over nodes, each with its own lock.
CHECKS_PER_TIMING_JOB = workflow.global_resources["checks"].value if workflow.local_exec else 0


def run_dir(backend):
    return PLAN.run_dir(backend)


def settings(backend):
    return config["backend_settings"][backend]


def job_flags(job):
    """A rule's `fusedqk <job>` flags, from the plan (one helper for every measurement rule)."""
    return lambda w: plan.job_flags(settings(backend_of(w)), backend_of(w), job,
                                    config.get("checkpoints_dir"))


def image_tag(backend):
    return f"localhost/fusedqk-{backend}:{RUN_NAME}"


def uses_container(backend):
    # Metal cannot run in a container: it always runs natively on the macOS host.
    return ENGINE != "none" and backend != "metal"


# Native runs use the Python that runs Snakemake, so an unactivated virtual environment works.
FUSEDQK_NATIVE = shlex.join(plan.native_command(sys.executable, config["cache_dir"]))


def fusedqk(backend):
    """The command that runs `fusedqk` for this backend: natively, or inside its image."""
    if not uses_container(backend):
        return FUSEDQK_NATIVE
    return shlex.join(plan.container_command(config["container"], backend, image_tag(backend),
                                             config["results_dir"], config["cache_dir"]))


def job_fusedqk(wildcards):
    """`fusedqk` for one model's measuring job: on cuda, pinned to that model's GPU."""
    backend = backend_of(wildcards)
    gpu = plan.gpu_of(settings(backend)["models"], wildcards.model, GPUS) \
        if backend == "cuda" else None
    if not uses_container(backend):
        base = plan.native_command(sys.executable, config["cache_dir"])
    else:
        base = plan.container_command(config["container"], backend, image_tag(backend),
                                      config["results_dir"], config["cache_dir"])
    return shlex.join(plan.pinned(base, gpu, uses_container(backend)))


def image_stamp(backend):
    """The image stamp a measurement waits for (nothing when running natively)."""
    return [f"{run_dir(backend)}/image.json"] if uses_container(backend) else []


if ENGINE != "none" and "metal" in BACKENDS:
    sys.stderr.write("note: metal runs natively on the macOS host; no container image for it\n")


RUNS = {run_dir(b): b for b in BACKENDS}


wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS) or "no-run",
    model="[A-Za-z0-9._-]+",


def backend_of(wildcards):
    return RUNS[wildcards.run]


def measuring_resources(job, runtime, slot="measure"):
    """What a measuring job asks a scheduler for: its slot on the host (`measure` for timing,
    `checks` for identity), a GPU on cuda, memory for its model (plan.job_mem_mb), the whole
    node on cpu (plan.exclusive_flag)."""
    # gpus.parallel_timing: a cuda timing job takes no host-wide slot; the lock of its own GPU
    # (fusedqk.devicelock) keeps each GPU to one timing measurement.
    parallel = config["gpus"]["parallel_timing"] and slot == "measure"
    return {
        slot: lambda w: 0 if parallel and backend_of(w) == "cuda" else 1,
        **({"checks": lambda w: 0 if parallel and backend_of(w) == "cuda"
            else CHECKS_PER_TIMING_JOB} if slot == "measure" else {}),
        "gpu": lambda w: int(backend_of(w) == "cuda"),
        "runtime": runtime,
        "mem_mb": lambda w: plan.job_mem_mb(w.model, job),
        "slurm_extra": lambda w: plan.exclusive_flag(backend_of(w)),
    }


def measurements(run):
    """Every per-model status file of a run: the inputs of its aggregate step."""
    b = RUNS[run]
    s = settings(b)
    out = []
    for m in s["models"]:
        out += [f"{run}/{m}/status-{job}.json" for job in plan.measurements(s)]
    return out
