"""One engine process, bounded: its whole process tree ends with it, whatever ends the run.

An engine may start children (a wrapper script, a server, a tokenizer pool). Each run gets its
own process group; on success, failure, timeout, an output flood, Ctrl-C or SIGTERM the whole
group is terminated, then killed. Where the orchestrator itself is killed outright (SIGKILL,
OOM), a small watchdog process notices its pipe closing and ends the group, so no engine process
outlives fusedqk and measures beside the next holder of the device lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fusedqk.errors import UserError

MAX_OUTPUT_BYTES = 16 * 2**20
_POLL_S = 0.05
_GRACE_S = 3.0

# Waits on its standard input; EOF without "done" means the orchestrator died: end the group.
_WATCHDOG_MARK = "# fusedqk engine watchdog"
_WATCHDOG = """# fusedqk engine watchdog
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pgid = int(sys.argv[1])
if sys.stdin.buffer.read() != b"done":
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except OSError:
            break
        time.sleep(1.0)
"""


class EngineFailure(UserError):
    """One run of an engine failed: the message is the one line the report shows."""


@dataclass(frozen=True)
class Finished:
    stdout: str
    stderr: str
    wall_s: float
    deadline: float  # time.monotonic() by which reading the output must also be done

    @property
    def output(self) -> str:
        """Both streams: where a bench's figures are read (engines print them on either)."""
        return self.stdout + "\n" + self.stderr

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux prctl
    PR_SET_CHILD_SUBREAPER), so an engine child that double-forks or calls setsid or setpgid
    to leave its group is still found below this process and ended (``end_tree``). A process
    group alone misses such children, a cgroup needs privileges this tool does not assume."""
    if sys.platform != "linux":
        return
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def descendants(root: int) -> set[int]:
    """Every living process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, parent, _ in _processes():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def end_tree(pgid: int, before: set[int]) -> None:
    """End the engine's group, then every process that came to live below this one since
    ``before`` (children that left the group, reparented here as subreaper)."""
    end_group(pgid)
    stray = {pid for pid in descendants(os.getpid()) - before if not _is_watchdog(pid)}
    for pid in stray:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in stray:  # reparented here: reap them, or they stay as zombies
        with suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _is_watchdog(pid: int) -> bool:
    try:
        return _WATCHDOG_MARK in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def end_group(pgid: int) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        return
    stop = time.monotonic() + _GRACE_S
    while time.monotonic() < stop:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
        time.sleep(_POLL_S)
    with suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def pin_group(pgid: int, cpus: frozenset[int] | set[int]) -> None:
    """Every thread of every process in group ``pgid`` onto ``cpus``, now: a server's threads
    already running, where ``_start``'s pinning reaches only those started later (a thread or
    process that ended meanwhile is skipped)."""
    for pid in group_pids(pgid):
        with suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process (Linux /proc; none where it cannot be
    read, and a process that ends while it is read is skipped)."""
    with suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                yield int(entry), int(fields[1]), int(fields[2])


def group_pids(pgid: int) -> list[int]:
    """The processes of group ``pgid``."""
    return [pid for pid, _, group in _processes() if group == pgid]


@contextmanager
def _watched(pgid: int):
    """A watchdog that ends group ``pgid`` if this process dies before the block ends."""
    read_end, write_end = os.pipe()
    try:
        watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pgid)], stdin=read_end,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
    finally:
        os.close(read_end)
    try:
        yield
    finally:
        # A watchdog that died first (killed from outside) must not cost the measurement the
        # block made: its pipe is then broken, and there is no one left to tell.
        with suppress(BrokenPipeError):
            os.write(write_end, b"done")
        os.close(write_end)
        watchdog.wait()


def _size(handle: IO[bytes]) -> int:
    return os.fstat(handle.fileno()).st_size


def _text(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode("utf-8", errors="replace")


def _telling_line(text: str) -> str:
    """The line that says why a process failed: its last ``error`` line (argument parsers put
    usage and hints after it), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or ["no output"]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "fatal"))]
    return printable((errors or lines)[-1][:200])


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences among them) shown escaped:
    an engine's output is quoted back to a terminal, never played on it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _start(argv: list[str], env: dict[str, str], label: str, out: IO[bytes], err: IO[bytes],
           cwd: str | Path | None = None, cpus: frozenset[int] | None = None) -> subprocess.Popen:
    """``argv`` in a process group of its own (on ``cpus`` only, when given: its threads and
    children inherit them); a command that cannot start is one line."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    try:
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True, preexec_fn=pin)
    except FileNotFoundError:
        raise EngineFailure(f"{label}: command {argv[0]!r} not found") from None
    except OSError as e:
        raise EngineFailure(f"{label}: {argv[0]} could not start ({e.strerror})") from None


def run_bounded(argv: list[str], env: dict[str, str], timeout_s: float, label: str,
                max_output_bytes: int = MAX_OUTPUT_BYTES, cwd: str | Path | None = None) -> Finished:
    """Run ``argv`` to its end within ``timeout_s`` (which also bounds reading its output
    afterwards: ``Finished.deadline``) and ``max_output_bytes`` of output; ``label`` starts every
    failure's line. A non-zero exit is an ``EngineFailure`` with the last line it printed."""
    start = time.monotonic()
    deadline = start + timeout_s
    _become_subreaper()
    before = descendants(os.getpid())
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = _start(argv, env, label, out, err, cwd)
        flood = EngineFailure(f"{label}: {argv[0]} printed more than "
                              f"{max_output_bytes / 2**20:g} MiB (max_output_bytes)")
        with _watched(proc.pid):
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise EngineFailure(f"{label}: {argv[0]} did not finish in {timeout_s:g} s "
                                            "(timeout_s)")
                    if _size(out) + _size(err) > max_output_bytes:
                        raise flood
                    time.sleep(_POLL_S)
            finally:
                # the children it left behind, or the whole tree on failure
                end_tree(proc.pid, before | {proc.pid})
                proc.wait()
        if _size(out) + _size(err) > max_output_bytes:
            raise flood
        stdout, stderr = _text(out), _text(err)
    if proc.returncode != 0:
        raise EngineFailure(f"{label}: {argv[0]} exited with status {proc.returncode}: "
                            f"{_telling_line(stderr.strip() or stdout.strip())}")
    return Finished(stdout, stderr, time.monotonic() - start, deadline)


