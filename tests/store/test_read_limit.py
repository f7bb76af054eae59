"""Read budgets (:class:`fleetlog.store.ReadLimit`) on a real SQLite file and a real PostgreSQL.

A read past its deadline, or cancelled from another thread, stops and raises
:class:`~fleetlog.errors.ReadTimeout`; the store stays usable; and a search
that repeats one trigram no longer costs the trigram index seconds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest

from fleetlog.errors import ReadTimeout
from fleetlog.records import QueuedRecord
from fleetlog.store import LogQuery, ReadLimit
from fleetlog.store.postgres import PostgresStore
from fleetlog.store.sqlite import SQLiteStore

T0 = 1_800_000_000_000


def _costly(count: int) -> list[QueuedRecord]:
    """Records whose search text is slow to compute (100,000 numbers each: ~25 ms a record)."""
    body = orjson.dumps({"n": [1] * 100_000})
    return [QueuedRecord(f"1-{n}", "slow", T0 + n, body) for n in range(count)]


@pytest.fixture
def slow_sqlite(tmp_path: Path) -> SQLiteStore:
    """60 costly records the index does not cover yet: a search scans them all (~1.5 s)."""
    writer = SQLiteStore(tmp_path / "slow.db")
    writer.write_batch(_costly(60))
    writer.close()
    return SQLiteStore(tmp_path / "slow.db", readonly=True)


def test_a_sqlite_read_past_its_budget_stops(slow_sqlite: SQLiteStore) -> None:
    slow_sqlite.set_read_limit(ReadLimit(0.2))
    started = time.monotonic()
    with pytest.raises(ReadTimeout, match="budget") as stopped:
        slow_sqlite.query(LogQuery(None, grep="zzz"))
    assert time.monotonic() - started < 0.6 and not stopped.value.cancelled
    slow_sqlite.set_read_limit(ReadLimit(10))
    assert len(slow_sqlite.query(LogQuery("slow", limit=5))) == 5  # still usable
    slow_sqlite.close()


def test_a_sqlite_read_is_cancelled_from_another_thread(slow_sqlite: SQLiteStore) -> None:
    limit = ReadLimit()  # no deadline: only the cancel stops it
    slow_sqlite.set_read_limit(limit)
    threading.Timer(0.2, limit.cancel).start()
    started = time.monotonic()
    with pytest.raises(ReadTimeout) as stopped:
        slow_sqlite.query(LogQuery("slow", grep="zzz"))
    assert time.monotonic() - started < 0.6 and stopped.value.cancelled
    slow_sqlite.close()


def test_a_repeated_trigram_costs_the_index_nothing(tmp_path: Path) -> None:
    """8 records of 300,000 ``a``: 1,000 ``a`` took 10 s and 330 MB (the needle as one FTS5 phrase)."""
    store = SQLiteStore(tmp_path / "a.db")
    store.write_batch([QueuedRecord(f"1-{n}", "a", T0 + n, orjson.dumps({"msg": "a" * 300_000}))
                       for n in range(8)])
    while store.upkeep(1000):
        pass
    for needle, found in (("a" * 1000, 8), ("a" * 999 + "b", 0), ("A" * 256, 8)):
        for device in (None, "a"):
            started = time.monotonic()
            assert len(store.query(LogQuery(device, grep=needle))) == found
            assert time.monotonic() - started < 1.0, (len(needle), device)
    store.close()


def test_postgres_reads_have_a_statement_timeout_and_can_be_cancelled(pg_url: str) -> None:
    PostgresStore(pg_url).close()  # create the schema
    store = PostgresStore(pg_url, readonly=True)
    try:
        store.set_read_limit(ReadLimit(0.3))
        started = time.monotonic()
        with pytest.raises(ReadTimeout) as stopped, store._connection() as conn:
            conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 2 and not stopped.value.cancelled
        limit = ReadLimit()
        store.set_read_limit(limit)
        threading.Timer(0.3, limit.cancel).start()
        started = time.monotonic()
        with pytest.raises(ReadTimeout) as stopped, store._connection() as conn:
            conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 2 and stopped.value.cancelled
        with pytest.raises(ReadTimeout):  # a cancelled limit starts nothing more
            store.query(LogQuery(None))
        store.set_read_limit(ReadLimit(5))
        assert store.query(LogQuery(None)) == []  # the pool's connections still work
    finally:
        store.close()
