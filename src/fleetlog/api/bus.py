"""The API process's own pub/sub connection: operator-token changes and command replies.

One connection per API process (:class:`Bus`), however many requests it serves:

* it is always subscribed to :data:`fleetlog.keys.API_TOKEN_CHANGES`, on which
  ``fleetlog api-token revoke`` announces the SHA-256 of the token it revoked
  (in the same script as the revocation).  Every answer that a guarded request
  holds open with that token (a live tail, an export: :mod:`.guard`) is ended.
  Pub/sub delivers at most once, so after each (re)subscription, and every
  :data:`RECHECK` seconds, the tokens of the open answers are looked up again
  (one ``HMGET``): one missed while Redis was away is ended then.
* a command waiting for its device's reply (:mod:`.commands`) subscribes its
  own reply channel on this same connection for as long as it waits
  (:meth:`Bus.replies`), rather than holding a pooled connection of its own:
  a thousand waiting commands cost no connection of the pool every other
  request needs.  The command is published only once Redis has confirmed that
  subscription, so no reply can come before it is listened for.

A reply is read exactly (:func:`fleetlog.exactjson.loads`: a device's
``command_result`` comes back whole, an integer beyond 64 bits included), and
a reply that cannot be read is never dropped: it reaches its command as
``{"status": "unreadable", "error": ...}``, so that the caller is told rather
than left to time out.

When the connection is lost, every waiting command is told so
(:class:`redis.ConnectionError`, a 503 for its caller), and the bus subscribes
again after :data:`RESUBSCRIBE_DELAY` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final

import redis
import redis.asyncio

from fleetlog import exactjson, keys
from fleetlog.api.auth import known_entry
from fleetlog.queue.connection import REDIS_DOWN, initialize, is_cluster
from fleetlog.queue.subscription import Messages

__all__ = ["RECHECK", "Bus", "Replies"]

log = logging.getLogger("fleetlog.api")

#: Seconds between two look-ups of the tokens of open answers (a missed announcement's bound).
RECHECK: Final = 30.0
#: Seconds between two subscription attempts while Redis does not answer.
RESUBSCRIBE_DELAY: Final = 1.0
#: Replies one waiting command keeps unread at most (a node sends two: more are dropped).
MAX_QUEUED: Final = 16

_LOST: Final = object()
#: What unsubscribing on a connection being lost may raise.
_UNSUBSCRIBE_ERRORS: Final[tuple[type[BaseException], ...]] = (*REDIS_DOWN, RuntimeError)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Replies:
    """What one waiting command's reply channel brings (see :meth:`Bus.replies`)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(MAX_QUEUED + 1)
        self.subscribed = asyncio.Event()

    def put(self, value: dict[str, Any]) -> None:
        if self._queue.qsize() < MAX_QUEUED:
            self._queue.put_nowait(value)

    def lose(self) -> None:
        """The subscription is gone: the next :meth:`next` raises."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_LOST)
        self.subscribed.set()  # wake a subscriber still waiting for its confirmation

    async def next(self, deadline: float) -> dict[str, Any] | None:
        """The next reply (a JSON object), or ``None`` at ``deadline`` (``time.monotonic()``)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            value = await asyncio.wait_for(self._queue.get(), left)
        except TimeoutError:
            return None
        if value is _LOST:
            self._queue.put_nowait(_LOST)  # and for every later call
            raise redis.ConnectionError("the API's subscription to command replies was lost")
        reply: dict[str, Any] = value
        return reply


