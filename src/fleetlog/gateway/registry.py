"""Which device is on which connection of which node, kept in Redis.

``device:links`` (the original's hash) maps a device id to JSON
``{"node", "conn", "since"}``.  A gateway sets the field when a connection
names its device, and deletes it on disconnect only if it still names that
connection (atomically, in Lua), so a device that reconnected elsewhere is
never unlinked by its old connection.  With authentication on, a new link
takes over: the node holding the device's previous connection is told, on its
control channel, to close it (4409).

Each node keeps ``fleetlog:node:<id>`` alive with a TTL.  A node that dies
without cleaning up leaves links behind, but they point at a node whose
heartbeat key is gone: readers report them offline (:func:`fleetlog.links.is_online`).

Link changes and refusal counts are queued and written by one task, each
device's in order, so a quick connect/disconnect can never be applied
backwards; while Redis is down, or refuses writes (out of memory, read-only),
they wait, and are written once it takes them again.  What waits is kept per
device and only what can still change the outcome (:func:`_queue_link`), so
an outage of an hour holds a few updates per device, not every relink of the
hour; and a link that moves between two live connections of this node (with
``--auth none``, two devices sending as one id take it in turn, frame after
frame) is written at most once per ``_MOVE_INTERVAL`` (:meth:`LinkRegistry.move`).
Every task here outlives any error: it logs it, backs off and carries on
(:func:`log_failure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio
import redis.exceptions

from fleetlog import keys
from fleetlog.backoff import Backoff
from fleetlog.queue import scripts
from fleetlog.queue.connection import REDIS_DOWN, public_reason
from fleetlog.records import iso_ms

__all__ = ["LinkRegistry", "log_failure"]

log = logging.getLogger("fleetlog.gateway")

#: Longest pause between two attempts of a task that keeps failing: link updates and
#: control messages (take-overs) must resume within seconds of Redis coming back.
_MAX_BACKOFF = 2.0
#: The largest control message handled (a command of the API's largest ``max_command_bytes``,
#: 16 MiB, and its envelope); a larger one is logged and dropped, never decoded.
MAX_CONTROL_BYTES = 17 * 1024 * 1024
#: Characters of a dropped control message that its log line shows.
_SHOWN = 200
#: Devices whose link updates go in one pipeline at most; the others wait for the next
#: (after an outage every device of a node may have one waiting).
_LINKS_PER_WRITE = 1000

#: Devices and reasons whose refusal counts may wait to be written (see ``count_refusal``).
_REFUSAL_KEYS = 10_000

#: Seconds within which a device's link, once written, is not written again for a move
#: between two live connections of this node (:meth:`LinkRegistry.move`).
_MOVE_INTERVAL = 0.05

#: A link update: ``("link", connection id)``, ``("move", connection id)`` (from another
#: live connection of this node) or ``("unlink", connection id)``.
_LinkOp = tuple[str, str]


def _queue_link(pending: dict[str, list[_LinkOp]], device_id: str, op: _LinkOp) -> None:
    """Add ``op`` to the device's updates waiting in ``pending``, keeping what can still matter.

    A link sets the device's field whatever it held (:data:`~fleetlog.queue.scripts.LINK`),
    so it replaces every update of the device still waiting: an unlink before it is
    undone by it, a link before it overwritten.  What a take-over sends is the same
    either way: the field still names the connection Redis last saw, here or on the
    other node.  A move does the same while the field names this node, and nothing
    once another node took it: it replaces what waits as well, but a link waiting
    (not written yet) still must be, so the two go as one link.  An unlink deletes
    the field only while it names that connection (:data:`~fleetlog.queue.scripts.UNLINK`),
    so it goes after what waits, once.
    """
    kind, conn_id = op
    if kind == "unlink":
        ops = pending.setdefault(device_id, [])
        if op not in ops:
            ops.append(op)
    elif kind == "move" and any(waiting == "link" for waiting, _ in pending.get(device_id, ())):
        pending[device_id] = [("link", conn_id)]
    else:
        pending[device_id] = [op]


def _shown(data: object) -> str:
    """A control message for a log line: its start and its size, never all of it."""
    text = repr(data)
    size = len(data) if isinstance(data, bytes | str) else len(text)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({size} bytes)"


def log_failure(what: str, exc: Exception) -> str:
    """Log why ``what`` failed and return the reason, for ``/healthz``.

    A Redis error (down, out of memory, read-only ...) is an operating
    condition: one line.  Anything else is a bug: the traceback.
    """
    if isinstance(exc, REDIS_DOWN):
        reason = f"Redis unavailable: {exc}"
    elif isinstance(exc, redis.exceptions.RedisError):
        reason = f"Redis refused: {exc}"
    else:
        log.exception("%s failed", what)
        return f"{what} failed: {type(exc).__name__}: {exc}"
    log.warning("%s failed: %s", what, reason)
    return reason

#: Called with each message a node receives on its control channel.
ControlHandler = Callable[[dict[str, Any]], None]


def _unless_cancelled() -> None:
    """Re-raise cancellation that a client library turned into an error, or swallowed.

    redis-py can absorb a ``CancelledError`` that lands inside a command (its
    timeout and reconnect handling) and return normally; the task is then
    still ``cancelling()`` but would never stop, so every loop checks here too.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _handle_control(data: object, on_control: ControlHandler) -> None:
    """Decode one control message and hand it on; a huge, malformed or failing one is logged
    and dropped: nothing in a message may end the subscription."""
    try:
        if not isinstance(data, bytes | str):
            log.warning("dropping a control message that is not text: %s", _shown(data))
            return
        if len(data) > MAX_CONTROL_BYTES:
            log.warning("dropping a control message of %d bytes (at most %d): %s", len(data),
                        MAX_CONTROL_BYTES, _shown(data[:_SHOWN]))
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            log.warning("dropping a control message that is not JSON (%s): %s", exc, _shown(data))
            return
        if not isinstance(message, dict):
            log.warning("dropping a control message that is not a JSON object: %s", _shown(data))
            return
        on_control(message)
    except Exception:  # a bug in a handler: its traceback, and the next message
        log.exception("handling a control message failed: %s", _shown(data))


