"""``GET /api/stream``: a live tail over Server-Sent Events.

Each event is one record: ``id`` is its cursor (the same opaque cursor the
pages give), ``event: record``, ``data`` the record's JSON on one line.  A
client that reconnects with ``Last-Event-ID`` gets every matching record
stored after that one, none twice; without it the tail starts at "now".

The token goes in the ``Authorization`` header like everywhere else, never in
the URL: browsers' ``EventSource`` cannot set headers, so the console reads
the stream with ``fetch()`` (see ``static/console.js``).

A tail does not poll the store in a loop: it reads ``after(cursor)``, then
sleeps on the process's :class:`~fleetlog.api.commits.CommitFeed` until a
worker announces a commit, and reads again.  Quiet for :data:`HEARTBEAT`
seconds, it sends a comment so proxies keep the connection.

What a tail holds is bounded in bytes, not records (:mod:`.guard`): each read
takes what fits ``stream_buffer_bytes`` (4 MiB), records go out in chunks of
about 64 KiB and are let go as they are sent, and the next chunk is written
only once the socket took the last one (uvicorn's flow control).  A client
that leaves a chunk untaken for ``stream_stall_timeout`` seconds is cut off;
it reconnects after ``retry:`` with ``Last-Event-ID`` and misses nothing.  A
revoked token ends its tails (:mod:`.bus`).  When the client goes, starlette
cancels the generator; nothing else is held.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Annotated, Final

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from fleetlog.api.deps import ERRORS, Found, ReadToken, Services, invalid
from fleetlog.api.guard import CHUNK, ReadBudget, TailSlots
from fleetlog.api.reads import DeviceParam, Level, Text, check_device, checked_request, read_now, record_row
from fleetlog.errors import InvalidRequest, StoreUnavailable
from fleetlog.reading import LogsRequest, decode_cursor, encode_cursor
from fleetlog.records import StoredRecord

__all__ = ["HEARTBEAT", "router"]

#: Seconds of quiet before a keepalive comment.
HEARTBEAT: Final = 15.0
#: Seconds a client waits before reconnecting (sent as ``retry:``).
RETRY_MS: Final = 2000

router = APIRouter(tags=["reading"], responses=ERRORS)


def _event(record: StoredRecord) -> bytes:
    return (b"id: " + encode_cursor(record).encode() + b"\nevent: record\ndata: "
            + record_row(record) + b"\n\n")


def _read(found: Services, request: LogsRequest, after: int,
          budget: ReadBudget) -> tuple[list[StoredRecord], bool]:
    """The records after ``after`` that fit ``budget``, and whether more may follow at once."""
    limit = budget.limit
    query = replace(request.store_query(), limit=limit, before=None, after_seq=after)
    batch = read_now(found, lambda reader: reader.store.query(query), lambda: [])
    full = len(batch) == limit
    whole = budget.keep(batch)
    return batch, full or not whole


def _chunks(batch: list[StoredRecord]) -> Iterator[bytes]:
    """The batch's events, about :data:`~.guard.CHUNK` bytes at a time, each record let go once sent."""
    batch.reverse()
    while batch:
        events, size = [], 0
        while batch and size < CHUNK:
            event = _event(batch.pop())
            events.append(event)
            size += len(event)
        yield b"".join(events)


def _start(found: Services) -> int:
    return read_now(found, lambda reader: reader.position(), lambda: 0)


class _TailResponse(StreamingResponse):
    """A live tail's answer: gives its slot back however it ends, even before its first byte."""

    def __init__(self, slots: TailSlots, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._slots.held():
            await super().__call__(scope, receive, send)


async def _tail(found: Services, request: LogsRequest, after: int) -> AsyncIterator[bytes]:
    yield f"retry: {RETRY_MS}\n: live tail open\n\n".encode()
    settings = found.settings
    budget = ReadBudget(settings.stream_buffer_bytes, settings.max_frame_bytes)
    cursor = after
    while True:
        changed = found.feed.changed()  # before the read: a commit meanwhile sets it
        try:
            batch, more = await run_in_threadpool(_read, found, request, cursor, budget)
        except StoreUnavailable:
            batch, more = [], False  # the store is busy or gone for a moment: the next wake reads again
        if batch:
            cursor = batch[-1].seq
            for chunk in _chunks(batch):
                yield chunk
            if more:
                continue  # a burst: read on before sleeping
        if not await found.feed.wait(changed, HEARTBEAT):
            yield b": keepalive\n\n"


@router.get("/api/stream", summary="Live tail of new records (Server-Sent Events)",
            response_class=StreamingResponse, responses={200: {
                "description": "text/event-stream: `id: CURSOR`, `event: record`, `data: RECORD`.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def get_stream(
    _token: ReadToken, found: Found, device: DeviceParam = None, level: Level = None, q: Text = None,
    last_event_id: Annotated[str | None, Header(description=(
        "The id of the last event received: the tail resumes just after it."))] = None,
) -> StreamingResponse:
    check_device(device)
    request = checked_request(device, level=level, q=q)
    if last_event_id:
        try:
            after = decode_cursor(last_event_id)[1]
        except InvalidRequest as exc:
            raise invalid("header", "last-event-id", str(exc)) from None
    else:
        after = await run_in_threadpool(_start, found)  # the store not answering: a 503
    if not found.tails.take():  # the last step before the answer: nothing after it can fail
        raise HTTPException(503, f"{found.tails.limit} live tails open already; try again later")
    return _TailResponse(found.tails, _tail(found, request, after))
