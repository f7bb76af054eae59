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

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from types import TracebackType

import orjson
import redis.asyncio

from fleetlog import keys
from fleetlog.queue.connection import REDIS_DOWN
from fleetlog.queue.subscription import Messages

__all__ = ["Commit", "CommitFeed", "CommitSubscriber"]

log = logging.getLogger("fleetlog.api")

#: Seconds between two subscription attempts while Redis does not answer.
RESUBSCRIBE_DELAY = 1.0


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
        self._messages: Messages | None = None

    async def __aenter__(self) -> CommitSubscriber:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self._channel)
        self._messages = Messages(pubsub, ignore_subscribe_messages=True)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        messages, self._messages = self._messages, None
        if messages is not None:
            await messages.aclose()

    async def next(self, timeout: float) -> Commit | None:
        """The next announcement, or ``None`` after ``timeout`` seconds without one."""
        assert self._messages is not None, "use it as `async with`"
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await self._messages.get(left)
            if message is None:
                continue
            try:
                return Commit.decode(message["data"])
            except (ValueError, TypeError):
                continue  # not ours: skip it
        return None


class CommitFeed:
    """One subscription per API process, fanned out to every live tail.

    Each tail takes :meth:`changed` *before* it reads the store, then awaits
    :meth:`wait` on it: a commit announced between the read and the wait has
    set that event already, so it is never slept through.  After Redis comes
    back the feed wakes every tail (announcements made meanwhile are lost, the
    store is not).  Call :meth:`start` in the event loop, :meth:`close` at shutdown.
    """

    def __init__(self, client: redis.asyncio.Redis, channel: str = keys.COMMITS) -> None:
        self._client = client
        self._channel = channel
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.latest: Commit | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="commit-feed")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def changed(self) -> asyncio.Event:
        """The event the next commit sets (take it before reading the store)."""
        return self._changed

    @staticmethod
    async def wait(changed: asyncio.Event, timeout: float) -> bool:
        """Whether ``changed`` was set within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _run(self) -> None:
        while True:
            try:
                async with CommitSubscriber(self._client, self._channel) as commits:
                    self._wake()  # (re)subscribed: let every tail catch up
                    while True:
                        commit = await commits.next(timeout=30.0)
                        if commit is not None:
                            self.latest = commit
                            self._wake()
            except REDIS_DOWN as exc:
                log.warning("commit announcements: Redis not answering (%s); retrying", exc)
                await asyncio.sleep(RESUBSCRIBE_DELAY)
