"""A subscription's messages, waited for with a timeout, in a way a cancel always ends.

redis-py's ``PubSub.get_message(timeout=t)`` runs its socket read under a
timeout of its own.  A task cancelled in the instant that timeout fires can
lose the cancellation inside redis-py and go on waiting on the connection with
no timeout at all: a gateway's token watcher, cancelled by the gateway's
shutdown, held that shutdown until ``up`` killed it 20 s later (1 stop in about
15).  :class:`Messages` never gives redis-py a timeout: the read blocks until a
message comes, in a task of its own, and the caller's timeout is
``asyncio.wait``'s, which leaves the read alone.  A cancel then reaches either
the caller's wait or, through :meth:`Messages.close`, the read's plain await:
both let it through.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Messages"]


class Messages:
    """The messages of ``pubsub`` (subscribed already), one :meth:`get` at a time.

    A read left waiting when :meth:`get` times out is kept for the next call,
    so no message is lost between calls.  :meth:`close` ends a read still
    waiting (``pubsub`` stays open); :meth:`aclose` (in a ``finally``) ends it
    and closes ``pubsub``.
    """

    def __init__(self, pubsub: Any, *, ignore_subscribe_messages: bool = False) -> None:
        self._pubsub = pubsub
        self._ignore_subscribe_messages = ignore_subscribe_messages
        self._read: asyncio.Future[Any] | None = None

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or ``None`` when none came within ``timeout`` seconds.

        (``None`` also for a subscribe confirmation, with ``ignore_subscribe_messages``.)
        A failed read raises its error here (redis-py's ``ConnectionError`` ...).
        """
        if self._read is None:
            # timeout=None: block without a timeout inside redis-py (see the module).
            self._read = asyncio.ensure_future(self._pubsub.get_message(
                ignore_subscribe_messages=self._ignore_subscribe_messages, timeout=None))
        done, _ = await asyncio.wait({self._read}, timeout=max(0.0, timeout))
        if not done:
            return None
        read, self._read = self._read, None
        message: dict[str, Any] | None = read.result()
        return message

    async def close(self) -> None:
        """End the read still waiting, if any (before the pubsub is closed or dropped)."""
        read, self._read = self._read, None
        if read is None:
            return
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)

    async def aclose(self) -> None:
        """End the read still waiting, then close the pubsub (its connection goes back)."""
        await self.close()
        await self._pubsub.aclose()
