"""Reads never hold the SQLite store's WAL (issue 17, item 8), on real files and threads.

With reads always in flight, SQLite's own (passive) checkpoints never let the
WAL start over: it grew to 500 MB under four reading clients.  The store keeps
every read statement short and on its own, and the writer restarts the WAL once
it passes ``WAL_LIMIT`` (``wal_checkpoint(RESTART)``, waiting briefly for the reads
in flight).  Here the limit is 1 MiB and SQLite's automatic checkpoint 100 pages,
so that a few thousand records show what a drain into a big store does.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fleetlog.reading import Reader, logs_request, volume_request
from fleetlog.records import QueuedRecord
from fleetlog.store import LogQuery
from fleetlog.store import sqlite as sqlite_module
from fleetlog.store.search import search_text
from fleetlog.store.sqlite import SQLiteStore

T0 = 1_795_687_200_000
NOW = T0 + 3_600_000
LIMIT = 1 << 20
#: What the writer may add past the limit while it waits for reads to make way (its
#: tries are spaced out), with readers sharing its process (and GIL) here.
SLACK = 7 << 20


def batch(start: int, count: int = 500) -> list[QueuedRecord]:
    return [QueuedRecord(f"{n}-0", f"D{n % 100}", T0 + n, orjson.dumps(
        {"level": "info", "msg": f"connection {n} established"})) for n in range(start, start + count)]


@pytest.fixture
def path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sqlite_module, "WAL_LIMIT", LIMIT)
    return tmp_path / "fleetlog.db"


def open_writer(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store._db.execute("PRAGMA wal_autocheckpoint = 100")  # as 10,000 pages are to a big store
    return store


def wal_size(path: Path) -> int:
    try:
        return os.stat(path.with_name(path.name + "-wal")).st_size
    except FileNotFoundError:
        return 0


class Readers:
    """Threads reading the store without pause, each through its own read-only reader."""

    def __init__(self, path: Path, count: int = 4) -> None:
        self.url = f"sqlite:///{path}"
        self.stop = threading.Event()
        self.reads = [0] * count
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(n,)) for n in range(count)]

    def _loop(self, n: int) -> None:
        try:
            with Reader.open(self.url) as reader:
                while not self.stop.is_set():
                    reader.page(logs_request(f"D{n}", now_ms=NOW, limit=100))
                    reader.page(logs_request(None, now_ms=NOW, q="connection", limit=100))
                    reader.page(logs_request(None, now_ms=NOW, q="7 est", limit=100))
                    reader.volume(volume_request(None, now_ms=NOW, since="2h", step="minute"))
                    self.reads[n] += 4
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors


def drain(path: Path, store: SQLiteStore, batches: int) -> int:
    """Write ``batches`` batches under a reading load; the largest WAL seen."""
    largest = 0
    with Readers(path) as readers:
        while min(readers.reads) == 0:
            time.sleep(0.01)
        for n in range(batches):
            store.write_batch(batch(100_000 + 500 * n))
            largest = max(largest, wal_size(path))
    assert min(readers.reads) > 4, readers.reads
    return largest


@pytest.fixture
def filled(path: Path) -> Iterator[SQLiteStore]:
    store = open_writer(path)
    for start in range(0, 20_000, 2_000):
        store.write_batch(batch(start, 2_000))
    while store.upkeep(20_000) > 0:
        pass
    yield store
    store.close()


def test_the_wal_stays_bounded_while_reads_never_stop(path: Path, filled: SQLiteStore) -> None:
    largest = drain(path, filled, 80)
    assert largest <= LIMIT + SLACK, largest
    assert filled._wal_restarts >= 2  # it did restart it, more than once


def test_without_the_bound_the_same_reads_let_the_wal_grow(
        path: Path, filled: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The control: SQLite's own checkpoints alone, same load.
    monkeypatch.setattr(filled, "_bound_wal", lambda: None)
    assert drain(path, filled, 80) > 3 * (LIMIT + SLACK)


def test_a_reader_between_pages_holds_no_snapshot(path: Path, filled: SQLiteStore) -> None:
    written = itertools.count(500_000, 10)

    def restartable() -> bool:
        """A RESTART checkpoint finds no reader in the way (it waits for none)."""
        filled.write_batch(batch(next(written), 10))
        filled._db.execute("PRAGMA busy_timeout = 0")
        try:
            busy, _, _ = filled._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            filled._db.execute("PRAGMA busy_timeout = 5000")
        return busy == 0

    with Reader.open(f"sqlite:///{path}") as reader:
        exported = reader.export(logs_request(None, now_ms=NOW), batch=100)
        assert [next(exported) for _ in range(150)]  # in the middle of its second page
        assert not reader.store._db.in_transaction and restartable()
        searched = reader.export(logs_request(None, now_ms=NOW, q="connection"), batch=100)
        assert [next(searched) for _ in range(150)]
        assert not reader.store._db.in_transaction and restartable()
        stop = threading.Event()
        followed = reader.follow(logs_request("D1", now_ms=NOW), 0, poll=0.01, stop=stop)
        assert [next(followed) for _ in range(50)]
        assert not reader.store._db.in_transaction and restartable()
        first, rest = reader.tail(logs_request(None, now_ms=NOW, limit=10), stop=stop)
        assert first and not reader.store._db.in_transaction and restartable()
        assert next(rest)  # what restartable() wrote
        assert not reader.store._db.in_transaction and restartable()
        stop.set()


def test_a_reader_stuck_in_a_transaction_costs_ingest_little_and_the_wal_recovers(
        path: Path, filled: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "_WAL_STUCK_S", 3.0)
    stuck = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
    stuck.execute("BEGIN")
    stuck.execute("SELECT count(*) FROM records").fetchone()  # holds its snapshot
    written = itertools.count(200_000, 500)
    started = time.monotonic()
    while filled._wal_wait_ms < sqlite_module._WAL_WAIT_MAX_MS:  # tries, each waiting longer
        assert filled.write_batch(batch(next(written))) == 500  # every commit stands
        assert time.monotonic() - started < 10
    assert wal_size(path) > LIMIT + SLACK  # held: nothing can restart it
    assert filled.write_batch(batch(next(written))) == 500  # the last, longest try (1 s)
    waited, tries = time.monotonic() - started, filled._wal_tries
    # Then it leaves the WAL alone for _WAL_STUCK_S: commits at full speed.
    started = time.monotonic()
    for _ in range(20):
        filled.write_batch(batch(next(written)))
    assert filled._wal_tries == tries and time.monotonic() - started < 0.5 * waited
    stuck.execute("COMMIT")
    stuck.close()
    time.sleep(3)
    filled.write_batch(batch(next(written), 10))  # restarts it (and waits for nobody)
    filled.write_batch(batch(next(written), 10))  # writes it from the start, cut back
    assert wal_size(path) <= LIMIT and filled._wal_wait_ms == sqlite_module._WAL_WAIT_MS


def test_a_fleet_search_scans_the_unindexed_records_in_short_statements(
        path: Path, filled: SQLiteStore) -> None:
    for n in range(6):
        filled.write_batch(batch(50_000 + 1000 * n, 1000))  # 6,000 records not indexed yet
    calls: list[int] = [0]  # search_text calls per statement, the last one growing
    filled._db.set_trace_callback(lambda _statement: calls.append(0))

    def counting(data: str | bytes | None) -> str:
        calls[-1] += 1
        return search_text(data) if data is not None else ""

    filled._db.create_function("fleetlog_search_text", 1, counting, deterministic=True)
    found = filled.query(LogQuery(None, grep="connection 5", limit=10_000))
    expected = [n for n in [*range(20_000), *range(50_000, 56_000)] if str(n).startswith("5")]
    assert [row.qid for row in found] == [f"{n}-0" for n in expected]  # oldest first
    assert sum(calls) == 6_000  # each unindexed record once
    assert max(calls) <= sqlite_module._SCAN_SLICE  # and never many in one statement
