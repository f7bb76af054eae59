"""A gateway with a million devices provisioned: start, first handshake, memory, revocation.

``python -m bench.tokens [--devices 1000000] [--gateways 2]`` starts a Redis of
its own (no persistence: provisioning is the setup, not the measurement),
writes ``--devices`` token hashes with pipelined ``HSET`` s of 10,000 fields,
adds two real devices through :class:`fleetlog.credentials.Credentials`, then
for each gateway process (``--processes 1`` each, like one node):

* start: from spawning the process to its port accepting TCP connections;
* first handshake: from then to the first ``log`` frame of a real token acked;
* RSS of the gateway after that handshake.

Then it revokes one device and rotates the other, each connected to another
gateway, and times until both connections are closed (4401).  The gateway
code is whatever ``fleetlog`` this interpreter imports (``PYTHONPATH``), so the
same script measures a branch and ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis
import websockets

from bench.procs import Children, wait_for_port
from fleetlog.credentials import Credentials
from fleetlog.embedded import RedisServer, free_port

__all__ = ["main", "measure"]


def provision(client: redis.Redis, count: int, chunk: int = 10_000) -> float:
    """Write ``count`` token hashes; return the seconds it took."""
    started = time.perf_counter()
    for start in range(0, count, chunk * 10):
        with client.pipeline(transaction=False) as pipe:
            for first in range(start, min(count, start + chunk * 10), chunk):
                pipe.hset("fleetlog:tokens", mapping={
                    f"{n:064x}": f"fleet-{n:07d}" for n in range(first, min(count, first + chunk))})
            pipe.execute()
    return time.perf_counter() - started


async def _first_ack(url: str, device: str) -> Any:
    ws = await websockets.connect(url, open_timeout=30)
    await ws.send(json.dumps({"type": "log", "id": "f1", "records": [{"device": device}]}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
    if reply.get("stored") != 1:
        raise RuntimeError(f"not stored: {reply}")
    return ws


async def _closed(ws: Any, timeout: float) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else -1


def measure(devices: int, gateways: int) -> dict[str, Any]:
    results: dict[str, Any] = {"devices": devices, "gateways": []}
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False)
        server.start()
        children = Children(Path.cwd(), dict(os.environ))
        client = redis.Redis.from_url(server.url)
        try:
            results["provision_s"] = round(provision(client, devices), 2)
            credentials = Credentials(client)
            tokens = [credentials.add(f"real-{n}") for n in range(gateways)]
            results["redis_used_memory_mb"] = round(client.info("memory")["used_memory"] / 2**20, 1)
            results["gateways"] = asyncio.run(_gateways(children, server.url, tmp, client, tokens))
        finally:
            children.close()
            client.close()
            server.stop()
    return results


async def _gateways(children: Children, redis_url: str, data_dir: str, client: redis.Redis,
                    tokens: list[str]) -> list[dict[str, Any]]:
    """Start one gateway per token, each measured before the next starts; then the changes."""
    rows = []
    sockets = []
    for n, token in enumerate(tokens):
        port = free_port()
        spawned = time.perf_counter()
        child = children.start(f"gateway-{n}", [
            sys.executable, "-m", "fleetlog", "gateway", "--redis-url", redis_url,
            "--data-dir", data_dir, "--port", str(port), "--auth", "token", "--processes", "1"])
        await asyncio.to_thread(wait_for_port, port, child, 120)
        listening = time.perf_counter()
        sockets.append(await _first_ack(f"ws://127.0.0.1:{port}/?token={token}", f"real-{n}"))
        acked = time.perf_counter()
        rows.append({
            "start_s": round(listening - spawned, 3),
            "first_ack_after_listen_s": round(acked - listening, 3),
            "rss_mb": round(psutil.Process(child.pid).memory_info().rss / 2**20, 1),
        })
    credentials = Credentials(client)
    started = time.perf_counter()
    for n in range(len(tokens)):
        if n % 2:
            await asyncio.to_thread(credentials.rotate, f"real-{n}")
        else:
            await asyncio.to_thread(credentials.revoke, f"real-{n}")
    codes = await asyncio.gather(*(_closed(ws, 10) for ws in sockets))
    closed = time.perf_counter() - started
    for row, code in zip(rows, codes, strict=True):
        row["close_code"] = code
        row["all_closed_after_changes_s"] = round(closed, 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__)
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--gateways", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.devices, args.gateways), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
