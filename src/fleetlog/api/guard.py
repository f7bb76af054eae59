"""What a streamed answer (a live tail, an export) may hold, and for how long.

A live tail never ends by itself and an export may run for minutes; without
bounds a client that stops reading, or a token revoked meanwhile, kept them
going.  For ``GET /api/stream`` and ``GET /api/export``:

* **Memory, in bytes.**  The store reads by count, so :class:`ReadBudget`
  sizes each read: as many records as fit ``stream_buffer_bytes`` (4 MiB) at
  the size of the largest record of the read before (the first read: records
  of ``max_frame_bytes``, the most a device can send), at most four times as
  many as that read and at most 1000; what a read brings past the budget
  (records suddenly larger) is let go at once and read again later.  Records
  are sent in chunks of about :data:`CHUNK` bytes and let go as they are sent,
  and the server writes the next chunk only once the socket took the last
  one, so one client costs the budget plus a chunk or one record, whatever it
  reads.  When a streamed answer that sent more than :data:`TRIM_AFTER` bytes
  ends, glibc's ``malloc_trim`` gives the freed memory back to the system
  (:class:`MemoryTrim`).
* **Stall.**  A chunk the client does not take within ``stream_stall_timeout``
  seconds (30) cuts the answer off: the connection is reset.  A live tail's
  client reconnects after the ``retry:`` it was given, with ``Last-Event-ID``,
  and gets every record after the last one it read, none twice.
* **Revocation.**  :class:`StreamGuard` watches the request's token on the
  process's :class:`~fleetlog.api.bus.Bus` from *before* the route checks it
  (so a revocation between the check and the answer is not missed) until the
  answer ends: ``fleetlog api-token revoke``, on whichever API process,
  resets the connection at once (an export cut short must not look complete;
  a tail that reconnects gets 401).

:class:`StreamGuard` wraps the whole application, outside every other
middleware, so the ``send`` it sees is the server's own: it can tell when the
socket took a chunk, and reset the connection (uvicorn's transport) rather
than leave a client that does not read holding what was written for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any, Final

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetlog.credentials import hash_token
from fleetlog.reading import FOLLOW_BATCH, LogsRequest, Reader
from fleetlog.records import StoredRecord

__all__ = ["CHUNK", "GUARDED", "TRIM_AFTER", "MemoryTrim", "ReadBudget", "StreamGuard",
           "TailSlots", "drain", "export_records", "record_bytes"]

log = logging.getLogger("fleetlog.api")

#: The routes whose answers are guarded (their paths).
GUARDED: Final = frozenset({"/api/stream", "/api/export"})
#: About how many bytes one write to a client holds (one record, if it is larger).
CHUNK: Final = 64 * 1024
#: A streamed answer that sent more than this many bytes gives memory back when it ends.
TRIM_AFTER: Final = 1024 * 1024
#: Seconds between two ``malloc_trim`` calls, at most.
TRIM_EVERY: Final = 1.0
#: What a record read from the store costs beyond its text (the object, its fields).
_RECORD_OVERHEAD: Final = 400


# -- how many -------------------------------------------------------------------------


class TailSlots:
    """The live tails one API process has admitted, counted when admitted.

    Counting from the tail's first byte let a burst of requests all pass the
    check before any of them counted (1,014 of a 1,000 limit).  A slot is taken
    in the route, before the answer starts, and given back when the answer
    ends, however it ends (:meth:`held`).  One event loop: no lock needed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Give the slot back when the block ends (the answer was sent, cut off or cancelled)."""
        try:
            yield
        finally:
            self.taken -= 1


# -- memory ---------------------------------------------------------------------------


def record_bytes(record: StoredRecord) -> int:
    """About the memory a record read from the store takes (its text, as Python holds it)."""
    size = sys.getsizeof(record.data) + _RECORD_OVERHEAD
    if record.message:
        size += sys.getsizeof(record.message)
    return size


class ReadBudget:
    """How many records the next read may take to stay within ``budget`` bytes (module docstring)."""

    def __init__(self, budget: int, largest: int, most: int = FOLLOW_BATCH) -> None:
        self.budget = budget
        self.most = most
        #: Records the next read may take.
        self.limit = max(1, min(most, budget // max(1, largest)))

    def keep(self, records: list[StoredRecord]) -> bool:
        """Cut ``records`` (in reading order) to what fits the budget, at least one.

        True when they all fit.  Sizes the next read by the largest one seen.
        """
        total = largest = 0
        for index, record in enumerate(records):
            size = record_bytes(record)
            total += size
            if total > self.budget and index > 0:
                del records[index:]
                self._resize(max(largest, size))
                return False
            largest = max(largest, size)
        if largest:
            self._resize(largest)
        return True

    def _resize(self, largest: int) -> None:
        self.limit = max(1, min(self.most, 4 * self.limit, self.budget // largest))


def drain(records: list[StoredRecord]) -> Iterator[StoredRecord]:
    """Each of ``records`` in order, letting each go (from the list) as it is taken."""
    records.reverse()
    while records:
        yield records.pop()


def export_records(reader: Reader, request: LogsRequest, budget: ReadBudget,
                   before_page: Callable[[], None] = lambda: None) -> Iterator[StoredRecord]:
    """Every record ``request`` matches, newest first, a keyset page of ``budget.limit`` at a time.

    Like :meth:`fleetlog.reading.Reader.export`, but each page is sized by
    ``budget`` and each record let go once yielded: at most a budget's worth of
    records is held, however large they are.  ``before_page`` runs before each
    page's read (to give it its own time budget).
    """
    page = request
    while True:
        limit = budget.limit
        before_page()
        records = reader.store.query(replace(page, limit=limit).store_query())
        full = len(records) == limit
        records.reverse()  # newest first
        whole = budget.keep(records)
        if not records:
            return
        last = records[-1]
        yield from drain(records)
        if not full and whole:
            return
        page = replace(page, cursor=(last.received_at, last.seq))


class MemoryTrim:
    """Gives freed memory back to the system after large streamed answers (glibc only).

    CPython hands large strings to ``malloc``; glibc keeps what is freed in its
    heaps (and raises its mmap threshold after the first large free), so three
    tails of 200 KB records left the API at 938 MB after they closed.
    ``malloc_trim(0)`` returns the free pages of every heap.  At most one call
    per :data:`TRIM_EVERY` seconds, in a thread.
    """

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        self._due: asyncio.TimerHandle | None = None
        self.trims = 0
        name = ctypes.util.find_library("c")
        if sys.platform.startswith("linux") and name:
            with contextlib.suppress(OSError, AttributeError):
                self._trim = ctypes.CDLL(name).malloc_trim

    def after(self, sent: int) -> None:
        """A streamed answer ended after sending ``sent`` bytes."""
        if sent < TRIM_AFTER or self._trim is None or self._due is not None:
            return
        self._due = asyncio.get_running_loop().call_later(TRIM_EVERY, self._run)

    def _run(self) -> None:
        self._due = None
        trim = self._trim
        if trim is not None:
            self.trims += 1
            asyncio.get_running_loop().run_in_executor(None, trim, 0)


# -- the guard ------------------------------------------------------------------------


def _digest(scope: Scope) -> str | None:
    """SHA-256 of the request's bearer token, or ``None`` without one."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    token = token.strip()
    return hash_token(token) if scheme.lower() == "bearer" and token else None


