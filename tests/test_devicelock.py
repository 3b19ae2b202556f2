"""One timing measurement per device: a measuring command queues on the host-wide lock and
records it; identity checks share it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

HOLD = """
import sys, time
from fusedqk import devicelock
with devicelock.hold("cpu", shared=sys.argv[2:] == ["shared"]):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


def _holder(env, seconds, *mode):
    """A process that holds the CPU lock for ``seconds`` once it has printed "held"."""
    return subprocess.Popen([sys.executable, "-c", HOLD, str(seconds), *mode], env=env,
                            stdout=subprocess.PIPE, text=True)


def _seconds_to_hold(env, *mode) -> float:
    start = time.perf_counter()
    proc = _holder(env, 0, *mode)
    assert proc.stdout.readline().strip() == "held"
    proc.wait(timeout=60)
    return time.perf_counter() - start


def test_identity_checks_share_the_lock_and_a_timing_measurement_waits_for_them(tmp_path):
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    # Holds of 5 s: a loaded machine may take a second or two to start each Python process.
    check = _holder(env, 5, "shared")
    assert check.stdout.readline().strip() == "held"
    assert _seconds_to_hold(env, "shared") < 3  # another check goes straight in
    assert _seconds_to_hold(env) >= 1.0  # a timing measurement waits for the first to end
    check.wait(timeout=60)
    timing = _holder(env, 5)
    assert timing.stdout.readline().strip() == "held"
    assert _seconds_to_hold(env, "shared") >= 1.0  # and a check waits for a timing measurement
    timing.wait(timeout=60)
    modes = [json.loads(line)["mode"] for line in (tmp_path / "locks/cpu.history").open()]
    assert sorted(modes) == ["exclusive"] * 2 + ["shared"] * 3


@pytest.mark.slow
def test_a_second_measurement_waits_for_the_first_and_says_how_long(tmp_path):
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    holder = _holder(env, 4)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "-m", "qwen3-tiny", "-p", "4",
                           "-g", "4", "-r", "2", "-w", "1", "--paths", "graph,composite",
                           "--out-dir", str(tmp_path / "bench"),
                           "--status", str(tmp_path / "status.json")], env=env, capture_output=True,
                          text=True, timeout=300)
    holder.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr
    lock = json.loads((tmp_path / "bench" / "bench.json").read_text())["meta"]["environment"]["device_lock"]
    assert lock["waited_s"] >= 2.5 and time.perf_counter() - start >= 3.5
    assert lock["lock_file"].endswith("cpu.lock") and "load average" in lock["at_start"]
    assert lock["mode"] == "exclusive"
    # The report's time table shows the wait as its own phase.
    seconds = json.loads((tmp_path / "status.json").read_text())["seconds"]
    assert seconds["device_wait_s"] == pytest.approx(lock["waited_s"], abs=0.1)


@pytest.mark.parametrize("planted", ["cpu.holder", "cpu.history", "cpu.lock"])
def test_links_planted_in_the_lock_folder_are_never_written_through(tmp_path, monkeypatch, planted):
    """The lock folder is shared by every user of the host: a link planted there to a file the
    measuring user may write leaves that file as it was."""
    from fusedqk import devicelock
    from fusedqk.errors import UserError

    locks = tmp_path / "locks"
    locks.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (locks / planted).symlink_to(victim)
    monkeypatch.setenv("FUSEDQK_LOCK_DIR", str(locks))
    try:
        with devicelock.hold("cpu"):
            pass
    except UserError as e:  # the lock file itself a link: refused in one line
        assert planted == "cpu.lock" and "not links" in str(e)
    assert victim.read_text() == "precious\n"


def test_a_lock_folder_that_is_a_link_is_refused(tmp_path, monkeypatch):
    from fusedqk import devicelock
    from fusedqk.errors import UserError

    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "locks").symlink_to(real)
    monkeypatch.setenv("FUSEDQK_LOCK_DIR", str(tmp_path / "locks"))
    with pytest.raises(UserError, match="symbolic link"), devicelock.hold("cpu"):
        pass
    assert not list(real.iterdir())
