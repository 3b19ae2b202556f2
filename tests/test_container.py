"""The images: the cpu image built with podman from a local Debian base and the pipeline's jobs
run inside it; the cuda image built from a local Ubuntu 24.04 base, with the C++ primitive, its
self-check passing inside it on this GPU-less host, and the primitive copied out.

Needs root, podman, runc and debootstrap (.ci/run installs them from Debian's packages) and
PyPI for the build; skipped with the reason where any is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusedqk import archive

ROOT = Path(__file__).resolve().parent.parent
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE = "localhost/fusedqk-base:bookworm"
CUDA_BASE = "localhost/fusedqk-base:noble"
CUDA_IMAGE = "localhost/fusedqk-cuda:test"
# What podman's run needs on this machine kind (its default runtime and limits fail here); mlx-lm
# raises its open-file limit to (2048, 4096) at import, so the hard limit must allow it.
RUN_ARGS = ["--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
BUILD_ARGS = ["--runtime", "runc", "--network", "host"]


def _podman_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    return None


pytestmark = [pytest.mark.container, pytest.mark.slow,
              pytest.mark.skipif(_podman_works() is not None, reason=str(_podman_works()))]


def _base(tag: str, suite: str) -> None:
    if subprocess.run(["podman", "image", "exists", tag]).returncode != 0:
        subprocess.run([str(ROOT / "containers/make-base.sh"), "podman", tag, suite], check=True,
                       timeout=900)


def test_cpu_image_builds_and_runs_the_tiny_pipeline(tmp_path):
    _base(BASE, "bookworm")
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["backends"] = ["cpu"]
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["container"].update(
        engine="podman", build_args=BUILD_ARGS,
        run_args=[*RUN_ARGS, "--network", "none"],
        ca_bundle=CA_BUNDLE if Path(CA_BUNDLE).is_file() else None)
    tiny = cfg["backend_settings"]["cpu"]
    tiny.update(models=["qwen3-tiny"], bench=dict(prompt_tokens=8, generation_tokens=8, rounds=2,
                                                  warmup=1, chunk_tokens=4),
                identity=dict(prompt_tokens=8, tokens=8, prompts=1), blockbench=dict(reps=2))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                           str(tmp_path / "c.yaml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (run,) = [p for p in (tmp_path / "results").glob("cpu-*/*") if p.is_dir()]
    image = json.loads((run / "image.json").read_text())
    env = json.loads((run / "environment.json").read_text())
    assert env["container_image_id"] and env["backend"] == "cpu"
    assert image
    assert json.loads((run / "qwen3-tiny" / "status-bench.json").read_text())["ok"]
    assert archive.verify(run) == []



def test_cuda_image_builds_the_primitive_and_checks_itself_without_a_gpu(tmp_path):
    _base(CUDA_BASE, "noble")
    secret = (["--secret", f"id=ca,src={CA_BUNDLE}"] if Path(CA_BUNDLE).is_file() else [])
    build = subprocess.run(
        ["podman", "build", *BUILD_ARGS, *secret,
         "--build-arg", f"BASE={CUDA_BASE}", "--build-arg", "CUDA_TARGETS=80,90",
         "-t", CUDA_IMAGE, "-f", "containers/cuda/Dockerfile", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    # The build stage ran the doctor: its lines are in the build's output, unless podman took
    # that step whole from its layer cache (a rerun on this machine with nothing changed).
    step = build.stdout[build.stdout.index("fusedqk build-ext"):]
    cached = step.split("\n", 2)[1].startswith("--> Using cache")
    assert cached or "NVRTC compiles the kernel_kv unit for sm_90: " in step
    run = ["podman", "run", "--rm", *RUN_ARGS, "--network", "none", CUDA_IMAGE]

    doctor = subprocess.run([*run, "fusedqk", "doctor", "--targets", "90", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-3000:]
    report = json.loads(doctor.stdout)
    checks = {c["what"]: c for c in report["checks"]}
    assert report["ok"] and checks["C++ primitive"]["ok"]
    assert checks["C++ primitive built against the installed MLX"]["ok"]
    assert "sm_80, sm_90" in checks["C++ primitive built against the installed MLX"]["detail"]
    for header in ("cuda_bf16.h", "cuda_fp16.h", "cooperative_groups.h"):
        assert checks[f"header {header}"]["ok"]
    assert checks["NVRTC compiles the kernel unit for sm_90"]["ok"]
    # No GPU here: the driver's library and the GPU are named as absent, not as failures.
    driver = checks["libmlx.so needs libcuda.so.1"]
    assert not driver["ok"] and not driver["required"] and "driver" in driver["detail"]
    assert not checks["GPU"]["ok"] and not checks["GPU"]["required"]
    assert all(c["ok"] for c in report["checks"] if c["required"])

    # On this host `fusedqk doctor --require-gpu` fails, and `fusedqk env` says why in one line.
    strict = subprocess.run([*run, "fusedqk", "doctor", "--require-gpu"], capture_output=True,
                            text=True, timeout=300)
    assert strict.returncode == 1 and "MISSING  GPU: no GPU here" in strict.stdout
    env = subprocess.run([*run, "fusedqk", "env", "--backend", "cuda"], capture_output=True,
                         text=True, timeout=300)
    assert env.returncode == 2 and "Traceback" not in env.stderr
    (line,) = env.stderr.strip().splitlines()
    assert "libcuda.so.1" in line and "no NVIDIA driver" in line and "fusedqk doctor" in line

    # The primitive comes out of the image with its build record (for a GPU host, natively).
    copied = subprocess.run(["containers/copy-primitive.sh", "podman", CUDA_IMAGE,
                             str(tmp_path / "primitive")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RUN_ARGS": " ".join(RUN_ARGS)})
    assert copied.returncode == 0, copied.stderr
    module, = (tmp_path / "primitive").glob("_fusedqk_cuda.cpython-312-*.so")
    assert module.read_bytes()[:4] == b"\x7fELF"
    record = json.loads((tmp_path / "primitive" / "_fusedqk_cuda.json").read_text())
    assert record["mlx"] == "0.32.4" and record["python"].startswith("3.12")
    assert record["checked_targets"] == ["sm_80", "sm_90"]