def _reset(send: Send) -> bool:
    """Reset the connection of uvicorn's ``send`` (an RST: SO_LINGER 0, then abort); False if unreachable.

    What was written for the client is dropped at once: a close would leave it
    (in the server, then in the kernel) until a client that does not read takes
    it, and an export cut short ends with an error, not like a complete one.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if transport is None or not callable(abort):
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    abort()
    return True


class _Answer:
    """One guarded answer: whether it started, what it sent, why it was cut."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.started = False
        self.sent = 0
        self.reason: str | None = None
        self.cut_off = asyncio.Event()

    def cut(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.cut_off.set()

    def revoked(self) -> None:
        self.cut("revoked")

    def stalled(self) -> None:
        self.cut("stalled")

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started = True
                await send(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            self.sent += len(message.get("body", b""))
            timer = loop.call_later(self.stall, self.stalled)
            try:
                await send(message)
            finally:
                timer.cancel()

        task = asyncio.ensure_future(app(scope, receive, guarded))
        cut = asyncio.ensure_future(self.cut_off.wait())
        try:
            await asyncio.wait((task, cut), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            cut.cancel()
        if task.done():
            task.result()  # the answer ended by itself (or raised: let the server see it)
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception as exc:  # raised while being cancelled: nobody to tell but the log
                log.debug("a %s answer raised while cut off: %r", self.reason, exc)
        if not self.started:  # revoked before the answer began: what a new request gets
            await JSONResponse({"detail": "unknown or revoked token"}, 401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if _reset(send):
            await asyncio.sleep(0)  # the server learns the connection is gone, and
            await asyncio.sleep(0)  # does not log an answer left unfinished
        log.info("%s %s cut off: %s after %d bytes", scope.get("method"), scope.get("path"),
                 self.reason, self.sent)


class StreamGuard:
    """ASGI middleware around the whole application: see the module docstring.

    ``services`` gives the process's :class:`~fleetlog.api.deps.Services` (None
    before startup: nothing is guarded then).
    """

    def __init__(self, app: ASGIApp, services: Callable[[], Any]) -> None:
        self.app = app
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._services() if scope["type"] == "http" and scope.get("path") in GUARDED else None
        if found is None:
            await self.app(scope, receive, send)
            return
        answer = _Answer(found.settings.stream_stall_timeout)
        digest = _digest(scope)
        watching = found.bus.watch(digest, answer.revoked) if digest else contextlib.nullcontext()
        started = time.monotonic()
        try:
            with watching:
                await answer.run(self.app, scope, receive, send)
        finally:
            found.memory.after(answer.sent)
            log.debug("%s answered in %.1f s, %d bytes", scope.get("path"), time.monotonic() - started,
                      answer.sent)
