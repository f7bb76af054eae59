"""The reading routes: devices, logs (one device or the fleet), volume, export, overview.

Every rule of reading (what a valid request is, cursors, search) lives in
:mod:`fleetlog.reading`; these routes parse the query string, borrow a reader
from the process's :class:`~fleetlog.reading.ReaderPool`, and shape JSON.
Times come out ISO 8601 UTC; pages are newest first with an opaque
``next_cursor``.  Nothing stored yet (no store file) reads as empty, not as
an error: a fresh install's console shows an empty fleet.

Record rows are spliced from the stored JSON (:func:`fleetlog.view.record_line`)
rather than built as models: the bytes a device sent come back as they are.

Every store read runs on the reader pool's own threads (never the event loop,
never the threads other routes need) under a time budget, ``read_timeout``
(5 s): past it the read is stopped and the answer is 503, "narrow the search".
A client that goes away stops its read at once (the route watches for the
disconnect while the read runs).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Annotated, Any, Final, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from fleetlog.api.deps import ERRORS, Found, ReadToken, Services, invalid
from fleetlog.api.guard import CHUNK, ReadBudget, drain, export_records
from fleetlog.device_id import device_id_problem
from fleetlog.errors import StoreMissing
from fleetlog.queue.connection import REDIS_DOWN
from fleetlog.queue.stats import queue_stats_for
from fleetlog.reading import (
    MAX_Q,
    LogsRequest,
    Page,
    Reader,
    SortKey,
    encode_cursor,
    list_devices,
    logs_request,
    position_cursor,
    volume_request,
)
from fleetlog.records import StoredRecord, iso_ms
from fleetlog.store import ReadLimit
from fleetlog.view import record_line

__all__ = ["check_device", "checked_request", "read_now", "read_store", "record_row", "router"]

#: Records of one page when the caller does not say (the console's page size too).
PAGE: Final = 100
#: The most one page may hold: more is an export.
MAX_PAGE: Final = 1000

router = APIRouter(tags=["reading"], responses=ERRORS)


# -- the shapes, for the schema -------------------------------------------------


class DeviceOut(BaseModel):
    device_id: str
    online: bool
    node: str | None = Field(description="The gateway node holding its connection, when online.")
    connected_since: str | None
    last_seen: str | None = Field(description="When its newest stored record arrived.")
    records: int
    last_error: str | None = Field(description="When its newest error/fatal record arrived.")
    refused: dict[str, int] = Field(description="Frames refused, by reason.")
    provisioned: bool = Field(description="Has a device token.")


class DevicesOut(BaseModel):
    devices: list[DeviceOut]
    warning: str = Field(description='"" or why the online state is unknown (Redis down).')


class RecordOut(BaseModel):
    cursor: str = Field(description="The record's position: a page's cursor, a live tail's event id.")
    seq: int
    device_id: str
    received_at: str
    ts: str | None = None
    level: str | None = None
    message: str | None = None
    data: Any = Field(description="The record as the device sent it.")


class PageOut(BaseModel):
    records: list[RecordOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as cursor= for the older ones; null: no more.")
    tail_from: str | None = Field(description=(
        "First pages only (no cursor=): the Last-Event-ID that starts a live tail of what comes "
        "after this page, read before it. The tail may bring again records this page holds (skip "
        "those by cursor); a record's cursor may miss one a slower worker commits late."))


class BucketOut(BaseModel):
    start: str
    level: str | None
    records: int


class VolumeOut(BaseModel):
    since: str
    until: str
    step_seconds: int
    buckets: list[BucketOut]


class OverviewOut(BaseModel):
    devices: int
    online: int
    records: int
    backlog: int | None = Field(
        description="Records queued, not yet acknowledged (null: Redis not answering).")
    lag: int | None
    pending: int | None
    dead_letters: int | None
    warning: str


# -- helpers ----------------------------------------------------------------------


def record_row(record: StoredRecord) -> bytes:
    """One record as the API's JSON object (see :class:`RecordOut`)."""
    return b'{"cursor":"' + encode_cursor(record).encode() + b'",' + record_line(record)[1:]


def _now_ms() -> int:
    return int(time.time() * 1000)


def checked_request(device_id: str | None, **fields: Any) -> LogsRequest:
    """A validated :class:`LogsRequest`; InvalidRequest (a 422 naming the field) otherwise."""
    return logs_request(device_id, now_ms=_now_ms(), **fields)


def check_device(device_id: str | None, where: str = "query", name: str = "device") -> None:
    if device_id is not None and (problem := device_id_problem(device_id)):
        raise invalid(where, name, problem)