class LinkRegistry:
    """Writes links, refusal counts and the heartbeat; listens for control messages."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        node_id: str,
        heartbeat_ttl: float,
        info: dict[str, Any],
        take_over: bool,
    ) -> None:
        self._client = client
        self.node_id = node_id
        self._ttl_ms = int(heartbeat_ttl * 1000)
        self._info = orjson.dumps({"node": node_id, **info})
        self._take_over = "1" if take_over else "0"
        #: Link updates waiting to be written, per device in order (:func:`_queue_link`).
        self._links: dict[str, list[_LinkOp]] = {}
        #: Moves waiting out ``_MOVE_INTERVAL``: device -> (connection, when it may go), and
        #: the same times in a heap (an entry whose device no longer waits is skipped).
        self._moves: dict[str, tuple[str, float]] = {}
        self._moves_due: list[tuple[float, str]] = []
        #: When (``time.monotonic()``) each device's link was last sent, for the devices
        #: written since ``_written_since`` and in the interval before (two generations:
        #: what is older no longer holds a move back, and is dropped).
        self._written: dict[str, float] = {}
        self._written_before: dict[str, float] = {}
        self._written_since = 0.0
        self._refusals: Counter[tuple[str, str]] = Counter()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: Why the last heartbeat failed (``None`` once one succeeds).
        self.last_error: str | None = None
        #: The same, short and generic (:func:`~fleetlog.queue.connection.public_reason`).
        self.last_problem: str | None = None
        #: When (``time.monotonic()``) the last heartbeat was written.
        self.beat_at = 0.0

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The registry's background tasks; one that is done before :meth:`close` died."""
        return self._tasks

    def start(self, on_control: ControlHandler) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write(), name="links"),
            loop.create_task(self._heartbeat(), name="heartbeat"),
            loop.create_task(self._listen(on_control), name="control"),
        ]

    def link(self, device_id: str, conn_id: str) -> None:
        """``conn_id`` speaks for the device now: written at once."""
        self._queue(device_id, ("link", conn_id))

    def unlink(self, device_id: str, conn_id: str) -> None:
        """``conn_id`` is gone: the device's link is deleted if it still names it."""
        self._queue(device_id, ("unlink", conn_id))

    def move(self, device_id: str, conn_id: str) -> None:
        """The device's link moves to ``conn_id`` from another live connection of this node.

        With ``--auth none`` two devices configured with one id take its link in
        turn, frame after frame: written each time, that was a Redis script per
        frame.  A move is written at once unless the device's link was sent
        less than ``_MOVE_INTERVAL`` ago; then the latest move waits out the rest
        of it, and presence lags that much.  Only moves wait: a first link, a
        reconnect's and an authenticated take-over are written at once, and any
        other update of the device goes after the waiting move.  A move never
        replaces a link that another node wrote meanwhile (the device's newer
        connection is there): see :data:`~fleetlog.queue.scripts.LINK`.
        """
        waiting = self._moves.get(device_id)
        if waiting is not None:  # the latest move waits in its place
            self._moves[device_id] = (conn_id, waiting[1])
            return
        if device_id not in self._links:  # else it goes with what waits
            written = self._written.get(device_id) or self._written_before.get(device_id)
            if written is not None and written + _MOVE_INTERVAL > time.monotonic():
                self._moves[device_id] = (conn_id, written + _MOVE_INTERVAL)
                heapq.heappush(self._moves_due, (written + _MOVE_INTERVAL, device_id))
                self._wakeup.set()  # the writer's next wake-up may be due earlier
                return
        self._queue(device_id, ("move", conn_id))

    def _queue(self, device_id: str, op: _LinkOp) -> None:
        moved = self._moves.pop(device_id, None)
        if moved is not None:  # it goes first, as it came first
            _queue_link(self._links, device_id, ("move", moved[0]))
        _queue_link(self._links, device_id, op)
        self._wakeup.set()

    def _release_moves(self, now: float) -> float | None:
        """Queue the moves whose wait is over (all of them once closing); when the next
        one's is over (``None``: none waits)."""
        heap, moves = self._moves_due, self._moves
        while heap and (heap[0][0] <= now or self._closing):
            at, device_id = heapq.heappop(heap)
            waiting = moves.get(device_id)
            if waiting is not None and waiting[1] == at:  # else released already, by _queue
                del moves[device_id]
                _queue_link(self._links, device_id, ("move", waiting[0]))
        return heap[0][0] if heap else None

    def _sent(self, links: dict[str, list[_LinkOp]], now: float) -> None:
        """Note when the devices of ``links`` were sent to be written (see ``_written``)."""
        if now - self._written_since >= _MOVE_INTERVAL:
            self._written_before, self._written, self._written_since = self._written, {}, now
        written = self._written
        for device_id in links:
            written[device_id] = now

    @property
    def pending(self) -> int:
        """Link updates waiting to be written (moves waiting out their interval too)."""
        return sum(map(len, self._links.values())) + len(self._moves)

    @property
    def pending_refusals(self) -> int:
        """Refusal counts (per device and reason) waiting to be written."""
        return len(self._refusals)

    def count_refusal(self, device_id: str | None, reason: str) -> None:
        """Count a refused frame or handshake; ``None`` for an unknown device.

        Counts wait per device and reason until they are written; past
        ``_REFUSAL_KEYS`` waiting (an outage while many devices are refused:
        with ``--auth none`` a frame may name any id) a new device's count goes
        to the unknown device's, so the total stays exact and the memory bounded.
        """
        refusals = self._refusals
        key = (device_id or keys.ANONYMOUS, reason)
        if key not in refusals and len(refusals) >= _REFUSAL_KEYS:
            key = (keys.ANONYMOUS, reason)
        refusals[key] += 1
        self._wakeup.set()

    async def _write(self) -> None:
        backoff = Backoff(initial=0.1, cap=_MAX_BACKOFF)
        while True:
            _unless_cancelled()
            due = self._release_moves(time.monotonic()) if self._moves_due else None
            if not self._links and not self._refusals:
                if self._closing:
                    return
                if due is None:
                    await self._wakeup.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), due - time.monotonic())
                self._wakeup.clear()
                continue
            links = self._take_links()
            self._sent(links, time.monotonic())  # a move that comes while they are on the way waits
            refusals = self._refusals.copy()
            try:
                await self._write_batch(links, refusals)
                backoff.reset()
            except Exception as exc:
                _unless_cancelled()
                log_failure("writing link updates", exc)
                if self._closing:
                    log.warning("dropping %d link updates at shutdown", self.pending)
                    return
                await backoff.sleep()

    def _take_links(self) -> dict[str, list[_LinkOp]]:
        """The updates of the first ``_LINKS_PER_WRITE`` devices waiting, out of the queue."""
        if len(self._links) <= _LINKS_PER_WRITE:
            links, self._links = self._links, {}
            return links
        links = dict(itertools.islice(self._links.items(), _LINKS_PER_WRITE))
        for device_id in links:
            del self._links[device_id]
        return links

    def _put_back(self, links: dict[str, list[_LinkOp]]) -> None:
        """Queue updates that were not written again, before those queued meanwhile."""
        for device_id, ops in self._links.items():
            for op in ops:
                _queue_link(links, device_id, op)
        self._links = links

    async def _write_batch(self, links: dict[str, list[_LinkOp]],
                           refusals: Counter[tuple[str, str]]) -> None:
        """Write ``links`` and ``refusals``; forget what was written, raise if anything was not.

        A pipeline runs every command even when one fails (out of memory, say),
        so the refusal counts that were added are forgotten one by one.  Link
        updates are queued again all together if one failed, or if the write
        did not finish (cancelled at shutdown): replaying a link or an unlink is
        harmless, and replaying all of them keeps each device's order.
        """
        written = False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for device_id, ops in links.items():
                    for action, conn_id in ops:
                        if action == "unlink":
                            pipe.eval(scripts.UNLINK, 1, keys.DEVICE_LINKS, device_id, conn_id)
                            continue
                        value = orjson.dumps({"node": self.node_id, "conn": conn_id,
                                              "since": iso_ms(int(time.time() * 1000))})
                        pipe.eval(scripts.LINK, 1, keys.DEVICE_LINKS, device_id, value, self.node_id,
                                  conn_id, keys.node_control(""), self._take_over,
                                  "1" if action == "move" else "0")
                sent = len(pipe)
                for (device_id, reason), count in refusals.items():
                    pipe.hincrby(keys.refusals(device_id), reason, count)
                results = await pipe.execute(raise_on_error=False)
            written = not any(isinstance(result, Exception) for result in results[:sent])
        finally:
            if not written:
                self._put_back(links)
        errors = [result for result in results if isinstance(result, Exception)]
        for key, result in zip(refusals, results[sent:], strict=True):
            if not isinstance(result, Exception):
                self._refusals[key] -= refusals[key]
        self._refusals = +self._refusals
        if errors:
            raise errors[0]

    async def _heartbeat(self) -> None:
        key = keys.node_heartbeat(self.node_id)
        while True:
            try:
                await self._client.set(key, self._info, px=self._ttl_ms)
                self.last_error = self.last_problem = None
                self.beat_at = time.monotonic()
            except Exception as exc:
                _unless_cancelled()
                self.last_error = log_failure("heartbeat", exc)
                self.last_problem = public_reason(exc)
            _unless_cancelled()
            await asyncio.sleep(self._ttl_ms / 3000)

    async def _listen(self, on_control: ControlHandler) -> None:
        backoff = Backoff(initial=0.1, cap=_MAX_BACKOFF)
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.node_control(self.node_id))
                backoff.reset()
                async for message in pubsub.listen():
                    _handle_control(message.get("data"), on_control)
            except Exception as exc:
                _unless_cancelled()
                log_failure("listening for control messages", exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception as exc:
                    _unless_cancelled()
                    log_failure("closing the control subscription", exc)
            # Also when the subscription simply ended: never a tight loop.
            _unless_cancelled()
            await backoff.sleep()

    async def close(self) -> None:
        """Write the pending link changes, then drop the heartbeat."""
        self._closing = True
        self._wakeup.set()
        writer, *others = self._tasks
        for task in others:
            task.cancel()
        _, unfinished = await asyncio.wait(self._tasks, timeout=5)
        if writer in unfinished:
            log.warning("link updates not written within 5 s of shutdown")
        for task in unfinished:
            task.cancel()
        try:
            await asyncio.wait_for(self._client.delete(keys.node_heartbeat(self.node_id)), 2)
        except Exception as exc:  # the key expires by itself
            log_failure("removing the heartbeat", exc)
