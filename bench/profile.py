"""How big each measurement is, in quick and full mode.

Every load is bounded twice: by count (records, connections) and by time (a
timeout on each child).  Load runs are sized from a short probe of each
server so that every run lasts about ``run_seconds`` whatever the server's
speed: a slow baseline does not stretch the run, a fast one is not measured
over a few milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FULL", "QUICK", "Profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    #: Connection counts of the ingest and echo sweep (the plot's x axis).
    connections: tuple[int, ...]
    #: Target duration of one load run, seconds.
    run_seconds: float
    #: Runs per (server, connection count); the median is reported.
    repeats: int
    #: Duration of the half-load latency run, seconds, and its connections.
    latency_seconds: float
    latency_connections: int
    #: Half-load runs (each followed by the floor's); the median p99 is reported.  Quick
    #: mode repeats them too: one run's p99 on a shared 2-core VM moved from 4.3 to 9.0 ms
    #: between runs of one gateway within minutes (2026-12-07).
    latency_repeats: int
    #: Records preloaded for each worker drain.
    drain_records: int
    #: Idle connections held open for the memory measurement.
    idle_connections: int
    #: Upper bound on any one client run, seconds.
    run_timeout: float

    def messages_per_device(self, rate: float, connections: int, seconds: float) -> int:
        """Messages per device so that ``connections`` devices at ``rate`` last ``seconds``."""
        wanted = math.ceil(max(rate, 1.0) * seconds / connections)
        return max(5, min(20_000, wanted))


QUICK = Profile(
    name="quick",
    connections=(10, 100, 1000),
    run_seconds=1.5,
    repeats=1,
    latency_seconds=2.0,
    latency_connections=100,
    latency_repeats=3,
    drain_records=20_000,
    idle_connections=2_000,
    run_timeout=45.0,
)

FULL = Profile(
    name="full",
    connections=(10, 100, 1000),
    run_seconds=5.0,
    repeats=3,
    latency_seconds=8.0,
    latency_connections=100,
    latency_repeats=3,
    drain_records=100_000,
    idle_connections=10_000,
    run_timeout=240.0,
)
