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

Readers open a store read-only (``fleetlog.store.open_store(url, readonly=True)``): nothing
is created or migrated, and a store that is not there is
:class:`StoreMissing`, never an empty new one.

Cursors
-------
Every stored record has a ``seq``, and the contract is that **seq order is
commit order as readers see it**: once a reader has seen a record with
``seq = n``, no record with a lower ``seq`` may become visible later.  That is
what lets :meth:`Store.after` and ``LogQuery.after_seq`` (``--follow``, the
daily files, the API's live tail) resume from a bare ``seq`` and never skip
nor repeat a record.

* SQLite has one writer at a time (``BEGIN IMMEDIATE``), so the ``seq`` it
  hands out in a transaction are above every committed one, and seq order is
  commit order for free.
* A backend with several concurrent writers (PostgreSQL) must not let a
  sequence drawn at insert time leak to readers as is: a transaction that drew
  ``seq = 10`` may commit after one that drew ``11``, and a reader that saw
  ``11`` would skip ``10`` forever.  It must either assign ``seq`` at commit
  time under a lock (one short critical section per batch), or hide from
  readers every row at or above the oldest ``seq`` still held by an in-flight
  transaction (e.g. ``pg_snapshot_xmin`` with a per-row transaction id), so
  that what :meth:`Store.after` returns is always a gap-free prefix.

The newest-first pages of :meth:`Store.query` use a keyset on
``(received_at, seq)`` (``LogQuery.before``), which is stable under inserts:
a page never repeats a record of the page before it.

Search
------
``LogQuery.grep`` is plain text, matched case-insensitively (Unicode case
folding) against the record as the device sent it, the same whichever part
of the store answers: see :mod:`fleetlog.store.search`.  It is never handed
to a query language (FTS syntax, ``LIKE`` patterns) unescaped.

Time budgets
------------
A server must not let one read run for minutes: :meth:`Store.set_read_limit`
gives the reads that follow a :class:`ReadLimit`, a deadline and a way for
another thread to stop them (a client that went away).  A read past it stops
(SQLite: a progress handler that interrupts; PostgreSQL: ``statement_timeout``
and a cancel request) and raises :class:`~fleetlog.errors.ReadTimeout`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

# Defined in errors.py (the one exception tree); importable from here as before.
from fleetlog.errors import ReadTimeout as ReadTimeout
from fleetlog.errors import RecordRejected as RecordRejected
from fleetlog.errors import StoreMissing as StoreMissing
from fleetlog.errors import StoreUnavailable as StoreUnavailable
from fleetlog.records import DeviceStats, QueuedRecord, StoredRecord

if TYPE_CHECKING:
    from fleetlog.store.core import Row


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A read of one device's records, or the whole fleet's (``device_id=None``).

    Values are already validated (see :mod:`fleetlog.reading`): ``level`` is
    one of :data:`~fleetlog.store.fields.LEVELS` (it and every level above).
    """

    device_id: str | None
    since: int | None = None  # received_at >= since (ms)
    until: int | None = None  # received_at < until (ms)
    grep: str | None = None
    level: str | None = None
    limit: int = 100
    #: Follow: the first ``limit`` records stored after this ``seq``, in seq order.
    after_seq: int | None = None
    #: Keyset page: only records older than this ``(received_at, seq)``.
    before: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class VolumeBucket:
    """How many records of one level arrived in one time bucket."""

    start: int  # ms, a multiple of the step
    level: str | None
    records: int


class ReadLimit:
    """How long reads may run, and a way for another thread to stop them at once.

    ``seconds`` counts from the limit's creation (so time spent waiting for a
    reader counts too); None: no deadline, only :meth:`cancel`.  A backend
    polls :meth:`stopped` and registers a :meth:`stopper` for what it cannot
    poll (a statement running on a server).
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.cancelled = False
        self._lock = threading.Lock()
        self._stoppers: list[Callable[[], object]] = []

    def stopped(self) -> bool:
        """True once cancelled or past the deadline."""
        return self.cancelled or (self.deadline is not None and time.monotonic() >= self.deadline)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (0 when past it or cancelled); None: no deadline."""
        if self.cancelled:
            return 0.0
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def cancel(self) -> None:
        """Stop the reads under this limit now (callable from any thread)."""
        with self._lock:
            self.cancelled = True
            stoppers = list(self._stoppers)
        for stop in stoppers:
            try:
                stop()
            except Exception:
                pass

    @contextmanager
    def stopper(self, stop: Callable[[], object]) -> Iterator[None]:
        """Call ``stop`` if the limit is cancelled while the block runs."""
        with self._lock:
            self._stoppers.append(stop)
        try:
            yield
        finally:
            with self._lock:
                self._stoppers.remove(stop)

    def error(self) -> ReadTimeout:
        """The exception a stopped read raises."""
        if self.cancelled:
            return ReadTimeout("the read was cancelled (its caller went away)", cancelled=True)
        return ReadTimeout(f"the read took longer than its {self.seconds or 0:g} s budget and was stopped")


class Appended(NamedTuple):
    """What one batch appended to a store, when that is all the store holds after a seq.

    The rows have the seqs ``after + 1``, ``after + 2`` ... in order, so a
    reader that had the store through ``after`` has it through the last of
    them with these rows alone: the daily files export a batch from here,
    without reading back what was just written (:class:`~fleetlog.store.files.FilesSink`).
    """

    store_id: str
    after: int
    rows: Sequence[Row]


class Store(Protocol):
    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        """Store ``records`` in one transaction; return how many were new."""

    @property
    def appended(self) -> Appended | None:
        """What the last :meth:`write_batch` appended, when it is known to be every record
        after a seq (SQLite, a batch of new records only); else None (PostgreSQL, whose
        seqs are not commit order, a batch that held stored records, a failed one)."""

    def query(self, query: LogQuery) -> list[StoredRecord]:
        """The newest ``query.limit`` matching records, oldest first.

        With ``after_seq``: the oldest ``limit`` matching records after it, in
        seq order (a follower never skips a burst bigger than ``limit``).
        """

    def after(self, seq: int, limit: int) -> list[StoredRecord]:
        """Every record stored after ``seq``, in store order (all devices)."""

    def volume(self, device_id: str | None, since: int, until: int,
               step: int) -> list[VolumeBucket]:
        """Records received in ``[since, until)`` counted per ``step`` ms and level."""

    def upkeep(self, budget: int) -> int:
        """Do at most ``budget`` records' worth of background work; return what is left.

        The work is the backend's own business (SQLite: its full-text index).
        ``upkeep(0)`` only reports.  Reads are complete whatever is left: it
        only makes them slower.  The worker calls it when idle, and when what
        is left grows past ``index_max_lag``.
        """

    def prune(self, *, before: int | None, max_bytes: int | None, limit: int) -> int:
        """Delete up to ``limit`` records past retention (age or size); return how many.

        Never makes ``seq`` go back: a backend whose numbering restarts when the
        newest record goes (SQLite without AUTOINCREMENT) keeps that record.
        """

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

    def set_read_limit(self, limit: ReadLimit | None) -> None:
        """Hold the reads that follow to ``limit`` (None: no limit); see *Time budgets*."""

    def close(self) -> None: ...

