"""fleetlog.store.sqlite.SQLiteStore on real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetlog.exactjson import dumps as encode_json
from fleetlog.records import DeviceStats, QueuedRecord
from fleetlog.store import (
    LogQuery,
    RecordRejected,
    StoreMissing,
    StoreUnavailable,
    UnsupportedStore,
    VolumeBucket,
    open_store,
)
from fleetlog.store.search import search_text
from fleetlog.store.sqlite import MIGRATIONS, SQLiteStore

T0 = 1_795_687_200_000  # 2026-11-26T10:00:00Z


def rec(qid: str, device: str = "D1", received_at: int = T0, data: Any = None) -> QueuedRecord:
    if data is None:
        data = {"qid": qid}
    raw = data if isinstance(data, bytes) else encode_json(data)
    return QueuedRecord(qid=qid, device_id=device, received_at=received_at, data=raw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "fleetlog.db")
    yield opened
    opened.close()


def data_of(store: SQLiteStore, **query: Any) -> list[Any]:
    return [orjson.loads(row.data) for row in store.query(LogQuery(**query))]


# -- writes ----------------------------------------------------------------------


def test_write_batch_is_idempotent_on_qid(store: SQLiteStore) -> None:
    batch = [rec("1-0"), rec("1-1"), rec("2-0")]
    assert store.write_batch(batch) == 3
    assert store.write_batch(batch) == 0
    assert store.write_batch([rec("2-0"), rec("3-0")]) == 1
    assert [row.qid for row in store.query(LogQuery("D1"))] == ["1-0", "1-1", "2-0", "3-0"]
    assert store.devices() == [DeviceStats("D1", 4, T0, T0)]


def test_duplicates_within_one_batch_are_stored_once(store: SQLiteStore) -> None:
    assert store.write_batch([rec("1-0"), rec("1-0"), rec("1-1"), rec("1-0")]) == 2
    assert [row.qid for row in store.query(LogQuery("D1"))] == ["1-0", "1-1"]
    assert store.devices()[0].records == 2


def test_empty_batch(store: SQLiteStore) -> None:
    assert store.write_batch([]) == 0
    assert store.max_seq() == 0


def test_data_is_kept_exactly(store: SQLiteStore) -> None:
    payloads = [
        b'{"n":123456789012345678901234567890,"msg":"\xe9\x97\xa8\xe5\xb7\xb2\xe6\x89\x93\xe5\xbc\x80"}',
        b'"just text"',
        b"0",
        b"[1,2,3]",
        b"1.5e-7",
        b'{"z":1,"a":2}',
    ]
    store.write_batch([rec(f"1-{n}", data=payload) for n, payload in enumerate(payloads)])
    assert [row.data.encode() for row in store.query(LogQuery("D1"))] == payloads


def test_searchable_fields_are_extracted(store: SQLiteStore) -> None:
    store.write_batch([
        rec("1-0", data={"ts": "2026-11-26T09:00:00Z", "level": "WARNING", "msg": "battery low"}),
        rec("1-1", data="a text record"),
        rec("1-2", data=[1, 2]),
    ])
    rows = store.query(LogQuery("D1"))
    assert [(row.ts, row.level, row.message) for row in rows] == [
        (T0 - 3_600_000, "warn", "battery low"),
        (None, None, "a text record"),
        (None, None, None),
    ]
    assert all(row.received_at == T0 and row.device_id == "D1" for row in rows)


def test_a_record_the_store_rejects_rolls_the_batch_back(store: SQLiteStore) -> None:
    with pytest.raises(RecordRejected, match="1-1"):
        store.write_batch([rec("1-0"), rec("1-1", data=b"{not json")])
    with pytest.raises(RecordRejected, match="UnicodeDecodeError"):
        store.write_batch([rec("1-0"), rec("1-2", data=b"\xff\xfe not utf-8")])
    assert store.max_seq() == 0
    assert store.devices() == []
    assert store.write_batch([rec("1-0")]) == 1, "the store is still usable"


def corrupt(path: Path) -> None:
    """Overwrite every page after the first two with garbage, as a failing disk would."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        for offset in range(4096 * 2, size, 4096):
            handle.seek(offset)
            handle.write(b"\xde\xad\xbe\xef" * 8)


