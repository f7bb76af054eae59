"""This node's device connections: which one holds each device's link.

With authentication a connection is its device's from the handshake, and a
newer one takes over (4409): here at once, on another node through the
registry (:data:`fleetlog.queue.scripts.LINK`, then :class:`fleetlog.control.Takeover`
on the old node's control channel).  With ``--auth none`` a connection speaks for
the device its last frame named; every connection that spoke for a device is
remembered, so the loss of one hands the link to another.  Each change is
written to Redis through the :class:`~fleetlog.gateway.registry.LinkRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from fleetlog.gateway.auth import Identity
from fleetlog.gateway.messages import CloseCode
from fleetlog.gateway.registry import LinkRegistry

__all__ = ["Devices", "Member"]


class Member(Protocol):
    """What the table needs of a connection."""

    conn_id: str

    @property
    def identity(self) -> Identity | None: ...

    @property
    def device_id(self) -> str | None: ...

    #: Whether it holds its device's link (``--auth none``: another connection may take it).
    linked: bool

    def close(self, code: int, reason: str) -> None: ...


C = TypeVar("C", bound=Member)


class Devices(Generic[C]):
    """The connections of this node, by connection id and by the device whose link they hold."""

    def __init__(self, registry: LinkRegistry, on_release: Callable[[], None]) -> None:
        self._registry = registry
        #: Called as each connection goes (the heap trim counts them).
        self._on_release = on_release
        self.connections: set[C] = set()
        #: The connection here that holds each device's link.
        self._by_device: dict[str, C] = {}
        #: ``--auth none``: the connections here that spoke for each device, the latest
        #: last (a dict as an ordered set).
        self._claims: dict[str, dict[C, None]] = {}
        self._by_conn: dict[str, C] = {}

    def connect(self, connection: C) -> None:
        """Register a new connection (its address was counted at accept: see :mod:`.handshake`).

        An authenticated device is linked at once and takes over its older
        connection, on this node or (through the registry) on another.
        """
        self.connections.add(connection)
        self._by_conn[connection.conn_id] = connection
        device_id = connection.device_id
        if connection.identity is not None and device_id is not None:
            previous = self._by_device.get(device_id)
            self._by_device[device_id] = connection
            if previous is not None:
                previous.close(CloseCode.TAKEN_OVER, "replaced by a newer connection of this device")
            self._registry.link(device_id, connection.conn_id)

    def claim(self, connection: C, device_id: str) -> None:
        """``--auth none``: ``connection`` sent a frame as ``device_id``: the link is its now.

        The connection that held it here is told (so its next frame takes it
        back), and the move is written as :meth:`.LinkRegistry.move` says (at
        most once per interval: two devices with one id take it on every frame);
        every connection that spoke for the device is remembered, so that
        the loss of one hands the link to another instead of marking the device
        offline while it still has a connection.
        """
        claims = self._claims.setdefault(device_id, {})
        claims.pop(connection, None)
        claims[connection] = None  # the latest to speak last
        holder = self._by_device.get(device_id)
        self._by_device[device_id] = connection
        if holder is not None and holder is not connection:
            holder.linked = False
            self._registry.move(device_id, connection.conn_id)  # may wait: two devices, one id
        else:
            self._registry.link(device_id, connection.conn_id)

    def unclaim(self, connection: C, device_id: str) -> None:
        """``connection`` no longer speaks for ``device_id`` (it claimed another id, or closed)."""
        claims = self._claims.get(device_id)
        if claims is not None:
            claims.pop(connection, None)
            if not claims:
                del self._claims[device_id]
        if self._by_device.get(device_id) is not connection:
            return  # another connection holds the link: it stays
        successor = next(reversed(claims), None) if claims else None  # the latest to speak
        if successor is None:
            del self._by_device[device_id]
            self._registry.unlink(device_id, connection.conn_id)
        else:
            self._by_device[device_id] = successor
            successor.linked = True
            self._registry.link(device_id, successor.conn_id)

    def release(self, connection: C) -> None:
        """The connection is gone: forget it, and unlink its device unless another holds it."""
        if connection not in self.connections:
            return
        self._on_release()
        self.connections.discard(connection)
        self._by_conn.pop(connection.conn_id, None)
        device_id = connection.device_id
        if device_id is None:
            return
        if connection.identity is None:
            self.unclaim(connection, device_id)
            return
        if self._by_device.get(device_id) is connection:
            del self._by_device[device_id]
        self._registry.unlink(device_id, connection.conn_id)

    def take_over(self, conn_id: str) -> None:
        """Another node linked this connection's device: close it (4409)."""
        connection = self._by_conn.get(conn_id)
        if connection is not None:
            connection.close(CloseCode.TAKEN_OVER, "replaced by a newer connection of this device")

    def recipient(self, conn_id: str, device_id: str) -> C | None:
        """The connection a command's link named, or, if that one is gone, the device's here."""
        return self._by_conn.get(conn_id) or self._by_device.get(device_id)

    def close_revoked(self, token_hashes: set[str]) -> None:
        """Close the connections of tokens revoked or rotated (4401)."""
        for connection in list(self.connections):
            identity = connection.identity
            if identity and identity.token_hash in token_hashes:
                connection.close(CloseCode.REVOKED, "credentials revoked or rotated")

    def connected_tokens(self) -> list[str]:
        """The token hashes of the connected devices (checked after missed changes)."""
        return [connection.identity.token_hash for connection in self.connections
                if connection.identity is not None and connection.identity.token_hash]
