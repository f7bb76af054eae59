"""Commands for the devices on this node, and their answers, over Redis pub/sub.

The API (:mod:`fleetlog.api.commands`) publishes a command (:class:`fleetlog.control.Command`)
on the control channel of the node the device's link names.  :class:`CommandRelay`
writes the command to that connection (or, if it is gone, to the device's current
connection on this node) and publishes on the command's reply channel
(:func:`fleetlog.keys.command_reply`) whether it went out, ``delivered`` or
``offline``; a v2 device's ``command_result`` frame follows there as ``result``
(the messages: :mod:`fleetlog.control`).

Publishing runs in the background, bounded: a reply that is lost (Redis down,
too many in flight) is the sender's timeout, nothing worse, and a device's
frames are never held up by it.  A command's replies go out in the order they
were made: on separate connections of the pool, a device's quick ``result``
overtook its ``delivered``, and the API, which took the ``result`` for a
missed delivery, sent the command a second time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

from fleetlog import control, keys, protocol
from fleetlog.gateway.connection import CommandAnswer
from fleetlog.gateway.registry import log_failure

__all__ = ["CommandRelay", "Recipient"]

log = logging.getLogger("fleetlog.gateway")

#: Replies being published at once, beyond which one is dropped (and logged).
MAX_PUBLISHING: Final = 10_000
#: ... and at most this many of them on a Redis connection at once.
PUBLISHING_CONNECTIONS: Final = 16


class Recipient(Protocol):
    """What the relay needs of a device connection."""

    @property
    def device_id(self) -> str | None: ...

    @property
    def v2(self) -> bool: ...

    def send_command(self, wire: bytes) -> bool: ...


#: Given a connection id and a device id: the connection to write to, or ``None``.
FindRecipient = Callable[[str, str], Recipient | None]


class CommandRelay:
    """Delivers commands to this node's connections and publishes what became of them."""

    def __init__(self, client: Any, node_id: str, find: FindRecipient, *,
                 max_publishing: int = MAX_PUBLISHING) -> None:
        self._client = client
        self._node_id = node_id
        self._find = find
        self._max_publishing = max_publishing
        self._publishing: set[asyncio.Task[None]] = set()
        #: Per reply channel, its newest publish: the next one on it waits for it.
        self._last: dict[str, asyncio.Task[None]] = {}
        #: Publishes on the wire at once: the client's pool is shared with ingest and links,
        #: and 300 replies at once took all its connections ("Too many connections").
        self._connections = asyncio.Semaphore(PUBLISHING_CONNECTIONS)
        #: Commands by outcome (``delivered``, ``offline``, ``answered``), for ``/metrics``.
        self.counts: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        """Replies being published now (at most ``max_publishing``)."""
        return len(self._publishing)

    def deliver(self, command: control.Command) -> None:
        """Write a command to its device and say on its reply channel whether it went out."""
        command_id, device_id = command.command_id, command.device_id
        recipient = self._find(command.conn, device_id)
        status: control.DeliveryStatus = "offline"
        if recipient is not None and recipient.device_id == device_id:
            wire = protocol.server_text_frame(
                protocol.command_frame(command_id, command.body, v2=recipient.v2))
            if recipient.send_command(wire):
                status = "delivered"
        self._count(status)
        self._publish(keys.command_reply(command_id),
                      control.delivery_reply(command_id, device_id, status, self._node_id))

    def answer(self, answer: CommandAnswer) -> None:
        """Hand a device's ``command_result`` to the command's sender (on its reply channel)."""
        self._count("answered")
        self._publish(keys.command_reply(answer.command_id),
                      control.result_reply(answer.command_id, answer.device_id, answer.payload))

    def _count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    def _publish(self, channel: str, message: bytes) -> None:
        if len(self._publishing) >= self._max_publishing:
            log.warning("too many command replies in flight; dropping one for %s", channel)
            return

        before = self._last.get(channel)

        async def publish() -> None:
            if before is not None:
                await asyncio.wait([before])  # the reply made before it goes first, whatever became of it
            try:
                async with self._connections:  # a burst queues here, not in the shared pool
                    await self._client.publish(channel, message)
            except Exception as exc:
                log_failure("publishing a command reply", exc)

        task = asyncio.get_running_loop().create_task(publish())
        self._publishing.add(task)
        self._last[channel] = task
        task.add_done_callback(self._publishing.discard)
        task.add_done_callback(lambda done: self._forget(channel, done))

    def _forget(self, channel: str, done: asyncio.Task[None]) -> None:
        if self._last.get(channel) is done:
            del self._last[channel]
