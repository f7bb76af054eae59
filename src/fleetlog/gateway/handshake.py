"""picows' server protocol, before the WebSocket upgrade: a 431 and a deferred upgrade.

picows parses the HTTP request in its compiled code and offers no hook before
the upgrade but its synchronous ``on_ws_upgrade`` callback.  Two things need
more: a request head over picows' limit must get an answer (picows hangs up
without one), and a device token the gateway's cache does not hold must be
looked up in Redis before the upgrade is decided, which a synchronous callback
cannot wait for.  :class:`HandshakeProtocol` sees the bytes before picows does
and does both; once the head has ended it steps out of the way.
:func:`token_in_head` finds the token in a request head, with no I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs

from fleetlog import protocol
from fleetlog.errors import ErrorCode, TooManyAuthFailures
from fleetlog.gateway.addresses import AddressLimit
from fleetlog.gateway.auth import token_from
from fleetlog.gateway.messages import FIRST_READ_SIZE, BufferBudget, grows
from fleetlog.queue.connection import REDIS_DOWN

__all__ = ["MAX_REQUEST_HEAD", "HandshakeProtocol", "token_in_head"]

log = logging.getLogger("fleetlog.gateway")

#: picows' limit on a request's line and headers (``WSProtocol._http_max_size``,
#: fixed in its C code); past it picows drops the connection without a word.
MAX_REQUEST_HEAD: Final = 16 * 1024
_HEADERS_TOO_LARGE: Final = protocol.error_frame(
    ErrorCode.TOO_LARGE, f"request line and headers over {MAX_REQUEST_HEAD} bytes")
_431: Final = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(_HEADERS_TOO_LARGE), _HEADERS_TOO_LARGE))
_LOOKUP_FAILED: Final = protocol.error_frame(
    ErrorCode.UNAVAILABLE, "cannot check the token now (Redis unreachable); retry later")
#: A token the gateway could not look up is not a bad token: 401 would tell a device to stop.
_503: Final = (b"HTTP/1.1 503 Service Unavailable\r\n"
               b"Content-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(_LOOKUP_FAILED), _LOOKUP_FAILED))


#: picows' own read methods, looked up once (the per-read path calls them).
_get_buffer: Final = WSProtocol.get_buffer
_buffer_updated: Final = WSProtocol.buffer_updated


def _http_error(status: str, code: ErrorCode, message: str) -> bytes:
    body = protocol.error_frame(code, message)
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body))


_408: Final = _http_error("408 Request Timeout", ErrorCode.BAD_FRAME,
                          "the request line and headers did not arrive in time")
_BUFFERS_FULL: Final = _http_error("503 Service Unavailable", ErrorCode.UNAVAILABLE,
                                   "the gateway holds too much for its connections; retry later")
_TOO_MANY_CONNECTIONS: Final = _http_error(
    "429 Too Many Requests", ErrorCode.RATE_LIMITED,
    "too many connections from this address (max_connections_per_ip, per gateway process)")


def _too_many(exc: TooManyAuthFailures) -> bytes:
    body = protocol.error_frame(ErrorCode.RATE_LIMITED, str(exc),
                                retry_after_ms=math.ceil(exc.retry_after * 1000))
    return (b"HTTP/1.1 429 Too Many Requests\r\n"
            b"Content-Type: application/json\r\nRetry-After: %d\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (max(1, math.ceil(exc.retry_after)), len(body), body))


class HandshakeProtocol(WSProtocol):  # type: ignore[misc]  # picows' protocol is untyped
    """picows' server protocol, answering ``431`` where picows would just hang up.

    picows enforces :data:`MAX_REQUEST_HEAD` inside its compiled parser, which
    offers no hook: it closes the socket and logs, so the client sees a reset.
    This subclass sees every byte before picows does (``get_buffer`` /
    ``buffer_updated`` are how the transport hands them over), keeps a copy
    until the headers end, and when they reach the limit writes the 431 and
    closes instead of passing the bytes on.  Once the head has ended
    :meth:`_head_ended` hands the reads to picows with one check each (the read
    buffer's budget, below).  It has
    ``__slots__`` (no instance ``__dict__``): one is held per connection.

    It also defers the upgrade while a token is looked up: picows decides it
    in a synchronous callback, so when the headers are complete and
    :attr:`lookup` returns an awaitable (a token not in the gateway's cache),
    the last bytes are kept from picows, reading pauses, and once the lookup
    ends the bytes are handed over and picows answers from the cache.

    And it keeps picows' read buffer within :attr:`read_budget` for the
    connection's whole life (:meth:`_fits`): picows doubles the buffer whenever
    a read leaves it over 90% full, and holds a frame's bytes there until the
    frame is complete, so a connection that sends most of a big frame and
    never the rest held up to twice the frame limit unseen (200 such
    connections: 345 MB).  Each doubling is taken from the budget before the
    read that causes it reaches picows; past the budget the connection's reads
    are dropped and it closes (1008), as for unfinished fragmented messages.
    That costs one Python call per read.
    """

    __slots__ = ("_admitted", "_deferred", "_head", "_peer_address", "_timer", "_view", "addresses",
                 "counted", "head_timeout", "lookup", "read_budget", "read_size")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._head: bytearray | None = bytearray()  # None once the headers ended
        self._view: memoryview | None = None
        #: Counts this connection against its address from accept to close (handshake
        #: included); ``None``: no limit.
        self.addresses: AddressLimit | None = None
        #: Called after each change of ``addresses`` (the gateway watches the total).
        self.counted: Callable[[], None] | None = None
        self._admitted = False
        self._peer_address: str | None = None
        #: Seconds the request head may take; past it, a 408 (picows would just hang up).
        self.head_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Given the request head and the peer's address, an awaitable to finish
        #: before the upgrade, or ``None``.  It raises :class:`TooManyAuthFailures`
        #: for a 429; anything else it raises is a 503 (it logs a Redis outage itself).
        self.lookup: Callable[[bytes, str | None], Awaitable[object] | None] | None = None
        self._deferred: asyncio.Task[None] | None = None
        #: The process' budget for what connections hold (``None``: no limit), and the size
        #: of picows' read buffer for this one, as picows grows it (what it took of the budget
        #: is this less its first size).
        self.read_budget: BufferBudget | None = None
        self.read_size = FIRST_READ_SIZE

    def connection_made(self, transport: Any) -> None:
        """Count the connection against its address before anything is read (429 past the limit).

        picows sets itself up first in any case: its ``connection_lost`` must
        find the connection it was given.
        """
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer_address = str(peer[0]) if peer else None
        if self.addresses is not None:
            if not self.addresses.acquire(self._peer_address):
                transport.write(_TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self._admitted = True
            if self.counted is not None:
                self.counted()
        if self.head_timeout is not None:
            # Just before picows' own timer, which would close without a word.
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, self.head_timeout - 0.05), self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.read_budget is not None and self.read_size > FIRST_READ_SIZE:
            self.read_budget.give(self.read_size - FIRST_READ_SIZE)
        self.read_size = FIRST_READ_SIZE
        if self._admitted:
            self._admitted = False
            assert self.addresses is not None
            self.addresses.release(self._peer_address)
            if self.counted is not None:
                self.counted()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._timer = None
        if self._head is None:
            return  # the head ended (a lookup may still run: that is not the device's delay)
        transport = self.transport.underlying_transport
        if not transport.is_closing():
            transport.write(_408)
            transport.close()

    def get_buffer(self, size_hint: int) -> memoryview:
        view: memoryview = super().get_buffer(size_hint)
        if self._head is not None:
            self._view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        head = self._head
        if head is not None:
            assert self._view is not None
            head += self._view[:nbytes]
            self._view = None
            end = head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(head)) >= MAX_REQUEST_HEAD:
                self._head = None
                transport = self.transport.underlying_transport
                transport.write(_431)
                transport.close()
                log.info("refused a request with headers over %d bytes (431)", MAX_REQUEST_HEAD)
                return
            if end >= 0:
                lookup = self.lookup
                self._head_ended()
                pending = lookup(bytes(head[:end]), self._peer()) if lookup is not None else None
                if pending is not None:
                    chunk = bytes(head[len(head) - nbytes:])
                    self.transport.underlying_transport.pause_reading()
                    self._deferred = asyncio.ensure_future(self._upgrade_after(pending, chunk))
                    return
        if self._fits(nbytes):
            super().buffer_updated(nbytes)

    def _fits(self, nbytes: int) -> bool:
        """Whether picows may take the ``nbytes`` just read into its buffer's free space.

        picows doubles its read buffer when a read leaves it more than 90%
        full or within 256 bytes of full (``_maybe_grow_read_buffer``); the
        doubling is taken from :attr:`read_budget` first.  Past the budget the
        read is dropped, every later one too (the frame it was part of can
        no longer be parsed), and the connection closes: see :meth:`_refuse_reads`.
        """
        size = self.read_size
        return not grows(size, size - len(_get_buffer(self, -1)) + nbytes) or self._grow(size)

    def _grow(self, size: int) -> bool:
        """picows is about to double its read buffer of ``size`` bytes: take them from the
        budget, or refuse the read (see :meth:`_fits`)."""
        budget = self.read_budget
        if budget is None or budget.take(size):
            self.read_size = size * 2
            return True
        self._refuse_reads()
        return False

    def _refuse_reads(self) -> None:
        """Drop every read from now on and close: 1008 after the replies owed once the
        WebSocket is up (the connection's :meth:`buffer_refused`), else a 503."""
        self.__class__ = _Dropping
        transport = self.transport.underlying_transport
        transport.set_protocol(self)
        # Counted (fleetlog_gateway_buffer_full_closes_total), not logged: an attack is thousands.
        log.debug("closed a connection: its read buffer would pass max_buffered_bytes")
        refused = getattr(self.listener, "buffer_refused", None)
        if refused is not None:
            refused()
        elif not transport.is_closing():
            transport.write(_BUFFERS_FULL)
            transport.close()

    def _peer(self) -> str | None:
        return self._peer_address

    def _head_ended(self) -> None:
        """Hand every later read to picows, past the head's checks (the budget's stays).

        The protocol becomes a :class:`_HeadEnded`, whose ``get_buffer`` is
        picows' own (same slots, so ``__class__`` can change; nothing is
        stored per connection for it).  The protocol is set
        again for a transport that binds those methods when the protocol is set
        (uvloop's; aiofastnet's looks them up on every read).
        """
        self._head = None
        self.lookup = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.__class__ = _HeadEnded
        self.transport.underlying_transport.set_protocol(self)

    async def _upgrade_after(self, pending: Awaitable[object], chunk: bytes) -> None:
        """Hand ``chunk`` (the end of the request) to picows once ``pending`` is done.

        The task is held until it ends, no longer: a done task keeps its
        coroutine and more (about 750 bytes for the life of the connection).
        """
        try:
            await self._hand_over(pending, chunk)
        finally:
            self._deferred = None

    async def _hand_over(self, pending: Awaitable[object], chunk: bytes) -> None:
        transport = self.transport.underlying_transport
        try:
            await pending
        except TooManyAuthFailures as exc:
            if not transport.is_closing():
                transport.write(_too_many(exc))
                transport.close()
            return
        except Exception as exc:  # Redis down, or a bug: either way the device may retry
            if not isinstance(exc, REDIS_DOWN):
                log.exception("device token lookup failed (503)")
            if not transport.is_closing():
                transport.write(_503)
                transport.close()
            return
        if transport.is_closing():
            return
        offset = 0
        for _ in range(len(chunk) + 1):  # each round hands over at least one byte
            if offset >= len(chunk):
                break
            view = WSProtocol.get_buffer(self, len(chunk) - offset)
            size = min(len(view), len(chunk) - offset)
            view[:size] = chunk[offset:offset + size]
            if not self._fits(size):
                return
            WSProtocol.buffer_updated(self, size)
            offset += size
        if not transport.is_closing():
            transport.resume_reading()


class _HeadEnded(HandshakeProtocol):
    """A :class:`HandshakeProtocol` whose request head has ended: picows reads directly, each
    read's growth of its buffer taken from the budget first (:meth:`HandshakeProtocol._fits`)."""

    __slots__ = ()

    get_buffer = WSProtocol.get_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # HandshakeProtocol._fits inlined (grows() too): this runs on every read.
        size = self.read_size
        used = size - len(_get_buffer(self, -1)) + nbytes
        if (used * 100 < size * 91 and size - used > 256) or self._grow(size):
            _buffer_updated(self, nbytes)


class _Dropping(HandshakeProtocol):
    """A connection whose reads would have passed the budget: it reads nothing more."""

    __slots__ = ()

    get_buffer = WSProtocol.get_buffer

    def buffer_updated(self, nbytes: int) -> None:
        pass


def token_in_head(head: bytes) -> str | None:
    """The device token of a request head (``Authorization: Bearer`` or ``?token=``), if any.

    ``None`` also for a request line that is not ``METHOD TARGET VERSION``:
    picows refuses that one itself.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    authorization = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            authorization = value.strip().decode("latin-1")
            break
    return token_from(authorization, parts[1]) or None