T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (a GET's request has no body to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # read by nobody when the client left: not "never retrieved"


async def read_store(request: Request, found: Services, work: Callable[[Reader], T],
                     missing: Callable[[], T]) -> T:
    """``work(reader)`` on the reader pool's threads, under the read budget.

    ``missing()`` is the answer while nothing is stored yet (no store file): each
    route says what that is, usually an empty one; it runs in a thread (it may ask
    Redis).  Stopped at once when the client goes away (503); a store fault or a
    read past its budget goes through to the app's handler (503, :mod:`.failures`).
    """
    limit = found.readers.limit() or ReadLimit()
    result = asyncio.wrap_future(found.readers.submit(work, limit))
    result.add_done_callback(_retrieve)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        limit.cancel()
        raise
    finally:
        gone.cancel()
    if not result.done():
        limit.cancel()
        raise HTTPException(503, "the client went away; the read was stopped")
    try:
        return result.result()
    except StoreMissing:
        return await asyncio.to_thread(missing)


def read_now(found: Services, work: Callable[[Reader], T], missing: Callable[[], T]) -> T:
    """:func:`read_store` for a caller already off the event loop: ``work(reader)`` in this
    thread, under the read budget; ``missing()`` while nothing is stored yet."""
    try:
        with found.readers.reader() as reader:
            return work(reader)
    except StoreMissing:
        return missing()


async def _page(request: Request, found: Services, logs: LogsRequest) -> Response:
    first = logs.cursor is None

    def read(reader: Reader) -> tuple[int | None, Page]:
        # The tail's start is taken before the page: a worker slower than another may still
        # commit records below the page's newest (PostgreSQL), and a tail from there gets them.
        start = reader.position() if first else None
        return start, reader.page(logs)

    start, page = await read_store(request, found, read, lambda: (None, Page([], None)))
    cursor = b"null" if page.next_cursor is None else b'"' + page.next_cursor.encode() + b'"'
    tail_from = b"null" if start is None else b'"' + position_cursor(start).encode() + b'"'
    body = (b'{"records":[' + b",".join(record_row(r) for r in page.records)
            + b'],"next_cursor":' + cursor + b',"tail_from":' + tail_from + b"}")
    return Response(body, media_type="application/json")


Since = Annotated[str | None, Query(description="Records received since: a duration ago (1h) or ISO 8601.")]
Until = Annotated[str | None, Query(description="Records received before: a duration ago or ISO 8601.")]
Text = Annotated[str | None, Query(max_length=MAX_Q, description=(
    "Plain text the record contains (case-insensitive, Unicode); never a query language: `\"`, `*`, "
    f"`NEAR(` are characters.  At most {MAX_Q} characters, no NUL."))]
Level = Annotated[str | None, Query(description="This level and above: trace debug info warn error fatal.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Records per page.")]
Cursor = Annotated[str | None, Query(description="next_cursor of the page before.")]
DeviceParam = Annotated[str | None, Query(description="One device's id (none: the whole fleet).")]


# -- routes -----------------------------------------------------------------------


@router.get("/api/devices", response_model=DevicesOut, summary="Every known device")
async def get_devices(
    _token: ReadToken, found: Found, request: Request,
    prefix: Annotated[str, Query(description="Only ids starting with this.")] = "",
    online: Annotated[bool | None, Query(description="Only online (true) or offline (false) ones.")] = None,
    sort: Annotated[SortKey, Query(description="Sort key.")] = "device_id",
    order: Annotated[Literal["asc", "desc"], Query()] = "asc",
) -> DevicesOut:
    options: dict[str, Any] = {"prefix": prefix, "online": online, "sort": sort,
                               "descending": order == "desc"}
    rows, warning = await read_store(request, found, lambda reader: reader.devices(found.redis, **options),
                                     lambda: list_devices(None, found.redis, **options))
    return DevicesOut(devices=[DeviceOut(**row.as_dict()) for row in rows], warning=warning)


@router.get("/api/devices/{device_id:device}/logs", response_model=PageOut,
            summary="One device's records, newest first (keyset pages)")
async def get_device_logs(
    device_id: Annotated[str, Path(description="The device's id.")],
    _token: ReadToken, found: Found, request: Request,
    q: Text = None, level: Level = None, since: Since = None, until: Until = None,
    limit: Limit = PAGE, cursor: Cursor = None,
) -> Response:
    check_device(device_id, "path", "device_id")
    return await _page(request, found, checked_request(device_id, q=q, level=level, since=since,
                                                       until=until, limit=limit, cursor=cursor))


@router.get("/api/logs", response_model=PageOut, summary="The fleet's records, newest first (keyset pages)")
async def get_logs(
    _token: ReadToken, found: Found, request: Request,
    q: Text = None, level: Level = None, since: Since = None, until: Until = None,
    device: DeviceParam = None, limit: Limit = PAGE, cursor: Cursor = None,
) -> Response:
    check_device(device)
    return await _page(request, found, checked_request(device, q=q, level=level, since=since,
                                                       until=until, limit=limit, cursor=cursor))


@router.get("/api/stats/volume", response_model=VolumeOut, summary="Records per time step and level")
async def get_volume(
    _token: ReadToken, found: Found, request: Request, device: DeviceParam = None,
    since: Annotated[str | None, Query(description="Start (default 1h ago).")] = None,
    until: Annotated[str | None, Query(description="End (default now).")] = None,
    step: Annotated[str, Query(description="minute, hour, day, or a duration (5m).")] = "minute",
) -> VolumeOut:
    check_device(device)
    asked = volume_request(device, now_ms=_now_ms(), since=since, until=until, step=step)
    buckets = await read_store(request, found, lambda reader: reader.volume(asked), lambda: [])
    return VolumeOut(since=iso_ms(asked.since), until=iso_ms(asked.until),
                     step_seconds=asked.step // 1000,
                     buckets=[BucketOut(start=iso_ms(b.start), level=b.level, records=b.records)
                              for b in buckets])


_CSV_COLUMNS: Final = ("seq", "device_id", "received_at", "ts", "level", "message", "data")
#: What a spreadsheet takes a cell starting with for a formula (OWASP, CSV injection).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a leading ``'`` before a formula's first character."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_line(values: tuple[Any, ...]) -> bytes:
    """One CSV row (RFC 4180: CRLF after each; a field holding CR, LF or ``"`` is quoted)."""
    out = io.StringIO()
    # "\r\n", not "\n": the csv module quotes a field holding a character of the line
    # terminator, so with "\n" a lone CR in a message went out bare, and a reader saw two rows.
    csv.writer(out, lineterminator="\r\n").writerow([_cell(value) for value in values])
    return out.getvalue().encode()


def _export_line(record: StoredRecord, form: str) -> bytes:
    if form == "csv":
        return _csv_line((record.seq, record.device_id, iso_ms(record.received_at),
                          iso_ms(record.ts) if record.ts is not None else "", record.level or "",
                          record.message or "", record.data))
    return record_line(record) + b"\n"


def _export_chunks(records: Iterable[StoredRecord], form: str) -> Iterator[bytes]:
    """The records' lines, about :data:`~.guard.CHUNK` bytes at a time."""
    chunk: list[bytes] = []
    size = 0
    for record in records:
        line = _export_line(record, form)
        chunk.append(line)
        size += len(line)
        if size >= CHUNK:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


def _export(found: Services, request: LogsRequest, form: str, first: list[StoredRecord],
            budget: ReadBudget, more: bool) -> Iterator[bytes]:
    """The export's chunks from its ``first`` page on (``more``: there may be more); runs in
    a thread (starlette iterates a sync iterator there), each page under the read budget
    and sized by ``budget`` (bytes: :mod:`.guard`), each record let go once sent."""
    if form == "csv":
        yield _csv_line(_CSV_COLUMNS)
    if not first:
        return
    rest = replace(request, cursor=(first[-1].received_at, first[-1].seq))
    yield from _export_chunks(drain(first), form)
    if not more:
        return
    try:
        with found.readers.reader() as reader:
            seconds = found.readers.read_timeout

            def page_budget() -> None:
                if seconds is not None:
                    reader.store.set_read_limit(ReadLimit(seconds))

            yield from _export_chunks(export_records(reader, rest, budget, page_budget), form)
    except StoreMissing:
        return


@router.get("/api/export", summary="Every matching record, streamed (NDJSON or CSV), newest first",
            response_class=StreamingResponse, responses={200: {
                "description": "One record per line (NDJSON), or CSV with a header row.",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                            "text/csv": {"schema": {"type": "string"}}}}})
