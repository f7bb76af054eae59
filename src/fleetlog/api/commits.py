"""Waking up on each commit: a subscriber to the workers' announcements.

For a live tail (SSE) or ``--follow``: subscribe first, then read the store
after your cursor, then wait for an announcement and read again::

    async with CommitSubscriber(client) as commits:
        cursor = show(store.after(cursor, ...))
        while True:
            commit = await commits.next(timeout=15)   # None: a quiet 15 s (send a keepalive)
            if commit is None or commit.seq > cursor:
                cursor = show(store.after(cursor, ...))

Pub/sub delivers at most once: a reader that missed an announcement (Redis
restarted) still catches up at its next read, so read at every timeout too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio

from fleetlog import keys

__all__ = ["Commit", "CommitSubscriber"]


@dataclass(frozen=True, slots=True)
class Commit:
    """One committed batch: the store's highest ``seq`` after it, the devices it touched."""

    seq: int
    count: int
    devices: tuple[str, ...]
    more_devices: bool

    @classmethod
    def decode(cls, raw: bytes) -> Commit:
        """Parse an announcement; raises :class:`ValueError` if it is not one."""
        value = orjson.loads(raw)
        if not isinstance(value, dict) or not isinstance(value.get("seq"), int):
            raise ValueError("not a commit announcement")
        devices = value.get("devices")
        return cls(value["seq"], int(value.get("count") or 0),
                   tuple(str(d) for d in devices) if isinstance(devices, list) else (),
                   bool(value.get("more")))


class CommitSubscriber:
    """An async context manager subscribed to ``fleetlog:commits`` on ``client``."""

    def __init__(self, client: redis.asyncio.Redis, channel: str = keys.COMMITS) -> None:
        self._client = client
        self._channel = channel
        self._pubsub: Any = None

    async def __aenter__(self) -> CommitSubscriber:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self._channel)
        self._pubsub = pubsub
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await pubsub.aclose()

    async def next(self, timeout: float) -> Commit | None:
        """The next announcement, or ``None`` after ``timeout`` seconds without one."""
        assert self._pubsub is not None, "use it as `async with`"
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is None:
                continue
            try:
                return Commit.decode(message["data"])
            except (ValueError, TypeError):
                continue  # not ours: skip it
        return None
