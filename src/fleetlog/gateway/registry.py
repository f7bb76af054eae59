"""Which device is on which connection of which node, kept in Redis.

``device:links`` (the original's hash) maps a device id to JSON
``{"node", "conn", "since"}``.  A gateway sets the field on a connection's
first frame naming the device, and deletes it on disconnect only if it still
names that connection (atomically, in Lua), so a device that reconnected to
another node is never unlinked by the old one.

Each node also keeps ``fleetlog:node:<id>`` alive with a TTL.  A node that
dies without cleaning up leaves links behind, but they point at a node whose
heartbeat key is gone: readers report them offline (:func:`is_online`).

Link changes are queued and written by one task, in order, so a quick
connect/disconnect can never be applied backwards; while Redis is down they
wait and are written once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import redis.asyncio

from fleetlog import keys
from fleetlog.queue import scripts
from fleetlog.queue.connection import REDIS_DOWN
from fleetlog.records import iso_ms

__all__ = ["LinkRegistry", "is_online", "parse_link"]

log = logging.getLogger("fleetlog.gateway")


def parse_link(raw: bytes | str) -> dict[str, Any]:
    """Decode a ``device:links`` value; the original stored a bare fd number."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"node": None, "conn": raw.decode() if isinstance(raw, bytes) else raw, "since": None}


def is_online(link: dict[str, Any], live_nodes: set[str]) -> bool:
    return link.get("node") in live_nodes


class LinkRegistry:
    """Writes link changes and the node heartbeat; see the module docstring."""

    def __init__(
        self, client: redis.asyncio.Redis, *, node_id: str, heartbeat_ttl: float, info: dict[str, Any]
    ) -> None:
        self._client = client
        self.node_id = node_id
        self._ttl_ms = int(heartbeat_ttl * 1000)
        self._info = orjson.dumps({"node": node_id, **info})
        self._ops: list[tuple[str, str, str]] = []
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_links(), name="links"),
            loop.create_task(self._heartbeat(), name="heartbeat"),
        ]

    def link(self, device_id: str, conn_id: str) -> None:
        self._ops.append(("link", device_id, conn_id))
        self._wakeup.set()

    def unlink(self, device_id: str, conn_id: str) -> None:
        self._ops.append(("unlink", device_id, conn_id))
        self._wakeup.set()

    async def _write_links(self) -> None:
        delay = 0.1
        while True:
            if not self._ops:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            ops = self._ops[:]
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for action, device_id, conn_id in ops:
                        if action == "link":
                            value = orjson.dumps(
                                {"node": self.node_id, "conn": conn_id,
                                 "since": iso_ms(int(time.time() * 1000))}
                            )
                            pipe.hset(keys.DEVICE_LINKS, device_id, value)
                        else:
                            pipe.eval(scripts.UNLINK, 1, keys.DEVICE_LINKS, device_id, conn_id)
                    await pipe.execute()
                del self._ops[: len(ops)]
                delay = 0.1
            except REDIS_DOWN as exc:
                if self._closing:
                    log.warning("dropping %d link updates at shutdown: %s", len(ops), exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _heartbeat(self) -> None:
        key = keys.node_heartbeat(self.node_id)
        while True:
            try:
                await self._client.set(key, self._info, px=self._ttl_ms)
            except REDIS_DOWN as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self._ttl_ms / 3000)

    async def close(self) -> None:
        """Write the pending link changes, then drop the heartbeat."""
        self._closing = True
        self._wakeup.set()
        writer, heartbeat = self._tasks
        heartbeat.cancel()
        _, unfinished = await asyncio.wait([writer, heartbeat], timeout=5)
        if writer in unfinished:
            log.warning("link updates not written within 5 s of shutdown")
        for task in unfinished:
            task.cancel()
        try:
            await asyncio.wait_for(self._client.delete(keys.node_heartbeat(self.node_id)), 2)
        except REDIS_DOWN:
            pass  # the key expires by itself
