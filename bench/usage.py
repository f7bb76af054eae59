"""CPU and kernel counters around one client run, read from outside the processes.

Server CPU comes from ``/proc/PID/stat`` (psutil) before and after; the
client's from its rusage, since it starts and is reaped inside the window.
Machine-wide ``/proc/stat`` is deliberately not used: on the VM this was built
on it reported both cores busy while one process ran one thread, so it cannot
tell a disturbed run from a quiet one (per-process times matched wall time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.procs import Child, cpu_seconds

__all__ = ["Usage", "listen_overflows"]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
        header, values = lines[0].split(), lines[1].split()
    except (OSError, IndexError):
        return 0
    counters = dict(zip(header[1:], values[1:], strict=False))
    return int(counters.get("ListenOverflows", 0))


class Usage:
    """Start the clock at construction; :meth:`finish` returns the numbers."""

    def __init__(self, bench: Bench, server: Child) -> None:
        self._bench, self._server = bench, server
        self._wall = time.perf_counter()
        self._server_cpu = cpu_seconds(server.pid)
        self._redis_cpu = bench.redis_cpu()
        self._overflows = listen_overflows()

    def finish(self, records: int, client: Child, elapsed: float | None = None) -> dict[str, Any]:
        """Numbers for a run that acknowledged ``records`` in ``elapsed`` (the client's clock)."""
        wall = time.perf_counter() - self._wall
        busy_period = elapsed or wall
        server = cpu_seconds(self._server.pid) - self._server_cpu
        redis_cpu = self._bench.redis_cpu() - self._redis_cpu
        client_cpu = client.cpu_at_exit or 0.0
        per_100k = 100_000 / records if records else 0.0
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s_per_100k": round(server * per_100k, 3),
            "redis_cpu_s_per_100k": round(redis_cpu * per_100k, 3),
            "server_cpu_pct": round(100 * server / busy_period, 1),
            "redis_cpu_pct": round(100 * redis_cpu / busy_period, 1),
            "loadgen_cpu_s_incl_startup": round(client_cpu, 3),
            "listen_overflows": listen_overflows() - self._overflows,
        }
