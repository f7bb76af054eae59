"""Server memory per idle connection: RSS before, and while K quiet devices are connected.

Measured for both gateways and both bare echo servers: the echo servers show
how much of a gateway's memory per connection its WebSocket library takes.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from bench.context import PY, Bench, start_server
from bench.procs import ChildFailed

__all__ = ["idle_rss"]


def idle_rss(bench: Bench, name: str) -> dict[str, Any]:
    count = bench.profile.idle_connections
    bench.reset_redis()
    server = start_server(bench, name)
    try:
        time.sleep(0.5)
        before = psutil.Process(server.child.pid).memory_info().rss
        holder = bench.children.start(
            f"idle-{count}",
            [PY, "-m", "bench.idle", "--url", server.url, "--connections", str(count),
             "--hold", str(bench.profile.run_timeout)],
            marker=b"idle ready")
        try:
            connecting = time.perf_counter()
            holder.wait_marker(bench.profile.run_timeout)
            connect_s = time.perf_counter() - connecting
            time.sleep(1.0)
            after = psutil.Process(server.child.pid).memory_info().rss
            alive = server.child.popen.poll() is None
        finally:
            holder.stop()
    finally:
        server.stop()
    if not alive:
        raise ChildFailed(f"{name} died holding {count} connections:\n{server.child.tail()}")
    return {
        "connections": count,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_connection_kib": round((after - before) / count / 1024, 2),
        "connect_all_s": round(connect_s, 2),
    }
