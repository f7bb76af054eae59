"""The store contract every backend implements.

A worker calls :meth:`Store.write_batch` once per queue batch: one
transaction, idempotent on ``qid``, so a redelivered record is never kept
twice.  Readers (``fleetlog logs``, ``fleetlog devices``) use the query
methods.

A backend sorts every failure into one of three kinds, because the worker
meets each differently:

* :class:`RecordRejected`: this record's data cannot be stored (bad JSON,
  a constraint); the worker retries it on redelivery, then dead-letters it.
* :class:`StoreUnavailable`: the store itself is at fault (locked, disk full,
  I/O error, gone), for writes and reads alike; the worker retries and
  acknowledges nothing meanwhile.
* anything else is a bug: the worker stops (fatal-error record, exit 1)
  rather than dead-letter good records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetlog.errors import FleetlogError
from fleetlog.records import DeviceStats, QueuedRecord, StoredRecord


class StoreUnavailable(FleetlogError):
    """Raised when the store cannot be written or read right now; retrying may succeed."""


class RecordRejected(FleetlogError):
    """Raised when the store cannot take a record because of the record's own data."""


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A read of one device's records (``fleetlog logs``)."""

    device_id: str
    since: int | None = None  # received_at >= since (ms)
    until: int | None = None  # received_at < until (ms)
    grep: str | None = None
    level: str | None = None
    limit: int = 100
    after_seq: int | None = None  # only records stored after this one (--follow)


class Store(Protocol):
    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        """Store ``records`` in one transaction; return how many were new."""

    def query(self, query: LogQuery) -> list[StoredRecord]:
        """The newest ``query.limit`` matching records, oldest first."""

    def after(self, seq: int, limit: int) -> list[StoredRecord]:
        """Every record stored after ``seq``, in store order (all devices)."""

    def index_step(self, limit: int) -> int:
        """Bring the search index up to date by at most ``limit`` records; return how many."""

    def index_lag(self) -> int:
        """About how many stored records the search index does not cover yet.

        Searches find them anyway (by scanning); the lag only makes them slower.
        """

    def prune(self, *, before: int | None, max_bytes: int | None, limit: int) -> int:
        """Delete up to ``limit`` records past retention (age or size); return how many."""

    def max_seq(self) -> int:
        """The ``seq`` of the newest stored record (0 when empty)."""

    def devices(self) -> list[DeviceStats]:
        """Every device the store has records of."""

    @property
    def store_id(self) -> str:
        """A random id given to the store when it was created, kept with its data.

        A copy (a backup) has the id of its original; a new store a new id.
        """

    def seqs_of(self, qids: Sequence[str]) -> dict[str, int]:
        """The ``seq`` of each of ``qids`` this store holds (absent ones are left out)."""

    def replaced(self) -> bool:
        """True when the store at the URL is no longer the one this object writes to.

        (A file removed, or another moved over it.)  The caller must not
        acknowledge what it wrote since, and must :meth:`reopen` and write it again.
        """

    def reopen(self) -> None:
        """Let go of the replaced store and open (create, migrate) the one at the URL."""

    def close(self) -> None: ...


def open_store(url: str, *, readonly: bool = False) -> Store:
    """Open the store a URL names.

    ``sqlite:///PATH`` is relative to the working directory and
    ``sqlite:////PATH`` absolute, as in SQLAlchemy.  ``postgresql://`` (or
    ``postgres://``) is a libpq URL: what it leaves out (password, TLS) comes
    from the ``PG*`` environment variables.
    """
    if url.startswith("sqlite:///"):
        from fleetlog.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"), readonly=readonly)
    if url.startswith(("postgresql://", "postgres://")):
        from fleetlog.store.postgres import PostgresStore

        return PostgresStore(url, readonly=readonly)
    raise ValueError(
        f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )
