"""Sealed archives cannot be fooled or changed in place, the report escapes what it shows, and
the device lock cannot be slipped. Each bad case: a non-zero exit, one line naming the input, no
traceback, and the sealed archive unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, committed_archives

from fusedqk import archive, compare, report
from fusedqk.errors import UserError

CPU = committed_archives("cpu-*/*")[-1]


@pytest.fixture
def sealed(tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(CPU, copy)
    assert archive.verify(copy) == []
    return copy


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): _digest(p) for p in sorted(run.rglob("*")) if p.is_file()}


def fusedqk(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedqk", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("line, why", [
    (f"{hashlib.sha256(b'x').hexdigest()}  /etc/hostname", "outside the run (an absolute path)"),
    (f"{hashlib.sha256(b'x').hexdigest()}  ../../../../etc/passwd", "outside the run (a .. component)"),
    (f"{hashlib.sha256(b'x').hexdigest()}  ./summaries.csv", "not a normalised path"),
    (f"{hashlib.sha256(b'x').hexdigest()}  a//b", "not a normalised path"),
    ("not-a-digest  summaries.csv", "not a '<sha256>  <path>' line"),
])
def test_a_manifest_entry_outside_the_run_fails_verification(sealed, line, why):
    with (sealed / archive.MANIFEST).open("a") as f:
        f.write(line + "\n")
    problems = archive.verify(sealed)
    assert any(why in p for p in problems), problems
    proc = fusedqk("verify", str(sealed))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="does not match"):
        compare.summarize(sealed)
    with pytest.raises(UserError, match="does not match"):
        report.render_run(sealed, sealed.parent / "elsewhere")


def _symlink_file(run: Path) -> None:
    target = run.parent / "outside.csv"
    shutil.copy(run / "summaries.csv", target)
    (run / "summaries.csv").unlink()
    (run / "summaries.csv").symlink_to(target)


def _symlink_folder(run: Path) -> None:
    model = next(p for p in run.iterdir() if p.is_dir() and (p / "status-bench.json").is_file())
    outside = run.parent / "outside-model"
    shutil.move(str(model), outside)
    model.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("make", [
    _symlink_file,
    _symlink_folder,
    lambda run: (run / "up").symlink_to(".."),
    lambda run: (run / "dangling").symlink_to("/no/such/file"),
    lambda run: (run / "here").symlink_to("."),
    lambda run: os.mkfifo(run / "fifo"),
], ids=["file-replaced", "folder-replaced", "to-parent", "dangling", "to-self", "fifo"])
def test_anything_but_regular_files_fails_verification(sealed, make):
    make(sealed)
    problems = archive.verify(sealed)
    assert any("not a regular file" in p for p in problems), problems
    assert fusedqk("verify", str(sealed)).returncode != 0


def test_a_folder_nested_past_path_max_is_a_problem_not_a_traceback(sealed):
    """An entry whose path the system cannot take (past PATH_MAX) is named, shortened, in one
    line by verify, verify --write and compare; nothing is skipped unseen."""
    here = os.getcwd()
    try:
        os.chdir(sealed)
        for _ in range(24):  # 24 x 201 bytes > 4096
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
    finally:
        os.chdir(here)
    problems = archive.verify(sealed)
    assert len(problems) == 1 and "cannot be read (File name too long)" in problems[0]
    assert "characters)" in problems[0] and len(problems[0]) < 300
    for args in (["verify", str(sealed)], ["verify", "--write", str(sealed)],
                 ["compare", str(sealed), str(sealed)]):
        proc = fusedqk(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "File name too long" in proc.stderr


def test_a_non_utf8_manifest_is_a_problem_not_a_traceback(sealed):
    (sealed / archive.MANIFEST).write_bytes(b"\xff\xfe garbage\n")
    assert archive.verify(sealed) == [f"{archive.MANIFEST}: not UTF-8 text"]


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["decide", "{run}", "--min-gain", "0.001"], "inside the sealed run"),
    (["aggregate", "{run}"], "inside the sealed run"),
    (["decide", "{other}", "--out", "{run}/decisions.json"], "inside the sealed run"),
    (["report", "--from", "{other}", "--out", "{run}/rerender"], "inside the sealed run"),
    (["report", "--from", "{run}", "--out", "{run}/rerender"], "inside the sealed run"),
    (["bench", "-m", "qwen3-tiny", "-r", "1", "--out-dir", "{run}/qwen3-tiny/bench"],
     "inside the sealed run"),
    (["bench", "-m", "qwen3-tiny", "-r", "1", "--status", "{run}/qwen3-tiny/status-bench.json"],
     "inside the sealed run"),
    (["identity", "-m", "qwen3-tiny", "--out-dir", "{run}/qwen3-tiny"], "inside the sealed run"),
    (["blockbench", "-m", "qwen3-tiny", "--out-dir", "{run}/qwen3-tiny/blockbench"],
     "inside the sealed run"),
    (["export", "qwen3-tiny", "--out", "{run}/ckpt"], "inside the sealed run"),
    (["export", "qwen3-tiny", "--format", "gguf", "--out", "{run}/tiny.gguf"],
     "inside the sealed run"),
    (["record-config", "--config", "{{}}", "--out", "{run}/config2.yaml"], "inside the sealed run"),
])
def test_commands_that_write_refuse_a_sealed_run(sealed, tmp_path, args, needle):
    other = tmp_path / "other"
    shutil.copytree(CPU, other)
    before, before_other = _snapshot(sealed), _snapshot(other)
    proc = fusedqk(*(a.format(run=sealed, other=other) for a in args))
    assert_one_line_refusal(proc, needle)
    assert _snapshot(sealed) == before and _snapshot(other) == before_other


def test_rewrite_redoes_a_sealed_decision_and_it_seals_again(sealed):
    assert fusedqk("decide", str(sealed), "--rewrite").returncode == 0
    assert not (sealed / archive.MANIFEST).exists()  # unsealed: its seal no longer holds
    assert fusedqk("verify", "--write", str(sealed)).returncode == 0
    assert archive.verify(sealed) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["..", ".", "a/b", "x" * 101])
def test_run_names_and_device_labels_are_one_safe_path_component(tmp_path, name):
    for key in ("run_name", "device_label"):
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config",
                               f"results_dir={tmp_path}/R", f"{key}={name}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out
        assert f"config error: {key}" in out
    assert not (tmp_path / "R").exists()


@pytest.mark.slow
def test_the_html_report_escapes_hostile_text(sealed):
    hostile = "<img src=x onerror=alert(document.domain)>"
    model = next(p for p in sealed.iterdir() if p.is_dir() and (p / "status-bench.json").is_file())
    (model / "status-bench.json").write_text(
        '{"ok": false, "command": "bench", "error": "' + hostile.replace('"', '\\"') + '"}')
    shutil.rmtree(model / "bench")
    (sealed / archive.MANIFEST).unlink()
    assert fusedqk("aggregate", str(sealed)).returncode == 0
    assert fusedqk("decide", str(sealed)).returncode == 0
    report.render_run(sealed)
    html = (sealed / "report.html").read_text()
    assert hostile not in html and "&lt;img src=x onerror=alert(document.domain)&gt;" in html


@pytest.mark.slow
@pytest.mark.parametrize("value", ["", " ", "locks", "./locks", "../x"])
def test_a_relative_lock_directory_is_refused(tmp_path, value):
    proc = fusedqk("bench", "-m", "qwen3-tiny", "--backend", "cpu", "-r", "2", cwd=tmp_path,
                   env={"FUSEDQK_LOCK_DIR": value})
    assert_one_line_refusal(proc, "FUSEDQK_LOCK_DIR", "not an absolute path")
    assert not any(tmp_path.iterdir())


def test_a_waiting_measurement_says_whom_it_waits_for(tmp_path):
    import fcntl
    import json
    import time

    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "cpu.holder").write_text(json.dumps({"pid": 4242, "command": "fusedqk bench -m x",
                                                  "acquired": time.time()}))
    with (locks / "cpu.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "fusedqk", "bench", "-m", "qwen3-tiny",
                                 "--backend", "cpu", "-r", "2", "-p", "4", "-g", "4"], cwd=ROOT,
                                env={**os.environ, "FUSEDQK_LOCK_DIR": str(locks)},
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        line = proc.stderr.readline()
        proc.kill()
        proc.wait()
    assert "waiting for the cpu device lock" in line and "pid 4242 (fusedqk bench -m x)" in line


@pytest.mark.slow
def test_no_configuration_value_reaches_a_shell_unquoted(tmp_path):
    """A results_dir with shell syntax in it is a folder name, nothing more: the environment
    job runs with it and no command it spells runs; one with a control character (an escape, a
    tab; Snakemake's own parser folds a newline into a space) is refused at start."""
    hostile = f"{tmp_path}/R;touch PWNED;$(touch PWNED2) `touch PWNED3` q"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--until",
                           "environment", "--config", f"results_dir={hostile}", "run_name=inj",
                           "device_label=x", "backends=[cpu]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (Path(hostile) / "cpu-x" / "inj" / "environment.json").is_file()
    assert not list(tmp_path.glob("PWNED*")) and not list(ROOT.glob("PWNED*"))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config",
                           f"results_dir={tmp_path}/a\x1bb", "backends=[cpu]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "control character" in proc.stdout + proc.stderr
