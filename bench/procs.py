"""Child processes for the benchmark: started, measured, and always killed.

Every server and client of a run is a separate OS process (the load generator
must not share the server's interpreter or GIL).  :class:`Children` owns them
all: each one is started with a deadline, and :meth:`Children.close` kills
whatever is still alive, so a failed measurement never leaves a process behind.

CPU time comes from ``/proc`` via psutil while a process runs, and from the
kernel's rusage (``wait4``) once it has exited, so a short-lived worker's CPU
is counted to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fleetlog import net

__all__ = ["Child", "ChildFailed", "Children", "cpu_seconds", "wait_for_port"]


class ChildFailed(RuntimeError):
    """A child did not start, timed out, or exited with an error."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wait_for_port(port: int, child: Child, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Fails early when ``child`` (the server that should listen) has exited.
    """
    outcome = net.wait_for_port(port, timeout=timeout, gone=lambda: child.popen.poll() is not None)
    if outcome is net.PortWait.GONE:
        raise ChildFailed(f"{child.name} exited at start ({child.popen.returncode}):\n{child.tail()}")
    if outcome is net.PortWait.TIMED_OUT:
        raise ChildFailed(f"{child.name} did not listen on port {port} within {timeout}s:\n{child.tail()}")


@dataclass
class Child:
    """One started process, its stderr tail, and when it printed its marker."""

    name: str
    popen: subprocess.Popen[bytes]
    marker: bytes | None = None
    marker_at: float | None = None
    marker_cpu: float | None = None
    cpu_at_exit: float | None = None
    #: Context switches at exit (rusage): voluntary (it waited: I/O, a lock), involuntary
    #: (runnable, but the CPU went to another process).
    switches_at_exit: tuple[int, int] | None = None
    lines: deque[bytes] = field(default_factory=lambda: deque(maxlen=40))
    _seen: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self) -> str:
        return b"".join(self.lines).decode(errors="replace")[-3000:]

    def _read_stderr(self) -> None:
        """Keep the stderr tail; note the time (and CPU) of the first marker line."""
        stream = self.popen.stderr
        assert stream is not None
        for line in iter(stream.readline, b""):
            if self.marker is not None and self.marker_at is None and self.marker in line:
                self.marker_at = time.perf_counter()
                try:
                    self.marker_cpu = cpu_seconds(self.pid)
                except psutil.Error:
                    self.marker_cpu = None
                self._seen.set()
            self.lines.append(line)
        self._seen.set()  # EOF: whoever waits for the marker must stop waiting

    def wait_marker(self, timeout: float) -> float:
        """Block until the marker line appeared; return its ``perf_counter`` time."""
        if not self._seen.wait(timeout) or self.marker_at is None:
            raise ChildFailed(f"{self.name} never printed {self.marker!r}:\n{self.tail()}")
        return self.marker_at

    def wait(self, timeout: float) -> int:
        """Reap the process with ``wait4`` (keeping its rusage); kill it on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.returncode is not None:
                return self.popen.returncode
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped elsewhere
                return self.popen.wait(timeout=1)
            if pid:
                self.cpu_at_exit = usage.ru_utime + usage.ru_stime
                self.switches_at_exit = (usage.ru_nvcsw, usage.ru_nivcsw)
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                return self.popen.returncode
            if time.monotonic() > deadline:
                self.kill()
                raise ChildFailed(f"{self.name} still running after {timeout}s; killed:\n{self.tail()}")
            time.sleep(0.002)

    def collect(self, timeout: float) -> tuple[bytes, int]:
        """Wait for a client that prints a short summary; return its stdout and exit code."""
        code = self.wait(timeout)
        stream = self.popen.stdout
        return (stream.read() if stream is not None else b""), code

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout``."""
        if self.popen.returncode is None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except ChildFailed:
                pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class Children:
    """Starts processes in one environment and kills any left over on close."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self._all: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        marker: bytes | None = None,
        capture_stdout: bool = False,
        stdin: int | None = subprocess.DEVNULL,
    ) -> Child:
        popen = subprocess.Popen(
            list(argv), cwd=self.cwd, env=self.env, stdin=stdin,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        child = Child(name, popen, marker=marker)
        self._all.append(child)
        threading.Thread(target=child._read_stderr, name=f"stderr-{name}", daemon=True).start()
        return child

    def alive(self) -> list[Child]:
        return [child for child in self._all if child.popen.poll() is None]

    def close(self) -> list[str]:
        """Kill every child still running; return the names of those that were."""
        leftovers = self.alive()
        for child in leftovers:
            child.stop(timeout=5)
        for child in self._all:
            child.kill()
        return [child.name for child in leftovers]

