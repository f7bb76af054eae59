"""Many idle devices on one machine: gateway processes under a per-process fd limit.

``python -m bench.many [--devices 100000] [--processes 6] [--clients 6]`` starts
a Redis of its own and ``fleetlog gateway --processes P`` (every process under
this shell's file-descriptor limit, 20,000 here, so 100,000 devices need at
least 6), then ``--clients`` :mod:`bench.idle` holders, each from its own
loopback source address (127.0.0.2, 127.0.0.3, ...: one address has about
28,000 ephemeral ports towards one server port).  Each device connects,
names itself with one legacy frame and waits for the reply.

Measured: the time from starting the holders until every one printed ``idle
ready`` (all devices connected and greeted), the sum of the gateway processes'
RSS before and after (the parent's too), RSS per connection, how the kernel
spread the connections over the processes (links per node in Redis), and
whether every process is still alive.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.procs import Children, wait_for_port
from bench.runner import child_env
from bench.systems import FLEETLOG_GATEWAY_FLAGS
from fleetlog.embedded import RedisServer, free_port

__all__ = ["main", "measure"]

PY = sys.executable


def _tree_rss(pid: int) -> tuple[int, int]:
    """Bytes of RSS of a process and its children, and how many processes that is."""
    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    return sum(process.memory_info().rss for process in processes), len(processes)


def measure(devices: int, processes: int, clients: int, timeout: float) -> dict[str, Any]:
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_client = -(-devices // clients)
    results: dict[str, Any] = {"devices": devices, "processes": processes, "clients": clients,
                               "fd_limit_per_process": fd_limit}
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False)
        server.start()
        children = Children(Path(tmp), child_env())
        client = redis.Redis.from_url(server.url)
        try:
            port = free_port()
            gateway = children.start("gateway", [
                PY, "-m", "fleetlog", "gateway", "--redis-url", server.url, "--port", str(port),
                "--data-dir", tmp, "--processes", str(processes), *FLEETLOG_GATEWAY_FLAGS])
            wait_for_port(port, gateway, timeout=60)
            time.sleep(2.0)  # every process up
            before, count = _tree_rss(gateway.pid)
            results["gateway_processes_seen"] = count
            started = time.perf_counter()
            holders = [children.start(f"idle-{n}", [
                PY, "-m", "bench.idle", "--url", f"ws://127.0.0.1:{port}/",
                "--connections", str(min(per_client, devices - n * per_client)),
                "--hold", str(timeout), "--local-addr", f"127.0.0.{2 + n}", "--prefix", f"c{n}-"],
                marker=b"idle ready") for n in range(clients)]
            ready = []
            for holder in holders:
                try:
                    ready.append(holder.wait_marker(timeout) - started)
                except Exception as exc:
                    results.setdefault("errors", []).append(f"{holder.name}: {exc}"[:1500])
            results["connect_all_s"] = round(max(ready), 2) if len(ready) == clients else None
            time.sleep(2.0)
            after, _ = _tree_rss(gateway.pid)
            links = client.hgetall("device:links")
            spread = Counter(json.loads(value)["node"] for value in links.values())
            results.update(
                connected=len(links),
                per_process=dict(sorted(spread.items())),
                rss_before_mib=round(before / 2**20, 1),
                rss_after_mib=round(after / 2**20, 1),
                rss_per_connection_kib=round((after - before) / max(1, len(links)) / 1024, 2),
                redis_used_memory_mib=round(client.info("memory")["used_memory"] / 2**20, 1),
                gateway_alive=gateway.popen.poll() is None,
            )
            for holder in holders:
                holder.stop(timeout=30)
        finally:
            children.close()
            client.close()
            server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many", description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.devices, args.processes, args.clients, args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
