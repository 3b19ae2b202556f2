"""`fusedqk doctor` where MLX's CUDA build is absent (this CPU host), and its parts on their own.

Inside the cuda image, on this GPU-less host, tests/test_container.py runs it for real.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusedqk import doctor
from fusedqk.cli import main, mlx_unloadable


def test_a_host_without_mlx_cuda_is_told_so_in_one_check(capsys):
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("MISSING  MLX's CUDA build: mlx-cuda-13 is not installed")
    assert out[-1] == "cuda backend: 1 missing: MLX's CUDA build"


def test_json_names_its_format_and_every_check(capsys):
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "fusedqk-doctor/1" and report["ok"] is False
    assert report["checks"][0] == {"what": "MLX's CUDA build", "ok": False, "required": True,
                                   "detail": report["checks"][0]["detail"]}


@pytest.mark.parametrize("value", ["x", "", "90,", "sm_", "5", "9000", "90;rm"])
def test_bad_targets_are_one_line(value, capsys):
    assert main(["doctor", "--targets", value]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--targets" in line and "e.g. 90 or 80,90,100" in line


def test_targets_take_sm_numbers_with_or_without_the_prefix():
    assert doctor.parse_targets("90") == [90]
    assert doctor.parse_targets("sm_80, 90,100") == [80, 90, 100]


def test_only_the_cuda_backend_is_checked(capsys):
    assert main(["doctor", "--backend", "cpu"]) == 2
    assert "invalid choice: 'cpu'" in capsys.readouterr().err


def test_headers_are_looked_up_where_mlx_looks(tmp_path, monkeypatch):
    root = tmp_path / "site" / "mlx"
    (root / "include" / "cccl").mkdir(parents=True)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    assert doctor.cuda_include_dirs(root) == [root / "include" / "cccl",
                                              tmp_path / "toolkit" / "include"]
    # The nvidia-cuda-runtime wheel's headers beside the mlx package come first.
    (tmp_path / "site" / "nvidia" / "cu13" / "include").mkdir(parents=True)
    assert doctor.cuda_include_dirs(root)[-1] == tmp_path / "site" / "nvidia" / "cu13" / "include"
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    shutil.rmtree(tmp_path / "site" / "nvidia")
    assert doctor.cuda_include_dirs(root)[-1] == Path("/usr/local/cuda/include")


def test_libraries_are_resolved_by_the_dynamic_loader():
    found = doctor.resolve_libraries(Path(sys.executable).resolve())
    libc = [path for name, path in found.items() if name.startswith("libc.so")]
    assert libc and Path(libc[0]).exists()


def test_a_missing_library_is_a_failure_and_the_missing_driver_only_where_required(monkeypatch):
    monkeypatch.setattr(doctor, "resolve_libraries",
                        lambda binary, loaded_from=None: {"libc.so.6": "/lib/libc.so.6", "libcuda.so.1": None,
                                        "libcudnn.so.9": None})
    checks = {c.what: c for c in doctor._library_checks(Path("x"), "x", driver_required=False)}
    assert checks["x needs libc.so.6"].ok
    assert not checks["x needs libcuda.so.1"].ok and not checks["x needs libcuda.so.1"].required
    assert checks["x needs libcudnn.so.9"].required and not checks["x needs libcudnn.so.9"].ok
    strict = doctor._library_checks(Path("x"), "x", driver_required=True)
    assert all(c.required for c in strict)
    text = doctor.render(list(checks.values()))
    assert text.splitlines()[-1] == "cuda backend: 1 missing: x needs libcudnn.so.9"
    assert "absent   x needs libcuda.so.1: the NVIDIA driver's library" in text


def test_the_primitive_is_reported_missing_with_what_then_happens():
    (check,) = [c for c in doctor.primitive_checks(False) if c.what == "C++ primitive"]
    assert not check.ok and "mx.fast.cuda_kernel" in check.detail


def test_mlx_that_cannot_find_the_driver_is_one_line_naming_the_doctor():
    e = ImportError("libcuda.so.1: cannot open shared object file: No such file or directory",
                    name="mlx.core")
    line = mlx_unloadable(e)
    assert "\n" not in line and "no NVIDIA driver" in line and "fusedqk doctor" in line


def test_the_command_line_says_so_when_mlx_cannot_load(tmp_path):
    """A stand-in mlx.core that fails as MLX's CUDA build does on a host without the driver."""
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "__init__.py").write_text("")
    (tmp_path / "mlx" / "core.py").write_text(
        "raise ImportError('libcuda.so.1: cannot open shared object file: No such file or "
        "directory', name='core', path=__file__)\n")
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "env", "--backend", "cuda"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fusedqk: error: MLX's CUDA build cannot load here (libcuda.so.1")


def test_env_for_cuda_on_a_cpu_host_is_one_line_pointing_at_the_doctor(capsys):
    assert main(["env", "--backend", "cuda"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "backend 'cuda' is not available on this machine" in line and "fusedqk doctor" in line
