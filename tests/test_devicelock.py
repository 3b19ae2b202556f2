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


GPU_HOLD = """
import json, sys, time
from fusedqk import devicelock
with devicelock.hold("cuda") as held:
    print(json.dumps(held), flush=True)
    time.sleep(float(sys.argv[1]))
"""


def _gpu_holder(env, seconds, visible):
    """A process holding the lock of the GPU ``CUDA_VISIBLE_DEVICES=visible`` shows it first
    (no GPU needed: the lock is a file)."""
    return subprocess.Popen([sys.executable, "-c", GPU_HOLD, str(seconds)],
                            env={**env, "CUDA_VISIBLE_DEVICES": visible},
                            stdout=subprocess.PIPE, text=True)


def test_jobs_on_different_gpus_hold_different_locks_and_see_each_other(tmp_path):
    """One lock per GPU: a job on GPU 1 goes straight in beside a timing job on GPU 0 and
    records it as the host's other GPU job; a second job on GPU 0 (the default when nothing is
    pinned) waits for the first."""
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    first = _gpu_holder(env, 5, "0")
    held0 = json.loads(first.stdout.readline())
    assert held0["gpu"] == "0" and held0["lock_file"].endswith("cuda-0.lock")
    start = time.perf_counter()
    beside = _gpu_holder(env, 0, "1,0")
    held1 = json.loads(beside.stdout.readline())
    beside.wait(timeout=60)
    assert time.perf_counter() - start < 4 and held1["waited_s"] < 1
    assert held1["gpu"] == "1" and held1["visible_devices"] == "1,0"
    assert len(held1["other_gpu_jobs"]) == 1 and held1["other_gpu_jobs"][0].startswith("cuda-0:")
    after = subprocess.Popen([sys.executable, "-c", GPU_HOLD, "0"], env=env,  # unpinned: GPU 0
                             stdout=subprocess.PIPE, text=True)
    held_after = json.loads(after.stdout.readline())
    after.wait(timeout=60)
    first.wait(timeout=60)
    assert held_after["gpu"] == "0" and held_after["waited_s"] >= 1.0


@pytest.mark.parametrize("value", ["", " ,1", "0;rm"])
def test_a_visible_device_list_naming_no_gpu_is_one_line(value, monkeypatch):
    from fusedqk import devicelock
    from fusedqk.errors import UserError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with pytest.raises(UserError, match=r"CUDA_VISIBLE_DEVICES=.*no GPU to measure on"):
        devicelock.visible_gpu()