def test_read_errors_are_the_store_being_unavailable(store: SQLiteStore, tmp_path: Path) -> None:
    """A read the store cannot do (a malformed file) is StoreUnavailable, like a
    write: the worker retries it rather than dying."""
    store.write_batch([rec(f"1-{n}", data={"n": n, "pad": "x" * 200}) for n in range(2000)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    corrupt(tmp_path / "fleetlog.db")
    broken = SQLiteStore(tmp_path / "fleetlog.db", readonly=True)
    try:
        for read in (broken.index_lag, broken.max_seq, broken.devices,
                     lambda: broken.after(0, 10), lambda: broken.query(LogQuery("D1")),
                     lambda: broken.seqs_of(["1-0"])):
            with pytest.raises(StoreUnavailable, match="malformed"):
                read()
    finally:
        broken.close()


# -- devices ----------------------------------------------------------------------


def test_devices_counts_and_first_last_seen(store: SQLiteStore) -> None:
    store.write_batch([
        rec("1-0", "B", T0 + 500),
        rec("1-1", "A", T0 + 100),
        rec("1-2", "B", T0 + 200),  # older than the previous B record
    ])
    store.write_batch([rec("2-0", "A", T0 + 900), rec("2-1", "B", T0 + 50), rec("1-0", "B", T0 + 10_000)])
    assert store.devices() == [
        DeviceStats("A", 2, T0 + 100, T0 + 900),
        DeviceStats("B", 3, T0 + 50, T0 + 500),  # the replayed 1-0 changes nothing
    ]


# -- queries ------------------------------------------------------------------------


@pytest.fixture
def timeline(store: SQLiteStore) -> SQLiteStore:
    """Ten records of D1 one second apart, levels cycling, plus noise from D2."""
    levels = ["debug", "info", "warning", "error", "FATAL", "trace", "info", "warn", "notice", "err"]
    store.write_batch([
        rec(f"1-{n}", "D1", T0 + n * 1000, {"n": n, "level": levels[n], "msg": f"event {n}"})
        for n in range(10)
    ])
    store.write_batch(
        [rec(f"2-{n}", "D2", T0 + n * 1000, {"n": 100 + n, "level": "fatal"}) for n in range(3)]
    )
    return store


def numbers(store: SQLiteStore, **query: Any) -> list[int]:
    return [item["n"] for item in data_of(store, device_id="D1", **query)]


def test_query_one_device_oldest_first(timeline: SQLiteStore) -> None:
    assert numbers(timeline) == list(range(10))


def test_since_is_inclusive_until_exclusive(timeline: SQLiteStore) -> None:
    assert numbers(timeline, since=T0 + 3000) == [3, 4, 5, 6, 7, 8, 9]
    assert numbers(timeline, until=T0 + 3000) == [0, 1, 2]
    assert numbers(timeline, since=T0 + 2500, until=T0 + 5000) == [3, 4]
    assert numbers(timeline, since=T0 + 20_000) == []


def test_limit_returns_the_newest_oldest_first(timeline: SQLiteStore) -> None:
    assert numbers(timeline, limit=3) == [7, 8, 9]
    assert numbers(timeline, limit=3, until=T0 + 5000) == [2, 3, 4]
    assert numbers(timeline, limit=1) == [9]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("trace", [0, 1, 2, 3, 4, 5, 6, 7, 9]),  # everything with a known level
        ("info", [1, 2, 3, 4, 6, 7, 9]),
        ("warn", [2, 3, 4, 7, 9]),
        ("WARNING", [2, 3, 4, 7, 9]),
        ("error", [3, 4, 9]),
        ("err", [3, 4, 9]),
        ("fatal", [4]),
        ("critical", [4]),
        ("notice", [8]),  # an unknown level matches itself only
    ],
)
def test_level_means_this_level_and_above(timeline: SQLiteStore, level: str, expected: list[int]) -> None:
    assert numbers(timeline, level=level) == expected


