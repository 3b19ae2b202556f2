"""One measurement per device: a measuring command queues on the host-wide lock and records it."""

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
with devicelock.exclusive("cpu"):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_second_measurement_waits_for_the_first_and_says_how_long(tmp_path):
    env = {**os.environ, "FUSEDQK_LOCK_DIR": str(tmp_path / "locks")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "4"], env=env, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "-m", "qwen3-tiny", "-p", "4",
                           "-g", "4", "-r", "2", "-w", "1", "--paths", "graph,composite",
                           "--out-dir", str(tmp_path / "bench")], env=env, capture_output=True,
                          text=True, timeout=300)
    holder.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr
    lock = json.loads((tmp_path / "bench" / "bench.json").read_text())["meta"]["environment"]["device_lock"]
    assert lock["waited_s"] >= 2.5 and time.perf_counter() - start >= 3.5
    assert lock["lock_file"].endswith("cpu.lock") and "load average" in lock["at_start"]
