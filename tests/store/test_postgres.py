"""fleetlog.store.postgres.PostgresStore on a real PostgreSQL (a private server, see tests/pg.py).

The store contract runs over both backends in ``test_contract.py``; here is
what only PostgreSQL has: stream shards, partitions, concurrent writers, a
server that goes away, read-only sessions.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleetlog.exactjson import dumps as encode_json
from fleetlog.records import QueuedRecord
from fleetlog.store import (
    LogQuery,
    RecordRejected,
    Store,
    StoreMissing,
    StoreUnavailable,
    open_store,
)
from fleetlog.store.postgres import DAYS_AHEAD, MIGRATIONS, PostgresStore, day_of, partition_name
from fleetlog.store.sqlite import SQLiteStore
from fleetlog.worker.retention import Pruner
from tests.pg import PostgresServer, held_write
from tests.store.test_contract import catch_up

T0 = 1_795_687_200_000  # 2026-11-26T10:00:00Z
DAY = 86_400_000


def rec(qid: str, device: str = "D1", received_at: int | None = None, data: Any = None,
        stream: str = "fleetlog:records") -> QueuedRecord:
    """A record as the worker gets it: ``received_at`` is the stream id's time."""
    if received_at is None:
        received_at = int(qid.partition("-")[0])
    raw = data if isinstance(data, bytes) else encode_json({"qid": qid} if data is None else data)
    return QueuedRecord(qid=qid, device_id=device, received_at=received_at, data=raw, stream=stream)


def sid(ms: int, n: int = 0) -> str:
    return f"{ms}-{n}"


def qids(store: Store, **query: Any) -> list[str]:
    return [row.qid for row in store.query(LogQuery(**query))]


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_url)
    yield opened
    opened.close()


# -- PostgreSQL only -------------------------------------------------------------------


def test_open_store_takes_postgresql_urls_and_migrates_once(pg_url: str) -> None:
    first = open_store(pg_url)
    assert isinstance(first, PostgresStore)
    assert first.schema_version == len(MIGRATIONS)
    second = open_store(pg_url.replace("postgresql://", "postgres://"))  # a second worker
    assert second.store_id == first.store_id
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [
            (n,) for n in range(1, len(MIGRATIONS) + 1)]  # each once
    first.close()
    second.close()


def test_a_reader_names_the_missing_store_without_its_password(pg_url: str) -> None:
    base, _, name = pg_url.rpartition("/")
    secret = base.replace("postgres@", "postgres:s3cret@")  # trust auth: any password works
    with pytest.raises(StoreMissing) as missing:
        open_store(f"{secret}/nowhere", readonly=True)
    assert "s3cret" not in str(missing.value) and "postgres:********@" in str(missing.value)
    with pytest.raises(StoreMissing, match="no fleetlog tables") as empty:
        open_store(f"{secret}/{name}", readonly=True)  # the database is there, empty
    assert "s3cret" not in str(empty.value)
    with psycopg.connect(pg_url) as conn:  # and the reader created nothing in it
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)


def test_a_reader_session_is_read_only(store: PostgresStore, pg_url: str) -> None:
    store.write_batch([rec(sid(T0))])
    reader = PostgresStore(pg_url, readonly=True)
    try:
        with pytest.raises(StoreUnavailable, match="read-only"):
            reader.write_batch([rec(sid(T0, 1))])
        with pytest.raises(StoreUnavailable, match="read-only"):
            reader.prune(before=T0 + DAY, max_bytes=None, limit=10)
        assert reader.upkeep(10_000) == 1  # reports what is not indexed, indexes nothing
        assert store.upkeep(10_000) == 0
        with reader._connection() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM meta")
        assert qids(store, device_id="D1") == [sid(T0)]
    finally:
        reader.close()


def test_device_stats_deltas_fold_in_upkeep(store: PostgresStore, pg_url: str) -> None:
    def deltas() -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM device_counts").fetchone()
        return int(row[0]) if row else 0

    store.write_batch([rec(sid(T0, n), f"D{n % 2}") for n in range(4)])
    assert store.upkeep(10) == 0 and deltas() == 2  # a handful: not worth a fold yet
    for batch in range(1, 6):  # 1000 devices a batch: past _FOLD_AFTER delta rows
        store.write_batch([rec(sid(T0 + batch, n), f"D{n}") for n in range(1000)])
    assert deltas() == 5002
    assert store.upkeep(10_000) == 0
    assert deltas() == 1000
    stats = {d.device_id: d.records for d in store.devices()}
    assert len(stats) == 1000 and stats["D0"] == 7 and stats["D1"] == 7 and stats["D2"] == 5


