"""The cpu image: built with podman from a local Debian base, the pipeline's jobs run inside it.

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


def _podman_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    return None


pytestmark = [pytest.mark.container, pytest.mark.slow,
              pytest.mark.skipif(_podman_works() is not None, reason=str(_podman_works()))]


def test_cpu_image_builds_and_runs_the_tiny_pipeline(tmp_path):
    have = subprocess.run(["podman", "image", "exists", BASE]).returncode == 0
    if not have:
        subprocess.run([str(ROOT / "containers/make-base.sh"), "podman", BASE], check=True,
                       timeout=900)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["backends"] = ["cpu"]
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["container"].update(
        engine="podman", build_args=["--runtime", "runc", "--network", "host"],
        # mlx-lm raises its open-file limit to (2048, 4096) at import: the hard limit must allow it.
        run_args=["--runtime", "runc", "--network", "none", "--ulimit", "nofile=4096:4096",
                  "--ulimit", "nproc=4096:4096"],
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
