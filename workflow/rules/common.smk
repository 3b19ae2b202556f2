# Configuration checks, backend selection, run directories and the command prefix per backend.
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def _one_line_config_error(error):
    """jsonschema's message and the key it is about, on one line."""
    text = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    message = next((ln.split(":", 1)[1].strip() for ln in text if ln.startswith("ValidationError")),
                   text[-1])
    where = next((ln.split("On instance", 1)[1].strip(" :") for ln in text if "On instance" in ln),
                 "")
    key = ".".join(re.findall(r"\['([^']+)'\]", where)) or "config"
    return f"config error: {key}: {message}"


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as e:
    sys.stderr.write(_one_line_config_error(e.args[0] if e.args else e) + "\n")
    sys.exit(1)


def detect_backends():
    """What this machine has, without importing MLX (a container may hold it instead)."""
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return ["cuda"]
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return ["metal"]
    return ["cpu"]


BACKENDS = detect_backends() if config["backends"] == "auto" else list(config["backends"])
for _b in BACKENDS:
    if _b not in config["backend_settings"]:
        sys.stderr.write(f"config error: backends lists {_b!r} but backend_settings has no {_b!r} entry\n")
        sys.exit(1)
ENGINE = config["container"]["engine"]

# Measurements must never share a device (or the CPU) with each other: one `measure` slot,
# unless a profile or --resources grants more (the SLURM profile does: one GPU per job there).
if "measure" not in workflow.global_resources:
    workflow.register_resource("measure", 1)


def _git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def _source_state():
    """(commit date, <commit>[-dirty]) of this tree: the same in every process of a run (a
    cluster job parses this file again), unlike the clock. Edits during a run would change it:
    do not."""
    try:
        commit = _git("rev-parse", "--short=10", "HEAD")
        day = _git("log", "-1", "--format=%cd", "--date=format:%Y%m%d")
        dirty = "-dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""
        return day, f"{commit}{dirty}"
    except (OSError, subprocess.CalledProcessError):
        return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}", "nogit"


SOURCE_DAY, GIT_COMMIT = _source_state()
# auto: <commit date>-<commit>[-dirty]; a named run keeps its name (the images still record
# GIT_COMMIT, never a piece of the name).
RUN_NAME = config["run_name"] if config["run_name"] != "auto" else f"{SOURCE_DAY}-{GIT_COMMIT}"


def _device_label(backend):
    if config["device_label"] != "auto":
        return config["device_label"]
    if backend == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        name = out[0] if out else "gpu"
    elif backend == "metal":
        name = platform.machine() + "-" + (platform.mac_ver()[0] or "mac")
    elif backend == "cpu":
        name = platform.machine()
    else:
        name = "unknown-device"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def run_dir(backend):
    return f"{config['results_dir']}/{backend}-{_device_label(backend)}/{RUN_NAME}"


def settings(backend):
    return config["backend_settings"][backend]


def model_flags(backend):
    q = settings(backend)["quantization"]
    return f"--backend {backend} --bits {q['bits']} --group-size {q['group_size']} --dtype {q['dtype']}"


def bench_length_flags(backend):
    """-r, plus the adaptive-length flags where the backend's config sets a target."""
    b = settings(backend)["bench"]
    flags = f"-r {b['rounds']}"
    if "target_half_width" in b:
        flags += f" --target-half-width {b['target_half_width']}"
        if "max_rounds" in b:  # else the command's default
            flags += f" --max-rounds {b['max_rounds']}"
    return flags


def image_tag(backend):
    return f"localhost/fusedqk-{backend}:{RUN_NAME}"


def uses_container(backend):
    # Metal cannot run in a container: it always runs natively on the macOS host.
    return ENGINE != "none" and backend != "metal"


# Native runs use the Python that runs Snakemake, so an unactivated virtual environment works.
FUSEDQK_NATIVE = f"{shlex.quote(sys.executable)} -m fusedqk"


def fusedqk(backend):
    """The command that runs `fusedqk` for this backend: natively, or inside its image."""
    if not uses_container(backend):
        return FUSEDQK_NATIVE
    c = config["container"]
    args = [ENGINE, "run", "--rm", *c["run_args"]]
    if backend == "cuda":
        args += c["gpu_args"]
    # Rules name result paths as given (relative to here, or absolute): mount them the same way.
    results = config["results_dir"]
    inside = results if os.path.isabs(results) else f"{c['workdir']}/{results}"
    args += ["-v", f"{os.path.abspath(results)}:{inside}", "-w", c["workdir"], "-e", f"FUSEDQK_IMAGE_ID={image_tag(backend)}", image_tag(backend),
             "fusedqk"]
    return shlex.join(args)


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


def measurements(run):
    """Every per-model status file of a run: the inputs of its aggregate step."""
    b = RUNS[run]
    s = settings(b)
    out = []
    for m in s["models"]:
        out += [f"{run}/{m}/status-{job}.json" for job in ("bench", "identity", "blockbench")]
    return out