def test_last_error_survives_the_fold_a_merge_and_retention(store: PostgresStore,
                                                             pg_url: str) -> None:
    error = {"level": "error", "msg": "e"}
    store.write_batch([rec(sid(T0, 0), "A", data=error), rec(sid(T0 + 5, 0), "A"),
                       rec(sid(T0 + 1, 0), "B", data={"level": "Fatal"})])
    # A redelivery with one new record goes through the merge (ON CONFLICT) path.
    store.write_batch([rec(sid(T0, 0), "A", data=error), rec(sid(T0 + 3, 0), "A", data=error)])
    before = [(d.device_id, d.records, d.last_error) for d in store.devices()]
    assert before == [("A", 3, T0 + 3), ("B", 1, T0 + 1)]
    store._unfolded = 1_000_000  # a fold is due
    store.upkeep(10)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM device_counts").fetchone() == (2,)
    assert [(d.device_id, d.records, d.last_error) for d in store.devices()] == before
    store.prune(before=T0 + 4, max_bytes=None, limit=100)  # as on SQLite: last_error stays
    assert [(d.device_id, d.records, d.last_error) for d in store.devices()] == [
        ("A", 1, T0 + 3), ("B", 0, T0 + 1)]


def test_migration_2_finds_last_error_in_the_records_stored(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    store.write_batch([rec(sid(T0, 0), "A", data={"level": "error"}), rec(sid(T0 + 1, 0), "A"),
                       rec(sid(T0 + 2, 0), "B", data={"level": "warn"}),
                       rec(sid(T0 + 3, 0), "C", data={"level": "fatal"}),
                       rec(sid(T0 + 4, 0), "C", data={"level": "error"})])
    store.close()
    with psycopg.connect(pg_url) as conn:  # back to schema 1, as an older fleetlog left it
        conn.execute("ALTER TABLE device_counts DROP COLUMN last_error")
        conn.execute("DELETE FROM schema_version WHERE version >= 2")
    old = PostgresStore(pg_url, readonly=True)  # a reader never migrates: no last_error yet
    assert [(d.device_id, d.records, d.last_error) for d in old.devices()] == [
        ("A", 2, None), ("B", 1, None), ("C", 2, None)]
    migrated = PostgresStore(pg_url)
    assert [(d.device_id, d.records, d.first_seen, d.last_seen, d.last_error)
            for d in migrated.devices()] == [("A", 2, T0, T0 + 1, T0), ("B", 1, T0 + 2, T0 + 2, None),
                                             ("C", 2, T0 + 3, T0 + 4, T0 + 4)]
    assert [d.last_error for d in old.devices()] == [T0, None, T0 + 4]  # and the reader sees it
    old.close()
    migrated.close()


def test_same_id_from_two_stream_shards_is_two_records(store: PostgresStore) -> None:
    a = rec(sid(T0), data={"shard": "a"}, stream="fleetlog:records:0")
    b = rec(sid(T0), data={"shard": "b"}, stream="fleetlog:records:1")
    assert store.write_batch([a, b]) == 2
    assert store.write_batch([b]) == 0
    assert [row.data for row in store.query(LogQuery("D1"))] == ['{"shard":"a"}', '{"shard":"b"}']


def test_partitions_by_day_made_ahead_and_on_demand(store: PostgresStore, pg_url: str) -> None:
    today = day_of(int(time.time() * 1000))

    def partitions() -> set[str]:
        with psycopg.connect(pg_url) as conn:
            return {name for (name,) in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'records'::regclass")}

    ahead = {partition_name(day) for day in range(today - 1, today + DAYS_AHEAD + 1)}
    assert partitions() == ahead
    # A record of a day long ago (a redelivery) gets its partition, and lands in it.
    old = (today - 400) * DAY + 5
    assert store.write_batch([rec(sid(old))]) == 1
    assert partitions() == ahead | {partition_name(today - 400)}
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(f"SELECT qid FROM {partition_name(today - 400)}").fetchall() == [(sid(old),)]


def test_retention_drops_whole_partitions(store: PostgresStore, pg_url: str) -> None:
    today = day_of(int(time.time() * 1000))

    def exists(day: int) -> bool:
        with psycopg.connect(pg_url) as conn:
            return conn.execute("SELECT to_regclass(%s)", (partition_name(day),)).fetchone() != (None,)

    store.write_batch([rec(sid((today - 21) * DAY + n), "X") for n in range(30)])
    store.write_batch([rec(sid((today - 20) * DAY + n), "X") for n in range(100)])
    store.write_batch([rec(sid((today - 2) * DAY + n), "X") for n in range(10)])
    # Days wholly past go in one DROP each, whatever their size; in the day the
    # cutoff falls in, rows go, at most ``limit`` a call.
    assert store.prune(before=(today - 20) * DAY + 50, max_bytes=None, limit=10) == 30 + 10
    assert not exists(today - 21) and exists(today - 20)
    assert store.prune(before=(today - 20) * DAY + 50, max_bytes=None, limit=100) == 40
    assert store.prune(before=(today - 20) * DAY + 50, max_bytes=None, limit=100) == 0
    assert store.prune(before=(today - 19) * DAY, max_bytes=None, limit=10) == 50
    assert not exists(today - 20)
    assert len(qids(store, device_id="X", limit=1000)) == 10

def test_retention_by_size_drops_whole_past_days_and_never_today(
        store: PostgresStore, pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A row delete frees no disk on PostgreSQL: deleting rows "while over" went on until the
    store was empty, the records just stored and acked included (30,000 of 30,000)."""
    today = day_of(int(time.time() * 1000))
    for back in (3, 2, 1):
        store.write_batch([rec(sid((today - back) * DAY + n), "X") for n in range(200)])
    store.write_batch([rec(sid(today * DAY + n), "X") for n in range(200)])
    with psycopg.connect(pg_url) as conn:
        one_day = int(conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                                   (partition_name(today),)).fetchone()[0])
    total = store.used_bytes()
    # Just over a cap of all but one day: the oldest day goes, whole, and nothing else.
    assert store.prune(before=None, max_bytes=total - one_day // 2, limit=10) == 200
    assert len(qids(store, device_id="X", limit=2000)) == 600
    assert store.prune(before=None, max_bytes=total - one_day // 2, limit=10) == 0
    # A cap below one day: the past days go, today's records stay, and the log says why.
    with caplog.at_level(logging.WARNING, logger="fleetlog.store"):
        assert store.prune(before=None, max_bytes=1, limit=10) == 400
        assert store.prune(before=None, max_bytes=1, limit=10) == 0
    assert "only today's records left" in caplog.text
    assert sorted(qids(store, device_id="X", limit=2000)) == sorted(sid(today * DAY + n) for n in range(200))
    assert store.devices()[0].records == 200


def test_a_bad_record_is_rejected_alone(store: PostgresStore) -> None:
    with pytest.raises(RecordRejected):
        store.write_batch([rec(sid(T0)), rec(sid(T0, 1), data=b'{"a": "\\u0000" broken')])
    with pytest.raises(RecordRejected):
        store.write_batch([rec(sid(T0, 2), data=b"text with a NUL \x00")])
    assert qids(store, device_id="D1") == []  # nothing of the rejected batch kept
    # A NUL escaped inside JSON is fine: kept as sent, searchable around it.
    assert store.write_batch([rec(sid(T0, 3), data=b'{"msg":"a\\u0000b"}')]) == 1
    assert [row.data for row in store.query(LogQuery("D1", grep="a"))] == ['{"msg":"a\\u0000b"}']


def test_store_unavailable_while_the_server_is_down(private_postgres: PostgresServer) -> None:
    url = private_postgres.create_database()
    store = PostgresStore(url, timeout=2)
    try:
        assert store.write_batch([rec(sid(T0))]) == 1
        private_postgres.stop("immediate")  # a crash: what was committed must survive it
        with pytest.raises(StoreUnavailable):
            store.write_batch([rec(sid(T0, 1))])
        with pytest.raises(StoreUnavailable):
            store.query(LogQuery("D1"))
        with pytest.raises(StoreUnavailable):
            PostgresStore(url, timeout=2)
        private_postgres.start()
        # The pool replaces its broken connections: the same object works again.
        deadline = time.monotonic() + 20
        while True:
            try:
                assert store.write_batch([rec(sid(T0, 1))]) == 1
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert qids(store, device_id="D1") == [sid(T0), sid(T0, 1)]
    finally:
        store.close()


def test_a_late_commit_is_never_skipped_by_a_cursor(store: PostgresStore, pg_url: str) -> None:
    """Worker A's transaction stays open while worker B commits; a follower misses nothing.

    A's rows have lower seqs than B's (its transaction id came first); until A
    commits, B's record is not shown past the horizon either.
    """
    worker_b = PostgresStore(pg_url)
    follower_seen: list[str] = []
    follow_log: list[str] = []
    assert store.write_batch([rec(sid(T0))]) == 1
    cursor = store.max_seq()
    query_cursor = cursor

    def follow() -> None:
        nonlocal cursor, query_cursor
        for row in store.after(cursor, 1000):
            follower_seen.append(row.qid)
            cursor = row.seq
        for row in store.query(LogQuery("D1", after_seq=query_cursor, limit=1000)):
            follow_log.append(row.qid)
            query_cursor = row.seq

    try:
        with held_write(pg_url, [rec(sid(T0, 1)), rec(sid(T0, 9))]) as release:
            assert worker_b.write_batch([rec(sid(T0, 2))]) == 1
            follow()  # B's record is committed, but below it A may still commit: not yet shown
            assert follower_seen == [] and follow_log == []
            assert release() == 2
        follow()
        follow()
        assert follower_seen == [sid(T0, 1), sid(T0, 9), sid(T0, 2)], "each once, in seq order"
        assert follow_log == follower_seen
        assert store.max_seq() == cursor
    finally:
        worker_b.close()


def test_the_search_index_never_skips_a_late_commit(store: PostgresStore, pg_url: str) -> None:
    """Upkeep indexes only below the horizon, so a late commit is indexed later, not never."""
    store.write_batch([rec(sid(T0), data={"msg": "early"})])
    with held_write(pg_url, [rec(sid(T0, 1), data={"msg": "late"}),
                             rec(sid(T0, 2), data={"msg": "late"})]) as release:
        store.write_batch([rec(sid(T0, 3), data={"msg": "later"})])
        assert store.upkeep(10_000) == 1  # the first record only: "later" is above A's rows
        assert release() == 2
    assert store.upkeep(10_000) == 0
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM search").fetchone() == (4,)
    assert qids(store, device_id="D1", grep="LATE") == [sid(T0, 1), sid(T0, 2), sid(T0, 3)]


def test_concurrent_writers_and_a_follower_lose_and_repeat_nothing(
    store: PostgresStore, pg_url: str
) -> None:
    """Four writers commit batches at once while a follower pages through ``after``."""
    writers = [PostgresStore(pg_url) for _ in range(4)]
    seen: list[str] = []
    done = threading.Event()

    def write(index: int) -> None:
        for batch in range(25):
            writers[index].write_batch(
                [rec(sid(T0 + batch, index * 100 + n), f"D{n % 5}") for n in range(40)])

    threads = [threading.Thread(target=write, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    cursor = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = done.is_set()
        page = store.after(cursor, 500)
        for row in page:
            seen.append(row.qid)
            cursor = row.seq
        if finished and not page:  # the writers are done and the follower read everything
            break
        if not any(thread.is_alive() for thread in threads):
            done.set()
    for thread in threads:
        thread.join(10)
    for writer in writers:
        writer.close()
    assert len(seen) == 4 * 25 * 40
    assert len(set(seen)) == len(seen)


def test_queued_record_stream_defaults_keep_sqlite_keyed_on_qid(tmp_path: Path) -> None:
    """SQLite keys on qid alone (one stream per store); the stream field changes nothing there."""
    sqlite = SQLiteStore(tmp_path / "fleetlog.db")
    try:
        assert sqlite.write_batch([QueuedRecord("1-0", "D1", 1, b"{}", stream="s:0")]) == 1
        assert sqlite.write_batch([QueuedRecord("1-0", "D1", 1, b"{}", stream="s:1")]) == 0
    finally:
        sqlite.close()


def test_a_retention_that_cannot_get_its_lock_waits_for_the_interval(
        store: PostgresStore, pg_url: str) -> None:
    """With a reader holding the partition (``pg_dump`` does, for its whole run), every batch
    of the worker tried the DROP again and waited 2 s for its lock: 16,000 of 20,000 stored
    in 12 s instead of all."""
    today = day_of(int(time.time() * 1000))
    store.write_batch([rec(sid((today - 5) * DAY + n), "X") for n in range(10)])
    store.write_batch([rec(sid(today * DAY + n), "X") for n in range(10)])
    pruner = Pruner(store, None, retention_ms=2 * DAY, max_bytes=None, interval=3600)
    with psycopg.connect(pg_url) as holder:
        holder.execute(f"SELECT count(*) FROM {partition_name(today - 5)}")  # its lock, until commit
        with pytest.raises(StoreUnavailable):
            pruner.step()
        started = time.monotonic()
        assert pruner.step() == 0 and pruner.step() == 0  # not tried again: no wait for the lock
        assert time.monotonic() - started < 1.0
    pruner._next = 0.0  # the interval passed
    assert pruner.step() == 10
    assert len(qids(store, device_id="X", limit=100)) == 10


def test_a_value_past_an_index_limit_is_a_rejected_record_not_an_unavailable_store(
        store: PostgresStore) -> None:
    """"index row size 4032 exceeds btree version 4 maximum 2704" was taken for a server fault:
    the worker retried the batch for good, and no record behind it was stored."""
    with pytest.raises(RecordRejected, match="index row size"):
        store.write_batch([rec(sid(T0), secrets.token_urlsafe(3000)), rec(sid(T0, 1))])  # no compressing
    assert store.write_batch([rec(sid(T0, 1))]) == 1  # its neighbour, alone (the worker's retry)


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_database_that_is_not_utf8_is_refused_at_open_by_its_encoding(
        pg_url: str, encoding: str) -> None:
    """A LATIN1 database made the worker exit on a record in Chinese (on every restart, the
    whole batch pending); a SQL_ASCII one gave readers bytes (``logs`` crashed)."""
    base, _, name = pg_url.rpartition("/")
    other = f"{name}_{encoding.lower()}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {other} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
                     " TEMPLATE template0")
    try:
        for readonly in (False, True):
            with pytest.raises(StoreUnavailable, match=f"has encoding {encoding}: fleetlog stores UTF-8"):
                open_store(f"{base}/{other}", readonly=readonly)
        with psycopg.connect(f"{base}/{other}") as conn:  # nothing was created in it
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                                ).fetchone() == (0,)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {other}")


def test_seq_stays_ahead_of_the_records_after_a_restore_into_a_new_cluster(
        store: PostgresStore, pg_url: str) -> None:
    """Restored (``pg_dump``) into a fresh ``initdb``, the store's records held transaction
    ids far ahead of the new cluster's: new records got smaller seqs, and the daily files,
    ``--follow`` and the search index, which read after their cursor, never had them."""
    store.write_batch([rec(sid(T0), data={"msg": "before the restore"})])
    catch_up(store)
    with psycopg.connect(pg_url) as conn:  # the old cluster's ids: a billion transactions ahead
        conn.execute("UPDATE records SET seq = seq + (1000000000::bigint << 20)")
        conn.execute("UPDATE search SET seq = seq + (1000000000::bigint << 20)")
        conn.execute("UPDATE meta SET value = (SELECT max(seq) FROM records)::text"
                     " WHERE key = 'search_through'")
        cursor = int(conn.execute("SELECT max(seq) FROM records").fetchone()[0])  # the files' cursor
    restarted = PostgresStore(pg_url)  # the worker, started against the restored store
    try:
        restarted.write_batch([rec(sid(T0, 1), data={"msg": "after the restore"})])
        catch_up(restarted)
        assert [r.qid for r in restarted.after(cursor, 10)] == [sid(T0, 1)]
        assert restarted.max_seq() > cursor
        assert [r.qid for r in restarted.query(LogQuery("D1", grep="after the restore"))] == [sid(T0, 1)]
        # Writers opened before and after agree, and a second open changes nothing.
        store.write_batch([rec(sid(T0, 2))])
        again = PostgresStore(pg_url)
        again.write_batch([rec(sid(T0, 3))])
        assert [r.qid for r in again.after(cursor, 10)] == [sid(T0, n) for n in (1, 2, 3)]
        again.close()
    finally:
        restarted.close()
