"""Reading as a service: what ``fleetlog logs``/``devices`` and the HTTP API call.

The CLI and the API only parse and print; every rule of reading lives here:

* requests are validated in one place (:func:`logs_request`,
  :func:`volume_request`), so a bad level, time, limit or cursor is the same
  :class:`InvalidRequest` whichever front end sent it;
* the store is opened read-only (:meth:`Reader.open`): a reader never creates
  a data dir or a store, and a missing one is
  :class:`~fleetlog.store.StoreMissing`, naming the path;
* pages are newest first with an opaque keyset cursor (:class:`Page`), and
  :meth:`Reader.follow` yields new records in store order from a ``seq``,
  never skipping nor repeating one (see the cursor contract in
  :mod:`fleetlog.store.base`);
* :func:`list_devices` joins the store's devices with what Redis knows (live
  links, refusals, provisioned tokens), without importing the gateway.

Nothing here opens a Redis client: callers pass one in and close it.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, TypeVar

from fleetlog import keys
from fleetlog.errors import InvalidRequest
from fleetlog.links import is_online, parse_link
from fleetlog.queue.connection import REDIS_DOWN, is_cluster
from fleetlog.records import StoredRecord, iso_ms
from fleetlog.store import LogQuery, ReadLimit, Store, VolumeBucket, open_store
from fleetlog.store.fields import check_level
from fleetlog.timeparse import parse_duration, parse_time

__all__ = [
    "MAX_LIMIT",
    "MAX_Q",
    "DeviceInfo",
    "InvalidRequest",
    "LogsRequest",
    "Page",
    "Reader",
    "ReaderPool",
    "VolumeRequest",
    "decode_cursor",
    "encode_cursor",
    "list_devices",
    "logs_request",
    "position_cursor",
    "volume_request",
]

#: The most records one read returns (more is an export, not a look).
MAX_LIMIT: Final = 1_000_000
#: Records a follower takes per store read; a bigger burst takes several reads.
FOLLOW_BATCH: Final = 1_000
#: Buckets a volume request may span (a chart, not an export).
MAX_BUCKETS: Final = 100_000
#: The longest search text (characters): a longer ``q`` is refused, never run.
MAX_Q: Final = 256
#: The largest ``received_at`` or ``seq`` a cursor may hold (a 64-bit integer, as stored).
_MAX_INT64: Final = 2**63 - 1
#: Reads a :class:`ReaderPool` runs at once on a SQLite store, and on any other.  SQLite
#: reads in one process share its GIL (a search calls Python for every record it scans),
#: so more threads only make each read longer, and the store's writer waits for the
#: reads in flight when it empties the WAL: two at a time keep those waits short.
SQLITE_READ_THREADS: Final = 2
READ_THREADS: Final = 8
_STEPS: Final = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


# -- requests ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogsRequest:
    """A validated read of one device's records (``device_id``) or the fleet's (``None``)."""

    device_id: str | None
    since: int | None = None
    until: int | None = None
    q: str | None = None
    level: str | None = None
    limit: int = 100
    cursor: tuple[int, int] | None = None  # decoded page cursor

    def store_query(self) -> LogQuery:
        return LogQuery(self.device_id, since=self.since, until=self.until, grep=self.q or None,
                        level=self.level, limit=self.limit, before=self.cursor)


def _time(name: str, text: str | None, now_ms: int) -> int | None:
    """Milliseconds since the epoch; a time before the epoch reads as the epoch (nothing is older)."""
    if text is None or text == "":
        return None
    try:
        return max(0, parse_time(text, now_ms))
    except ValueError as exc:
        raise InvalidRequest(f"{name}: {exc}", name) from None


def _limit(limit: int | str | None, default: int) -> int:
    if limit is None or limit == "":
        return default
    try:
        value = int(limit)
    except ValueError:
        raise InvalidRequest(f"limit: {limit!r} is not a whole number", "limit") from None
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidRequest(f"limit: {value} is not between 1 and {MAX_LIMIT}", "limit")
    return value


def _search(q: str | None) -> str | None:
    """``q`` checked: at most :data:`MAX_Q` characters, and no NUL (which PostgreSQL's text
    cannot hold: refused on every store alike)."""
    if not q:
        return None
    if len(q) > MAX_Q:
        raise InvalidRequest(f"q: {len(q)} characters, more than the {MAX_Q} a search may have", "q")
    if "\x00" in q:
        raise InvalidRequest("q: a NUL character cannot be searched for", "q")
    return q


def logs_request(
    device_id: str | None,
    *,
    now_ms: int,
    since: str | None = None,
    until: str | None = None,
    q: str | None = None,
    level: str | None = None,
    limit: int | str | None = None,
    cursor: str | None = None,
) -> LogsRequest:
    """A :class:`LogsRequest` from what a user typed; :class:`InvalidRequest` if malformed.

    Times are durations ago (``1h``) or ISO 8601; ``level`` a name of
    :data:`~fleetlog.store.fields.LEVELS` (or an alias); ``q`` plain text of
    at most :data:`MAX_Q` characters.
    """
    checked_level = check_level(level) if level else None  # InvalidRequest naming the field
    return LogsRequest(
        device_id,
        since=_time("since", since, now_ms),
        until=_time("until", until, now_ms),
        q=_search(q),
        level=checked_level,
        limit=_limit(limit, 100),
        cursor=decode_cursor(cursor) if cursor else None,
    )


@dataclass(frozen=True, slots=True)
class VolumeRequest:
    """Records per time bucket and level, for charts."""

    device_id: str | None
    since: int
    until: int
    step: int  # ms


def volume_request(device_id: str | None, *, now_ms: int, since: str | None = None,
                   until: str | None = None, step: str = "minute") -> VolumeRequest:
    """A :class:`VolumeRequest` (default: the last hour per minute); :class:`InvalidRequest`."""
    if step in _STEPS:
        step_ms = _STEPS[step]
    else:
        try:
            step_ms = parse_duration(step)
        except ValueError as exc:
            raise InvalidRequest(f"step: {exc}", "step") from None
    if step_ms < 1000:
        raise InvalidRequest("step: at least 1s", "step")
    start = _time("since", since, now_ms)
    end = _time("until", until, now_ms)
    start = start if start is not None else now_ms - 3_600_000
    # Until now means until the end of this minute (nothing is received later
    # yet): whole minutes let a store count the fleet from per-minute totals.
    end = end if end is not None else now_ms - now_ms % 60_000 + 60_000
    if end <= start:
        raise InvalidRequest("until must be after since", "until")
    if (end - start) // step_ms > MAX_BUCKETS:
        raise InvalidRequest(f"step: more than {MAX_BUCKETS} buckets; use a bigger step", "step")
    return VolumeRequest(device_id, start - start % step_ms, end, step_ms)


# -- cursors ----------------------------------------------------------------------


def encode_cursor(record: StoredRecord) -> str:
    """The opaque cursor of the page that starts just past ``record`` (older ones)."""
    return _cursor(record.received_at, record.seq)


def position_cursor(seq: int) -> str:
    """A live tail's ``Last-Event-ID`` for "after the store's :meth:`Reader.position` ``seq``"."""
    return _cursor(0, seq)


