"""Connections per remote address, with no I/O.

One address may hold at most ``max_per_address`` connections at once
(``--max-connections-per-ip``), so a single misbehaving host cannot take all
of a node's file descriptors and memory.  The gateway asks :meth:`acquire`
when a connection opens and calls :meth:`release` exactly once when a
connection that was admitted goes away.
"""

from __future__ import annotations

__all__ = ["AddressLimit"]


class AddressLimit:
    """Counts connections per address; refuses past ``max_per_address``."""

    __slots__ = ("_counts", "max_per_address", "total")

    def __init__(self, max_per_address: int) -> None:
        self.max_per_address = max_per_address
        self._counts: dict[str, int] = {}
        #: Connections open from every address together (each holds a file descriptor).
        self.total = 0

    def acquire(self, address: str | None) -> bool:
        """Count one more connection from ``address``; ``False`` (nothing counted) if it is full.

        ``None`` (no peer address, a Unix socket) is never limited.
        """
        if address is None:
            self.total += 1
            return True
        count = self._counts.get(address, 0)
        if count >= self.max_per_address:
            return False
        self._counts[address] = count + 1
        self.total += 1
        return True

    def release(self, address: str | None) -> None:
        """One connection :meth:`acquire` admitted from ``address`` is gone."""
        self.total -= 1
        if address is None:
            return
        left = self._counts.get(address, 1) - 1
        if left > 0:
            self._counts[address] = left
        else:
            self._counts.pop(address, None)

    def count(self, address: str) -> int:
        """Connections open from ``address``."""
        return self._counts.get(address, 0)

    def __len__(self) -> int:
        """Addresses with at least one connection open."""
        return len(self._counts)