async def get_export(
    _token: ReadToken, found: Found, request: Request, device: DeviceParam = None, since: Since = None,
    until: Until = None, q: Text = None, level: Level = None,
    format: Annotated[Literal["ndjson", "csv"], Query(description="ndjson or csv.")] = "ndjson",
) -> StreamingResponse:
    check_device(device)
    budget = ReadBudget(found.settings.stream_buffer_bytes, found.settings.max_frame_bytes)
    asked = replace(checked_request(device, q=q, level=level, since=since, until=until),
                    limit=budget.limit)
    # The first page before the answer starts: a search past its budget is still a 503.
    first = await read_store(request, found, lambda reader: reader.page(asked).records, lambda: [])
    more = len(first) == asked.limit
    more = not budget.keep(first) or more
    name = f"fleetlog-{device or 'fleet'}.{format}".replace('"', "_").replace("/", "_")
    return StreamingResponse(
        _export(found, asked, format, first, budget, more),
        media_type="text/csv" if format == "csv" else "application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{name.encode("ascii", "replace").decode()}"'})


@router.get("/api/overview", response_model=OverviewOut, summary="Fleet totals and the queue's state")
async def get_overview(_token: ReadToken, found: Found, request: Request) -> OverviewOut:
    rows, warning = await read_store(request, found, lambda reader: reader.devices(found.redis),
                                     lambda: list_devices(None, found.redis))
    settings = found.settings
    try:
        stats: Any = await asyncio.to_thread(queue_stats_for, found.redis, settings)
    except REDIS_DOWN as exc:  # the totals are still worth showing
        stats = None
        warning = warning or f"Redis unavailable ({exc})"
    return OverviewOut(
        devices=len(rows), online=sum(row.online for row in rows),
        records=sum(row.records for row in rows),
        backlog=stats and stats.backlog, lag=stats and stats.lag, pending=stats and stats.pending,
        dead_letters=stats and stats.dead_letters, warning=warning)