def _cursor(received_at: int, seq: int) -> str:
    raw = f"{received_at}.{seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    """``(received_at, seq)`` of a cursor from :func:`encode_cursor`; InvalidRequest if not one."""
    problem = InvalidRequest(f"cursor: {cursor[:100]!r} is not a cursor fleetlog gave out", "cursor")
    if len(cursor) > 100:  # two 64-bit integers take at most 52 characters
        raise problem
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        received_at, seq = (int(part) for part in raw.split("."))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise problem from None
    if not (0 <= received_at <= _MAX_INT64 and 0 <= seq <= _MAX_INT64):
        raise problem  # a forged one: no store holds integers past 64 bits
    return received_at, seq


@dataclass(frozen=True, slots=True)
class Page:
    """Records newest first; ``next_cursor`` fetches the older ones (None: no more)."""

    records: list[StoredRecord]
    next_cursor: str | None


# -- devices ----------------------------------------------------------------------


@dataclass(slots=True)
class DeviceInfo:
    """One row of ``fleetlog devices`` / ``GET /api/devices``."""

    device_id: str
    online: bool = False
    node: str | None = None
    connected_since: str | None = None
    last_seen: str | None = None
    records: int = 0
    #: When it last sent an ``error``/``fatal`` record.
    last_error: str | None = None
    #: Frames refused, by reason (``rate_limited``, ``too_large``...).
    refused: dict[str, int] = field(default_factory=dict)
    #: Has a token (``fleetlog device add``), whether it has sent anything or not.
    provisioned: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SortKey = Literal["device_id", "last_seen", "last_error", "records", "online"]


@dataclass(slots=True)
class _Presence:
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    refused: dict[str, dict[str, int]] = field(default_factory=dict)
    provisioned: set[str] = field(default_factory=set)


def _presence(client: Any) -> _Presence:
    """What Redis knows of devices; raises one of ``REDIS_DOWN`` when it cannot say."""
    presence = _Presence()
    presence.links = {device.decode(): parse_link(raw)
                      for device, raw in client.hgetall(keys.DEVICE_LINKS).items()}
    node_prefix = keys.node_heartbeat("")
    presence.live = {keys.unpart(key.decode()[len(node_prefix):])
                     for key in client.scan_iter(match=f"{node_prefix}*", count=1000)}
    refusal_prefix = keys.refusals("")
    for key in client.scan_iter(match=f"{refusal_prefix}*", count=1000):
        counts = client.hgetall(key)
        presence.refused[keys.unpart(key.decode()[len(refusal_prefix):])] = {
            reason.decode(): int(count) for reason, count in counts.items()}
    presence.provisioned = {device.decode() for device in
                            client.hvals(keys.credential_keys(is_cluster(client)).tokens)}
    return presence


def list_devices(
    store: Store | None,
    redis: Any | None,
    *,
    prefix: str = "",
    online: bool | None = None,
    sort: SortKey = "device_id",
    descending: bool = False,
) -> tuple[list[DeviceInfo], str]:
    """Every known device, and a warning ("" when none) when Redis could not say.

    Known: stored records, a link, refusals, or a token (provisioned devices
    that have sent nothing yet are listed with 0 records).  ``redis`` is a
    blocking client the caller owns (None: no Redis, online state unknown);
    ``store`` None: nothing stored yet (provisioned and connected devices only).
    """
    presence = _Presence()
    warning = ""
    if redis is not None:
        try:
            presence = _presence(redis)
        except REDIS_DOWN as exc:
            warning = f"Redis unavailable ({exc}); online state unknown (shown as offline)"
    stats = {row.device_id: row for row in store.devices()} if store is not None else {}
    known = (stats.keys() | presence.links.keys() | (presence.refused.keys() - {keys.ANONYMOUS})
             | presence.provisioned)
    rows = []
    for device_id in known:
        if not device_id.startswith(prefix):
            continue
        link = presence.links.get(device_id)
        is_up = link is not None and is_online(link, presence.live)
        if online is not None and is_up != online:
            continue
        stat = stats.get(device_id)
        rows.append(DeviceInfo(
            device_id,
            online=is_up,
            node=link.get("node") if link and is_up else None,
            connected_since=link.get("since") if link and is_up else None,
            last_seen=iso_ms(stat.last_seen) if stat else None,
            records=stat.records if stat else 0,
            last_error=iso_ms(stat.last_error) if stat and stat.last_error is not None else None,
            refused=presence.refused.get(device_id, {}),
            provisioned=device_id in presence.provisioned,
        ))
    rows.sort(key=lambda row: row.device_id)
    if sort != "device_id":  # stable: ties stay in device_id order
        rows.sort(key=lambda row: (getattr(row, sort) is not None, getattr(row, sort) or 0),
                  reverse=descending)
    elif descending:
        rows.reverse()
    return rows, warning


# -- the reader -------------------------------------------------------------------


class Reader:
    """Reads one store; see the module docstring.  Close it (or use ``with``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, store_url: str) -> Reader:
        """Open the store at ``store_url`` read-only; StoreMissing when it is not there."""
        return cls(open_store(store_url, readonly=True))

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def latest(self, request: LogsRequest) -> list[StoredRecord]:
        """The newest ``limit`` matching records, oldest first (``fleetlog logs``)."""
        return self.store.query(request.store_query())

    def page(self, request: LogsRequest) -> Page:
        """One page, newest first, from ``request.cursor`` (the API's keyset pagination)."""
        records = self.store.query(request.store_query())
        records.reverse()
        cursor = encode_cursor(records[-1]) if len(records) == request.limit else None
        return Page(records, cursor)

    def export(self, request: LogsRequest, *, batch: int = FOLLOW_BATCH) -> Iterator[StoredRecord]:
        """Every matching record, newest first, one keyset page of ``batch`` at a time.

        Memory stays flat whatever the range (the API streams a day of a busy
        device with it); ``request.limit`` is ignored: an export is the whole range.
        """
        page = replace(request, limit=batch)
        while True:
            records = self.store.query(page.store_query())
            records.reverse()
            yield from records
            if len(records) < batch:
                return
            last = records[-1]
            page = replace(page, cursor=(last.received_at, last.seq))

    def has_records(self, device_id: str) -> bool:
        """True when the store holds at least one record of ``device_id``."""
        return bool(self.store.query(LogQuery(device_id, limit=1)))

    def position(self) -> int:
        """The cursor of "now" for :meth:`follow`: the store's ``max_seq``.

        That is the horizon below which nothing can still appear (PostgreSQL's
        ``max_seq`` leaves out rows a late commit could still precede), not
        necessarily the newest record a read shows: see :meth:`tail`.
        """
        return self.store.max_seq()

    def tail(self, request: LogsRequest, *, poll: float = 0.25,
             stop: threading.Event | None = None,
             ) -> tuple[list[StoredRecord], Iterator[StoredRecord]]:
        """The newest records (:meth:`latest`), and lazily every one stored after them.

        ``fleetlog logs --follow``.  The follow starts at :meth:`position` taken
        *before* the first read, not at the newest record shown: with several
        writers a record with a lower ``seq`` than one shown may still commit,
        and it must come.  What the first read showed above the horizon comes
        again from the follow, and is not yielded twice.
        """
        after = self.position()
        first = self.latest(request)
        shown = {record.seq for record in first if record.seq > after}

        def more() -> Iterator[StoredRecord]:
            for record in self.follow(request, after, poll=poll, stop=stop):
                if record.seq in shown:
                    shown.discard(record.seq)
                    continue
                yield record

        return first, more()

    def follow(self, request: LogsRequest, after: int, *, poll: float = 0.25,
               stop: threading.Event | None = None) -> Iterator[StoredRecord]:
        """Every matching record stored after ``seq`` ``after``, in store order, as it comes.

        Never skips nor repeats one, whatever the burst (the store contract
        makes seq order commit order); resume from the last ``seq`` yielded.
        Runs until ``stop`` is set (the caller's bound) or the consumer stops.
        """
        stop = stop or threading.Event()
        query = replace(request.store_query(), limit=FOLLOW_BATCH, before=None)
        cursor = after
        while not stop.is_set():
            batch = self.store.query(replace(query, after_seq=cursor))
            for record in batch:
                yield record
                cursor = record.seq
            if len(batch) < FOLLOW_BATCH:
                stop.wait(poll)

    def volume(self, request: VolumeRequest) -> list[VolumeBucket]:
        return self.store.volume(request.device_id, request.since, request.until, request.step)

    def devices(self, redis: Any | None, **options: Any) -> tuple[list[DeviceInfo], str]:
        """:func:`list_devices` on this reader's store."""
        return list_devices(self.store, redis, **options)