def test_after_seq_and_max_seq(timeline: SQLiteStore) -> None:
    rows = timeline.query(LogQuery("D1"))
    assert timeline.max_seq() == 13
    assert numbers(timeline, after_seq=rows[6].seq) == [7, 8, 9]
    assert numbers(timeline, after_seq=timeline.max_seq()) == []
    everything = timeline.after(0, 100)
    assert [row.seq for row in everything] == list(range(1, 14))
    assert [row.qid for row in timeline.after(10, 2)] == ["2-0", "2-1"]


def test_grep_full_text_and_substring(store: SQLiteStore) -> None:
    store.write_batch([
        rec("1-0", data={"msg": "Door OPENED by user 42"}),
        rec("1-1", data={"msg": "door closed"}),
        rec("1-2", data={"msg": "battery at 7%"}),
        rec("1-3", data={"msg": "设备离线，门已打开"}),
        rec("1-4", data={"msg": "设备上线"}),
        rec("1-5", "D2", data={"msg": "door elsewhere"}),
    ])

    def grep(text: str) -> list[str]:
        return [row.qid for row in store.query(LogQuery("D1", grep=text))]

    # Not yet indexed (records are indexed after the ingest commit): found by a scan;
    # then indexed: found through the trigram index.  Same answers either way.
    for indexed in (False, True):
        if indexed:
            assert store.index_step(100) == 6
            assert store.index_lag() == 0
        else:
            assert store.index_lag() == 6
        # Three characters or more: the trigram index, case-insensitive.
        assert grep("door") == ["1-0", "1-1"]
        assert grep("opened") == ["1-0"]
        assert grep("user 42") == ["1-0"]
        assert grep("nothing here") == []
        # Shorter: a plain substring scan.
        assert grep("42") == ["1-0"]
        assert grep("7%") == ["1-2"]
        assert grep("Do") == ["1-0", "1-1"]
        # Chinese, which has no spaces to split words on.
        assert grep("设备") == ["1-3", "1-4"]
        assert grep("门已打开") == ["1-3"]
        assert grep("离线，门") == ["1-3"]
        assert grep("上线") == ["1-4"]
        # Text that means something to FTS5 is searched for literally.
        assert grep("door OR battery") == []
        assert grep("bat*") == []
        # The text as sent, not its JSON: no value holds a quote or a JSON fragment.
        assert grep('msg":"batt') == []
        assert grep('"') == []


def test_grep_finds_text_with_quotes_and_backslashes(store: SQLiteStore) -> None:
    store.write_batch([rec("1-0", data={"msg": 'say "hi" from C:\\temp'})])
    for text in ('say "hi"', "C:\\temp"):
        assert [row.qid for row in store.query(LogQuery("D1", grep=text))] == ["1-0"], text


def test_filters_combine(timeline: SQLiteStore) -> None:
    assert numbers(timeline, level="warn", since=T0 + 3000, limit=2) == [7, 9]
    assert numbers(timeline, grep="event 1") == [1]


# -- schema and durability ------------------------------------------------------------


def test_schema_version_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    first = SQLiteStore(path)
    assert first.schema_version == len(MIGRATIONS)
    first.write_batch([rec("1-0", data={"msg": "kept across reopen"})])
    first.close()

    again = SQLiteStore(path)  # a re-run migration would fail on CREATE TABLE
    assert again.schema_version == len(MIGRATIONS)
    assert again.max_seq() == 1
    assert [row.qid for row in again.query(LogQuery("D1", grep="across"))] == ["1-0"]
    again.close()


