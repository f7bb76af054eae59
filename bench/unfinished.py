"""``python -m bench.unfinished --before REV``: what connections that never finish a frame cost.

Each of ``--connections`` WebSocket connections sends the header of a
``--size``-byte text frame and all of it but the last 1,000 bytes, then waits:
picows keeps those bytes in the connection's read buffer until the frame is
whole.  One gateway of each side (``--max-buffered-bytes``, default 256 MiB,
the gateway's own default) against a private Valkey; the gateway's RSS before
and 2 s after, and how many connections the gateway closed (1008) meanwhile.
A side that holds the frames beyond its budget grows by about
``connections * size``; one that keeps them within it by at most the budget.
Printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tests.helpers import closed_with, unfinished_frame

from bench.revisions import Checkouts, Side
from bench.runner import child_env
from fleetlog.embedded import RedisServer
from fleetlog.net import free_port, wait_for_port

__all__ = ["main"]

_PY = sys.executable


def once(side: Side, root: Path, connections: int, size: int, budget: int) -> dict[str, Any]:
    server = RedisServer(root / "redis")
    server.start()
    port = free_port()
    gateway = subprocess.Popen(
        [_PY, "-m", "fleetlog", "gateway", "--redis-url", server.url, "--port", str(port),
         "--auth", "none", "--data-dir", str(root / "data")],
        env={**child_env(side.src), "FLEETLOG_MAX_BUFFERED_BYTES": str(budget)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        time.sleep(1)
        process = psutil.Process(gateway.pid)
        before = process.memory_info().rss

        async def attack() -> tuple[int, int]:
            held = await asyncio.gather(*(unfinished_frame(port, size, size - 1000)
                                          for _ in range(connections)))
            await asyncio.sleep(2)
            during = process.memory_info().rss
            closed = sum(await asyncio.gather(*(closed_with(reader, 1008, 1) for reader, _ in held)))
            for _, writer in held:
                writer.close()
            return during, closed

        during, closed = asyncio.run(attack())
        return {"rss_before_mib": round(before / 2**20), "rss_during_mib": round(during / 2**20),
                "grew_mib": round((during - before) / 2**20), "closed_1008": closed}
    finally:
        gateway.terminate()
        gateway.wait(30)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.unfinished", description=__doc__)
    parser.add_argument("--before", required=True, help="A revision or a directory holding src/fleetlog.")
    parser.add_argument("--after", default=".", help="The same (default: this working tree).")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--size", type=int, default=1_000_000, help="Bytes of each frame (<= its limit).")
    parser.add_argument("--max-buffered-bytes", type=int, default=256 * 2**20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetlog-bench-unfinished-"))
    checkouts = Checkouts(Path.cwd(), work / "trees")
    results: dict[str, Any] = {"connections": args.connections, "frame_bytes": args.size,
                               "sent_bytes_each": args.size - 1000,
                               "max_buffered_bytes": args.max_buffered_bytes}
    try:
        for side in (checkouts.side("before", args.before), checkouts.side("after", args.after)):
            results[side.name] = {"spec": side.spec, "commit": side.commit[:12],
                                  **once(side, work / side.name, args.connections, args.size,
                                         args.max_buffered_bytes)}
            print(f"{side.name}: {results[side.name]}", file=sys.stderr, flush=True)
    finally:
        for problem in checkouts.close():
            print(problem, file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
