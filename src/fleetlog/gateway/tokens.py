"""Keeping a gateway's token cache current: each change at once, a poll for missed ones.

``fleetlog device add/rotate/revoke`` publish every change on
``fleetlog:tokens:changed`` (see :mod:`fleetlog.credentials`).  The watcher
subscribes *before* it reads the version, so no change falls between the two;
it applies each change to the :class:`~fleetlog.credentials.TokenCache` as it
arrives, closes the connections of the tokens it removed, and then confirms
it on the change's list, which is what the command waits for.  Pub/sub
delivers at most once, so the watcher also compares the version in Redis
every half second; when it moved without a message (or the subscription was
down) it empties the cache and asks Redis which connected tokens are gone
(``HMGET``, in chunks): never a full-table load, which with a million
devices cost seconds.  All of it runs in one task, so a resync never races a
change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Final

import redis.asyncio

from fleetlog import keys
from fleetlog.backoff import Backoff
from fleetlog.credentials import TokenCache, TokenChange, current_version, missing
from fleetlog.queue.connection import REDIS_DOWN, is_cluster
from fleetlog.queue.subscription import Messages

__all__ = ["TokenWatcher"]

log = logging.getLogger("fleetlog.gateway")

#: Longest pause between two attempts to reach Redis: a revoked token must stop
#: working within seconds of Redis coming back.
_MAX_BACKOFF = 2.0

#: A confirmation list outlives any command waiting on it.
_ACK_TTL_MS: Final = 10_000


class TokenWatcher:
    """Applies published credential changes to ``cache``.

    ``on_revoked`` gets the token hashes that stopped working (the gateway
    closes their connections); ``connected`` returns the hashes of the
    connected devices, checked against Redis after changes were missed.
    """

    def __init__(self, client: redis.asyncio.Redis, cache: TokenCache, *, node_id: str,
                 on_revoked: Callable[[set[str]], None],
                 connected: Callable[[], Collection[str]] = frozenset,
                 poll_interval: float = 0.5) -> None:
        self._client = client
        self._table = cache
        self._node_id = node_id
        self._on_revoked = on_revoked
        self._connected = connected
        self._poll_interval = poll_interval
        self._messages: Messages | None = None
        #: On a cluster, the changes come on a sharded channel (SSUBSCRIBE).
        self._sharded = is_cluster(client)

    async def start(self) -> None:
        """Subscribe and read the version before the gateway accepts devices.

        With Redis down the gateway still starts (refusing every token) and
        :meth:`run` keeps trying.
        """
        try:
            await self._connect()
        except REDIS_DOWN as exc:
            log.warning("cannot load device tokens yet: %s", exc)

    async def run(self) -> None:
        """Apply changes and poll until cancelled; then unsubscribe."""
        backoff = Backoff(initial=0.1, cap=_MAX_BACKOFF)
        next_poll = time.monotonic() + self._poll_interval
        try:
            while True:
                try:
                    if self._messages is None:
                        await self._connect()
                        backoff.reset()
                    assert self._messages is not None
                    message = await self._messages.get(next_poll - time.monotonic())
                    if message is not None:
                        await self._receive(message["data"])
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + self._poll_interval
                        if await self._table.refresh(self._client):
                            await self._resync()
                except REDIS_DOWN as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError from exc
                    log.warning("cannot refresh device tokens: %s", exc)
                    await self._disconnect()
                    await backoff.sleep()
                except Exception:
                    # A bug must not leave the node on a stale cache for good (a revoked
                    # token still working): start over, with an empty cache.
                    log.exception("device tokens: unexpected error; starting over with an empty cache")
                    await self._disconnect()
                    await backoff.sleep()
        finally:
            await self._disconnect()

    async def _connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            if self._sharded:
                await pubsub.ssubscribe(keys.CLUSTER_CREDENTIALS.changed)
            else:
                await pubsub.subscribe(keys.TOKENS_CHANGED)
            # Changes may have been missed while unsubscribed: forget every answer.
            self._table.clear(await current_version(self._client))
            await self._resync()
        except BaseException:
            await pubsub.aclose()
            raise
        self._messages = Messages(pubsub, ignore_subscribe_messages=True)

    async def _resync(self) -> None:
        """After missed changes: close the connections whose token Redis no longer holds."""
        connected = list(self._connected())
        if connected:
            gone = await missing(self._client, connected)
            if gone:
                self._on_revoked(gone)

    async def stop(self) -> None:
        """Unsubscribe; for a gateway that failed to start (:meth:`run` does it otherwise)."""
        await self._disconnect()

    async def _disconnect(self) -> None:
        messages, self._messages = self._messages, None
        if messages is not None:
            await messages.aclose()

    async def _receive(self, raw: bytes) -> None:
        try:
            change = TokenChange.decode(raw)
        except ValueError:
            log.warning("ignoring a malformed credential change: %r", raw[:200])
            return
        if self._table.apply(change):
            if change.removed:
                self._on_revoked(set(change.removed))
        else:  # a change was missed: forget every answer, check who is connected
            self._table.clear(max(change.version, await current_version(self._client)))
            if change.removed:
                self._on_revoked(set(change.removed))
            await self._resync()
        if self._table.version is not None and self._table.version >= change.version:
            key = keys.token_change_acks(change.change_id)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, self._node_id)
                pipe.pexpire(key, _ACK_TTL_MS)
                await pipe.execute()