def test_wal_mode_and_full_sync(store: SQLiteStore) -> None:
    check = sqlite3.connect(store.path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_open_store_url(tmp_path: Path) -> None:
    opened = open_store(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    assert opened.write_batch([rec("1-0")]) == 1
    opened.close()
    assert (tmp_path / "sub" / "x.db").is_file()
    with pytest.raises(UnsupportedStore, match="unsupported store URL"):
        open_store("mysql://nope")


def test_a_reader_sees_committed_records_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    writer = SQLiteStore(path)
    writer.write_batch([rec("1-0")])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    reader = SQLiteStore(path, readonly=True)
    try:
        assert [row.qid for row in reader.query(LogQuery("D1"))] == ["1-0"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        reader.close()
        writer.close()


def test_locked_store_is_unavailable_then_recovers(store: SQLiteStore) -> None:
    store.write_batch([rec("1-0")])
    store._db.execute("PRAGMA busy_timeout = 200")
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO devices (device_id, records, first_seen, last_seen) VALUES ('other', 0, 0, 0)")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.write_batch([rec("2-0"), rec("2-1")])
        waited = time.monotonic() - started
        assert 0.15 <= waited < 5, "it waited for the busy timeout, not forever"
        assert not store._db.in_transaction
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.write_batch([rec("2-0"), rec("2-1")]) == 2
    assert [row.qid for row in store.query(LogQuery("D1"))] == ["1-0", "2-0", "2-1"]
    assert store.devices() == [DeviceStats("D1", 3, T0, T0)]


def test_index_steps_are_bounded_and_survive_retention(store: SQLiteStore) -> None:
    store.write_batch([rec(f"1-{n}", data={"msg": f"needle {n}"}) for n in range(10)])
    assert store.index_step(4) == 4
    assert store.index_lag() == 6
    # Retention deletes indexed and unindexed records alike without corrupting the index
    # (by age here, which goes ``limit`` at a time; a size pass goes until under its cap).
    assert store.prune(before=2**62, max_bytes=None, limit=6) == 6
    assert store.index_step(100) == 4
    assert [row.qid for row in store.query(LogQuery("D1", grep="needle"))] == [
        f"1-{n}" for n in range(6, 10)]
    store._db.execute("INSERT INTO search_fts (search_fts) VALUES ('integrity-check')")


def _at_schema(path: Path, version: int) -> sqlite3.Connection:
    """A new database at ``path`` with the first ``version`` migrations applied, left open."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:version], start=1):
        db.executescript(script)
        db.execute(f"PRAGMA user_version = {number}")
    return db


def _old_store(path: Path, version: int) -> None:
    """A store as an older fleetlog left it: the first ``version`` migrations, one record."""
    db = _at_schema(path, version)
    db.execute("INSERT INTO records (qid, device_id, received_at, data) VALUES ('1-0', 'D1', 1, ?)",
               [orjson.dumps({"msg": 'CAFÉ "ok"'}).decode()])
    db.close()


def test_readers_read_an_older_schema_without_migrating_it(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    _old_store(path, 5)
    reader = SQLiteStore(path, readonly=True)
    try:
        assert [r.qid for r in reader.query(LogQuery("D1", grep="café"))] == ["1-0"]
        assert reader.query(LogQuery("D1", grep="\\")) == []
        assert reader.schema_version == 5
    finally:
        reader.close()
    # A writer migrates it; the search index is rebuilt by upkeep.
    writer = SQLiteStore(path)
    assert writer.schema_version == len(MIGRATIONS) and writer.upkeep(0) == 1
    assert writer.upkeep(100) == 0
    assert [r.qid for r in writer.query(LogQuery("D1", grep="café \"ok"))] == ["1-0"]
    writer.close()


def test_readers_refuse_a_newer_schema_and_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        SQLiteStore(path, readonly=True)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreUnavailable, match="not a fleetlog store"):
        SQLiteStore(other, readonly=True)
    # An empty file is a store its writer has not created yet (`up` starting): missing, not
    # broken (a reader waits for it quietly; the alerter used to warn "store unavailable").
    (tmp_path / "new.db").touch()
    with pytest.raises(StoreMissing, match="yet"):
        SQLiteStore(tmp_path / "new.db", readonly=True)


def test_devices_know_when_each_last_sent_an_error(store: SQLiteStore) -> None:
    store.write_batch([
        rec("1-0", "A", T0, {"level": "error", "msg": "boom"}),
        rec("1-1", "A", T0 + 10, {"level": "info", "msg": "fine"}),
        rec("1-2", "B", T0 + 20, {"level": "warn", "msg": "hmm"}),
    ])
    store.write_batch([rec("2-0", "A", T0 - 5, {"level": "FATAL"}),  # older: the newest stays
                       rec("2-1", "B", T0 + 30, {"level": "critical"})])
    assert {d.device_id: d.last_error for d in store.devices()} == {"A": T0, "B": T0 + 30}
    store.write_batch([rec("3-0", "A", T0 + 40, {"level": "err"})])
    assert {d.device_id: d.last_error for d in store.devices()} == {"A": T0 + 40, "B": T0 + 30}


def test_an_upgraded_store_finds_its_devices_last_errors(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    db = _at_schema(path, 6)
    db.execute("INSERT INTO records (qid, device_id, received_at, level, data)"
               " VALUES ('1-0', 'D1', 7, 'error', '{}'), ('1-1', 'D1', 9, 'info', '{}')")
    db.execute("INSERT INTO devices VALUES ('D1', 2, 7, 9)")
    db.close()
    old = SQLiteStore(path, readonly=True)
    assert old.devices() == [DeviceStats("D1", 2, 7, 9, None)]  # read as it is
    old.close()
    writer = SQLiteStore(path)
    assert writer.devices() == [DeviceStats("D1", 2, 7, 9, 7)]
    writer.close()


# -- fleet volume, counted at ingest ------------------------------------------------

MINUTE = 60_000


def _volume_table(store: SQLiteStore) -> dict[tuple[int, str | None], int]:
    return {(minute, level if isinstance(level, str) else None): n
            for minute, level, n in store._db.execute("SELECT minute, level, n FROM volume")}


def _volume_truth(store: SQLiteStore) -> dict[tuple[int, str | None], int]:
    rows = store._db.execute(
        "SELECT received_at / 60000, level, count(*) FROM records GROUP BY 1, 2").fetchall()
    return {(minute, level): n for minute, level, n in rows}


def test_fleet_volume_is_counted_at_ingest_once_per_record(store: SQLiteStore) -> None:
    levels = [None, "info", "error", ""]  # no level at all is not the empty level
    batch = [rec(f"1-{n}", f"D{n % 3}", T0 + n * 7_000, {"level": levels[n % 4]}
                 if levels[n % 4] is not None else {"msg": "x"}) for n in range(40)]
    assert store.write_batch(batch) == 40
    assert store.write_batch([*batch[30:], rec("2-0", "D9", T0 + 5 * MINUTE)]) == 1  # redelivered
    assert _volume_table(store) == _volume_truth(store)
    assert sum(_volume_table(store).values()) == 41
    assert store.prune(before=T0 + 2 * MINUTE, max_bytes=None, limit=100) == 18
    assert _volume_table(store) == _volume_truth(store)
    assert store.prune(before=2**62, max_bytes=None, limit=5) == 5  # by age, 5 at a time
    assert _volume_table(store) == _volume_truth(store)
    assert min(_volume_table(store).values()) > 0  # emptied minutes are gone
    hourly = store.volume(None, T0, T0 + 3_600_000, 3_600_000)
    assert sum(b.records for b in hourly) == 41 - 23
    assert {b.level for b in hourly} == {None, "info", "error", ""}


def test_an_upgraded_store_counts_its_existing_records_volume(tmp_path: Path) -> None:
    path = tmp_path / "fleetlog.db"
    db = _at_schema(path, 7)
    db.execute("INSERT INTO records (qid, device_id, received_at, level, data) VALUES"
               " ('1-0', 'D1', ?, 'error', '{}'), ('1-1', 'D2', ?, NULL, '{}'),"
               " ('1-2', 'D2', ?, 'error', '{}')", (T0, T0 + 1, T0 + MINUTE))
    db.close()
    writer = SQLiteStore(path)
    try:
        assert _volume_table(writer) == {(T0 // MINUTE, "error"): 1, (T0 // MINUTE, None): 1,
                                         (T0 // MINUTE + 1, "error"): 1}
        writer.write_batch([rec("2-0", "D1", T0 + 2, {"level": "error"})])
        assert writer.volume(None, T0, T0 + 2 * MINUTE, MINUTE) == [
            VolumeBucket(T0, None, 1), VolumeBucket(T0, "error", 2),
            VolumeBucket(T0 + MINUTE, "error", 1)]
    finally:
        writer.close()


# -- fleet-wide newest first, searched ------------------------------------------------


def _vm_work(store: SQLiteStore, query: LogQuery) -> tuple[list[str], int]:
    """The query's answer and how much work SQLite did for it (VM steps / 1000)."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._db.set_progress_handler(count, 1000)
    try:
        found = [row.qid for row in store.query(query)]
    finally:
        store._db.set_progress_handler(None, 1000)
    return found, steps[0]


def _fill_matching(store: SQLiteStore, first: int, count: int) -> None:
    for start in range(first, first + count, 2000):
        store.write_batch([rec(f"{n}-0", f"D{n % 50}", T0 + n, {"msg": f"connection {n}"})
                           for n in range(start, min(start + 2000, first + count))])
    while store.upkeep(20_000) > 0:
        pass


def test_fleet_newest_first_search_stops_after_the_newest_matches(store: SQLiteStore) -> None:
    # Its work must not grow with how many older records match (a common word).
    query = LogQuery(None, grep="connection", limit=100)
    _fill_matching(store, 0, 10_000)
    small, small_work = _vm_work(store, query)
    _fill_matching(store, 10_000, 30_000)
    large, large_work = _vm_work(store, query)
    assert small == [f"{n}-0" for n in range(9_900, 10_000)]
    assert large == [f"{n}-0" for n in range(39_900, 40_000)]
    assert large_work < 1.5 * small_work, (small_work, large_work)


def test_fleet_newest_first_is_exact_when_received_at_disagrees_with_seq(
        store: SQLiteStore) -> None:
    # Commit (seq) order is not arrival order: a worker that took a later batch may
    # commit it first, a redelivered record arrives long after its peers.  The
    # newest by (received_at, seq) must come back whatever the seq.
    late = T0 + 10_000_000
    store.write_batch([rec(f"early-{n}", "A", late + n, {"msg": "door open"}) for n in range(5)])
    _fill_matching(store, 0, 12_000)  # "connection": not "door"
    store.write_batch([rec(f"door-{n}", "B", T0 + n, {"msg": "door open", "level": "warn"})
                       for n in range(12_000, 20_000)])
    store.upkeep(5_000)  # some indexed, the newest not yet
    store.write_batch([rec("redelivered", "C", T0 - 1, {"msg": "door open", "level": "warn"})])
    everything = store._db.execute(
        "SELECT qid, received_at, seq, level FROM records WHERE data LIKE '%door%'").fetchall()
    newest = sorted(everything, key=lambda row: (row[1], row[2]), reverse=True)
    for grep, level in (("door", None), ("DOOR OPEN", "warn"), (None, None)):
        wanted = [row for row in newest if level is None or row[3] == level]
        if grep is None:
            wanted = sorted(store._db.execute("SELECT qid, received_at, seq, level FROM records"),
                            key=lambda row: (row[1], row[2]), reverse=True)
        before = None
        for page in range(4):
            got = store.query(LogQuery(None, grep=grep, level=level, limit=300, before=before))
            assert [r.qid for r in got][::-1] == [row[0] for row in wanted[page * 300:][:300]], (
                grep, level, page)
            before = (got[0].received_at, got[0].seq)
    assert store.query(LogQuery(None, grep="door", limit=3))[-1].qid == "early-4"


def test_fleet_search_scans_the_records_not_indexed_yet_once(store: SQLiteStore) -> None:
    _fill_matching(store, 0, 20_000)
    store.write_batch([rec(f"tail-{n}", "D1", T0 + 30_000 + n, {"msg": f"connection {n}"})
                       for n in range(3_000)])  # not indexed yet
    scanned = [0]

    def counting(data: str | bytes | None) -> str:
        scanned[0] += 1
        return search_text(data) if data is not None else ""

    store._db.create_function("fleetlog_search_text", 1, counting, deterministic=True)
    rare = [row.qid for row in store.query(LogQuery(None, grep="connection 1234", limit=100))]
    assert rare == ["1234-0", *(f"{n}-0" for n in range(12340, 12350)), "tail-1234"]
    assert scanned[0] == 3_000  # each record the index lacks once, however wide the window grew