T = TypeVar("T")


class ReaderPool:
    """Readers of one store shared by a server's threads: each read borrows one.

    A SQLite connection must not run two statements at once, so a thread
    borrows a :class:`Reader` for one read (or one export) and gives it back;
    at most ``keep`` idle ones are kept open.  A reader whose read failed is
    closed rather than kept (the store may have been replaced).

    Every borrowed reader's reads have a time budget, ``read_timeout`` seconds
    unless the borrower gives its own :class:`~fleetlog.store.ReadLimit`; past
    it they stop with :class:`~fleetlog.errors.ReadTimeout`.  :meth:`submit`
    runs a read on the pool's own ``threads`` (a server's event loop never
    waits on the store, and a flood of searches waits for those threads, not
    for the ones every other request needs): by default
    :data:`SQLITE_READ_THREADS` on a SQLite store, :data:`READ_THREADS` on others.
    """

    def __init__(self, store_url: str, *, keep: int = 16, read_timeout: float | None = None,
                 threads: int | None = None) -> None:
        self.store_url = store_url
        self.read_timeout = read_timeout
        self._keep = keep
        self._idle: list[Reader] = []
        self._lock = threading.Lock()
        self._closed = False
        if threads is None:
            threads = SQLITE_READ_THREADS if store_url.startswith("sqlite:") else READ_THREADS
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def limit(self) -> ReadLimit | None:
        """A new budget of ``read_timeout`` seconds from now (None: no budget)."""
        return None if self.read_timeout is None else ReadLimit(self.read_timeout)

    @contextmanager
    def reader(self, limit: ReadLimit | None = None) -> Iterator[Reader]:
        """A reader for the ``with`` block; raises StoreMissing when nothing is stored yet.

        Its reads are held to ``limit``, else to a budget of ``read_timeout`` from now.
        """
        with self._lock:
            reader = self._idle.pop() if self._idle else None
        if reader is None:
            reader = Reader.open(self.store_url)
        healthy = False
        try:
            reader.store.set_read_limit(limit or self.limit())
            yield reader
            healthy = True
        finally:
            try:
                reader.store.set_read_limit(None)
            except Exception:
                healthy = False
            with self._lock:
                keep = healthy and not self._closed and len(self._idle) < self._keep
                if keep:
                    self._idle.append(reader)
            if not keep:
                reader.close()

    def submit(self, work: Callable[[Reader], T], limit: ReadLimit | None = None) -> Future[T]:
        """Run ``work`` with a borrowed reader (held to ``limit``) on one of the pool's threads.

        A read still waiting for a thread when ``limit`` is past or cancelled
        does not start: it raises :class:`~fleetlog.errors.ReadTimeout`.
        """
        limit = limit or self.limit()

        def run() -> T:
            if limit is not None and limit.stopped():
                raise limit.error()
            with self.reader(limit) as reader:
                return work(reader)

        with self._lock:
            if self._closed:
                raise RuntimeError("the reader pool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="fleetlog-read")
            executor = self._executor
        return executor.submit(run)

    def close(self) -> None:
        """Close the idle readers; borrowed ones are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        for reader in idle:
            reader.close()
