"""The original WebSocket server, ported: ``websockets`` + uvloop + redis.asyncio.

Per text frame, in this order, exactly like the PHP ``on('Message')`` handler:

1. reply ``server receive a message!`` (before anything was done);
2. ``json_decode`` the frame;
3. with a non-empty ``deviceId``: ``HGET device:links <id>`` and, when it is not
   this connection's fd, ``HSET device:links <id> <fd>``; then, inside that
   same block, for ``type == 4`` with non-empty ``data``: ``LPUSH
   device:log:list <json(data), unescaped Unicode>`` and reply
   ``log_upload_response``.

Each Redis command is its own awaited round trip.  The port is, if anything,
kinder than the original: frames of different connections overlap on the
event loop (redis-py's pool), where blocking phpredis in a Swoole worker
served one command at a time.

Run: ``python -m bench.baseline.gateway --port P --redis-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from typing import Any

import redis.asyncio
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

LINKS = "device:links"
LOG_LIST = "device:log:list"
RECEIVED = "server receive a message!"
UPLOADED = "log_upload_response"


class LegacyServer:
    """State shared by every connection: the Redis client and the fd counter."""

    def __init__(self, redis_url: str, pool: int) -> None:
        if pool <= 1:
            # The PHP handler's one shared ``$redis``: one connection, one command at a time.
            self.redis: Any = redis.asyncio.Redis.from_url(redis_url, single_connection_client=True)
        else:
            self.redis = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                redis_url, max_connections=pool, timeout=30))
        self._fds = itertools.count(1)

    async def handle(self, ws: ServerConnection) -> None:
        """One connection: Swoole's ``$frame->fd`` becomes a per-process counter."""
        fd = str(next(self._fds))
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    await self.on_message(ws, fd, frame)
        except ConnectionClosed:
            pass

    async def on_message(self, ws: ServerConnection, fd: str, text: str) -> None:
        await ws.send(RECEIVED)
        try:
            data = json.loads(text)
        except ValueError:
            return  # json_decode returned null: nothing else happens
        if not isinstance(data, dict) or not data.get("deviceId"):
            return
        device_id = str(data["deviceId"])
        old_fd = await self.redis.hget(LINKS, device_id)
        if old_fd is None or old_fd.decode() != fd:
            await self.redis.hset(LINKS, device_id, fd)
        if "type" in data and data["type"] in (4, "4"):
            log_data = data.get("data") or ""
            if log_data:
                await self.redis.lpush(LOG_LIST, json.dumps(log_data, ensure_ascii=False))
                await ws.send(UPLOADED)


async def main(host: str, port: int, redis_url: str, pool: int) -> None:
    server = LegacyServer(redis_url, pool)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(server.handle, host, port, compression=None, max_size=1 << 20):
        await stop.wait()
    await server.redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--redis-pool", type=int, default=1,
                        help="Redis connections (1: the original's one shared connection).")
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.redis_url, args.redis_pool))