@dataclass
class Background:
    """A long-lived engine process (a server) started by ``background``: its log is both streams
    in one file, read back with ``log()``."""

    proc: subprocess.Popen
    label: str
    log_file: IO[bytes]
    max_output_bytes: int

    def exited(self) -> int | None:
        """Its exit status once it has ended, else None."""
        return self.proc.poll()

    def log(self) -> str:
        return _text(self.log_file)

    def check(self) -> None:
        """Fail with one line if it has ended or printed more than it may."""
        if _size(self.log_file) > self.max_output_bytes:
            raise EngineFailure(f"{self.label}: {self.proc.args[0]} printed more than "
                                f"{self.max_output_bytes / 2**20:g} MiB (max_output_bytes)")
        status = self.proc.poll()
        if status is not None:
            raise EngineFailure(f"{self.label}: {self.proc.args[0]} exited with status {status}: "
                                f"{_telling_line(self.log())}")


@contextmanager
def background(argv: list[str], env: dict[str, str], label: str,
               max_output_bytes: int = MAX_OUTPUT_BYTES,
               cpus: frozenset[int] | None = None) -> Iterator[Background]:
    """Start ``argv`` in its own process group (on ``cpus``, when given) for the length of
    the block; however the block ends (or this process, through the watchdog), the whole group
    is terminated, then killed."""
    _become_subreaper()
    before = descendants(os.getpid())
    with tempfile.TemporaryFile() as log:
        proc = _start(argv, env, label, log, log, cpus=cpus)
        with _watched(proc.pid):
            try:
                yield Background(proc, label, log, max_output_bytes)
            finally:
                end_tree(proc.pid, before | {proc.pid})
                proc.wait()