class Bus:
    """See the module docstring.  Call :meth:`start` in the event loop, :meth:`close` at shutdown."""

    def __init__(self, client: redis.asyncio.Redis, channel: str = keys.API_TOKEN_CHANGES,
                 recheck: float = RECHECK) -> None:
        self._client = client
        self._channel = channel
        self._recheck_every = recheck
        self._table = keys.api_token_keys(is_cluster(client)).table
        self._pubsub: Any = None  # set while subscribed
        self._up = asyncio.Event()
        self._replies: dict[str, Replies] = {}
        self._watching: dict[str, dict[object, Callable[[], None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-bus")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- tokens ----------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, digest: str, end: Callable[[], None]) -> Iterator[None]:
        """Call ``end()`` when the token whose SHA-256 is ``digest`` is revoked or changed."""
        ends = self._watching.setdefault(digest, {})
        handle = object()
        ends[handle] = end
        try:
            yield
        finally:
            ends.pop(handle, None)
            if not ends:
                self._watching.pop(digest, None)

    @property
    def watched(self) -> int:
        """Answers watched now (all tokens)."""
        return sum(len(ends) for ends in self._watching.values())

    def _end(self, digest: str) -> None:
        for end in list(self._watching.get(digest, {}).values()):
            end()

    async def _recheck(self) -> None:
        """End the answers whose token is gone (an announcement missed)."""
        digests = list(self._watching)
        if not digests:
            return
        entries = await self._client.hmget(self._table, digests)
        for digest, raw in zip(digests, entries, strict=True):
            if raw is None or known_entry(raw) is None:
                self._end(digest)

    # -- command replies ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def replies(self, channel: str, timeout: float) -> AsyncIterator[Replies]:
        """Listen on ``channel`` (one command's reply channel) for the ``async with`` block.

        Entered once Redis confirmed the subscription; raises redis-py's
        :class:`~redis.ConnectionError` when the bus is not subscribed within
        ``timeout`` seconds (Redis away).
        """
        if channel in self._replies:
            raise ValueError(f"{channel} is listened to already")
        replies = Replies()
        self._replies[channel] = replies
        pubsub = None
        try:
            try:
                await asyncio.wait_for(self._up.wait(), timeout)
            except TimeoutError:
                raise redis.ConnectionError("no subscription to command replies (Redis away?)") from None
            pubsub = self._pubsub
            if pubsub is None:  # lost between the wake-up and now
                raise redis.ConnectionError("the API's subscription to command replies was lost")
            await pubsub.subscribe(channel)
            try:
                await asyncio.wait_for(replies.subscribed.wait(), timeout)
            except TimeoutError:
                raise redis.TimeoutError(f"Redis did not confirm the subscription to {channel}") from None
            if pubsub is not self._pubsub:
                raise redis.ConnectionError("the API's subscription to command replies was lost")
            yield replies
        finally:
            self._replies.pop(channel, None)
            if pubsub is not None and pubsub is self._pubsub:
                # Shielded: a caller that went away (cancelled) still unsubscribes.
                await asyncio.shield(self._unsubscribe(pubsub, channel))

    @staticmethod
    async def _unsubscribe(pubsub: Any, channel: str) -> None:
        try:
            await pubsub.unsubscribe(channel)
        except _UNSUBSCRIBE_ERRORS as exc:  # the loop resubscribes from scratch anyway
            log.debug("unsubscribing %s: %s", channel, exc)

    # -- the connection --------------------------------------------------------------

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Handle one message; True when it confirms the bus's own subscription."""
        kind, channel = message.get("type"), message.get("channel")
        if channel is None:
            return False
        name = _text(channel)
        if kind == "message":
            if name == self._channel:
                self._end(_text(message["data"]))
            elif (replies := self._replies.get(name)) is not None:
                try:
                    value = exactjson.loads(message["data"])
                except ValueError as exc:
                    value = {"status": "unreadable", "error": str(exc)}
                if isinstance(value, dict):
                    replies.put(value)
        elif kind == "subscribe":
            if name == self._channel:
                return True
            if (replies := self._replies.get(name)) is not None:
                replies.subscribed.set()
        return False

    async def _run(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            messages = Messages(pubsub)
            try:
                await initialize(self._client)
                await pubsub.subscribe(self._channel)
                self._pubsub = pubsub
                check_at = float("inf")  # from the confirmation on
                while True:
                    wait = max(0.0, min(check_at - time.monotonic(), self._recheck_every))
                    message = await messages.get(wait)
                    if message is not None and self._dispatch(message):
                        self._up.set()
                        check_at = 0.0  # (re)subscribed: what was announced meanwhile is lost
                    if time.monotonic() >= check_at:
                        await self._recheck()
                        check_at = time.monotonic() + self._recheck_every
            except REDIS_DOWN as exc:
                log.warning("token changes and command replies: Redis not answering (%s); retrying", exc)
            except Exception:  # a bug must not end the subscription for good
                log.exception("token changes and command replies: subscribing again")
            finally:
                self._pubsub = None
                self._up.clear()
                for replies in list(self._replies.values()):
                    replies.lose()
                with contextlib.suppress(Exception):
                    await asyncio.shield(messages.aclose())
            await asyncio.sleep(RESUBSCRIBE_DELAY)
