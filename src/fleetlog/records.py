"""The value objects that flow from the queue to the store and out again."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple


class QueuedRecord(NamedTuple):
    """One record as a worker takes it off the queue.

    A named tuple, not a frozen dataclass: a worker makes one per record
    drained, and a frozen dataclass sets each field through
    ``object.__setattr__``, which a drain felt (docs/performance.md).

    ``qid`` is unique per record in the queue (a stream entry id and the
    record's place in it, ``1700000000000-0.7``; the entry id alone for an entry
    of one record written before entries were packed; or a legacy batch
    position), which is what makes every store write idempotent.  With
    several shards, equal entry ids occur in two streams, so the qid is the
    entry id after the shard (``s3:1700000000000-0``).  ``stream`` names the
    stream the record came from ('' for the legacy list).
    ``data`` is the record's JSON exactly as queued.
    """

    qid: str
    device_id: str
    received_at: int  # milliseconds since the epoch, UTC
    data: bytes
    deliveries: int = 1
    #: The stream (shard) the record was queued in: with ``qid``, its identity in a
    #: store that keeps several streams apart (PostgreSQL; SQLite keys on ``qid`` alone).
    stream: str = ""
    #: Records in the packed stream entry it came in (its qid is the entry id, a dot and
    #: its place there): the entry is acknowledged once all of them are done.  0: an
    #: entry of its own (written before entries were packed) or the legacy list.
    packed: int = 0


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as read back from a store."""

    seq: int
    qid: str
    device_id: str
    received_at: int
    ts: int | None
    level: str | None
    message: str | None
    data: str


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """What the store knows of one device."""

    device_id: str
    records: int
    first_seen: int
    last_seen: int
    #: ``received_at`` of its newest ``error``/``fatal`` record (None: none yet).
    last_error: int | None = None


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``, the format every output uses."""
    second, milli = divmod(ms, 1000)
    return f"{_iso_second(second)}{milli:03d}Z"


def utc_day(ms: int) -> str:
    """``YYYY-MM-DD`` of the UTC day a millisecond timestamp falls in."""
    return _utc_day(ms // 86_400_000)


# Records come in bursts of the same second and day: the daily files and every output
# format each one, and ``strftime`` was a fifth of a drain into the files.
@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


@functools.lru_cache(maxsize=64)
def _utc_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")
