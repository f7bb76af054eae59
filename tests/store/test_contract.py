"""The :class:`~fleetlog.store.base.Store` contract, run unchanged against every backend.

Backends come from ``store_factory`` (``tests/store/conftest.py``): SQLite
and PostgreSQL.  Backend-specific behaviour (SQLite's WAL, its migrations, its
index tables; PostgreSQL's partitions, stream shards, concurrent writers) is
tested in that backend's own module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetlog.reading import Reader, list_devices, logs_request, volume_request
from fleetlog.records import DeviceStats, QueuedRecord, StoredRecord, iso_ms
from fleetlog.store import (
    LogQuery,
    RecordRejected,
    Store,
    StoreMissing,
    StoreUnavailable,
    VolumeBucket,
)
from tests.store.conftest import BACKENDS, Backend

T0 = 1_795_687_200_000  # 2026-11-26T10:00:00Z
DAY = 86_400_000


def rec(qid: str, device: str = "D1", received_at: int = T0, **data: Any) -> QueuedRecord:
    return QueuedRecord(qid, device, received_at, orjson.dumps(data or {"qid": qid}))


def qids(records: list[StoredRecord]) -> list[str]:
    return [record.qid for record in records]


def catch_up(store: Store) -> None:
    for _ in range(100):
        if store.upkeep(10_000) == 0:
            return
    raise AssertionError("upkeep never caught up")


# -- writes ----------------------------------------------------------------------


def test_writes_are_idempotent_on_qid(store_factory: Backend) -> None:
    store = store_factory.open()
    assert store.write_batch([rec("1-0"), rec("1-1"), rec("1-0")]) == 2
    assert store.write_batch([rec("1-1"), rec("1-2")]) == 1
    assert qids(store.after(0, 100)) == ["1-0", "1-1", "1-2"]
    assert store.devices() == [DeviceStats("D1", 3, T0, T0)]
    assert store.seqs_of(["1-0", "9-9"]).keys() == {"1-0"}
    # By stream id, as the worker writes them: their time is received_at.
    assert store.write_batch([rec(f"{T0 + 5}-0", received_at=T0 + 5)]) == 1
    assert store.seqs_of([f"{T0 + 5}-0"]).keys() == {f"{T0 + 5}-0"}
    assert store.devices() == [DeviceStats("D1", 4, T0, T0 + 5)]


def test_records_keep_their_order_per_device(store_factory: Backend) -> None:
    store = store_factory.open()
    for batch in range(3):
        store.write_batch([rec(f"{batch}-{n}", f"D{n % 2}", T0 + batch) for n in range(4)])
    for device in ("D0", "D1"):
        stored = store.query(LogQuery(device, limit=100))
        assert qids(stored) == [f"{b}-{n}" for b in range(3) for n in range(4) if n % 2 == int(device[1])]
        assert [r.seq for r in stored] == sorted(r.seq for r in stored)


def test_newest_first_is_by_time_not_by_arrival(store_factory: Backend) -> None:
    # Written out of order and interleaved with another device: read back by time.
    store = store_factory.open()
    store.write_batch([rec("a3", "A", T0 + 30), rec("b1", "B", T0 + 10), rec("a1", "A", T0 + 10)])
    store.write_batch([rec("a2", "A", T0 + 20), rec("b4", "B", T0 + 40), rec("a4", "A", T0 + 40)])
    assert qids(store.query(LogQuery("A"))) == ["a1", "a2", "a3", "a4"]
    assert qids(store.query(LogQuery("A", limit=2))) == ["a3", "a4"]
    assert qids(store.query(LogQuery("B"))) == ["b1", "b4"]
    assert store.devices() == [DeviceStats("A", 4, T0 + 10, T0 + 40),
                               DeviceStats("B", 2, T0 + 10, T0 + 40)]


def test_data_comes_back_exactly_as_sent(store_factory: Backend) -> None:
    store = store_factory.open()
    raw = '{"msg":"é \\"q\\" \\\\ 中文 🔥","n":1.50}'.encode()
    store.write_batch([QueuedRecord("1-0", "D1", T0, raw)])
    [record] = store.query(LogQuery("D1"))
    assert record.data.encode() == raw and record.message == 'é "q" \\ 中文 🔥'


# -- queries ---------------------------------------------------------------------


@pytest.fixture
def timeline(store_factory: Backend) -> Store:
    store = store_factory.open()
    levels = ["debug", "info", "warn", "error"]
    store.write_batch([rec(f"1-{n}", "D1" if n < 8 else "D2", T0 + n * 1000,
                           level=levels[n % 4], msg=f"event {n}") for n in range(10)])
    return store


def test_query_filters_and_limits(timeline: Store) -> None:
    assert qids(timeline.query(LogQuery("D1", limit=3))) == ["1-5", "1-6", "1-7"]
    assert qids(timeline.query(LogQuery("D1", since=T0 + 2000, until=T0 + 4000))) == ["1-2", "1-3"]
    assert qids(timeline.query(LogQuery("D1", level="warn"))) == ["1-2", "1-3", "1-6", "1-7"]
    assert qids(timeline.query(LogQuery("D2"))) == ["1-8", "1-9"]
    assert qids(timeline.query(LogQuery(None, limit=3))) == ["1-7", "1-8", "1-9"]
    assert timeline.query(LogQuery("nobody")) == []


def test_level_aliases_and_time_ranges_over_several_days(store_factory: Backend) -> None:
    store = store_factory.open()
    levels = ["debug", "info", "WARNING", "error", "fatal", None]
    store.write_batch([rec(f"1-{n}", received_at=T0 + n * DAY // 2,
                           **({"level": level, "msg": f"m{n}"} if level else {"msg": "none"}))
                       for n, level in enumerate(levels)])
    assert qids(store.query(LogQuery("D1", level="warn"))) == ["1-2", "1-3", "1-4"]
    assert qids(store.query(LogQuery("D1", level="error"))) == ["1-3", "1-4"]
    assert qids(store.query(LogQuery("D1", since=T0 + DAY // 2, until=T0 + 2 * DAY))) == [
        "1-1", "1-2", "1-3"]  # half-open, across three days
    assert qids(store.query(LogQuery(None, since=T0 + 2 * DAY, level="error"))) == ["1-4"]


def test_keyset_pages_cover_everything_once(timeline: Store) -> None:
    seen: list[str] = []
    before = None
    for _ in range(10):
        page = timeline.query(LogQuery(None, limit=3, before=before))
        if not page:
            break
        seen += qids(page)[::-1]  # each page newest first after the one before
        before = (page[0].received_at, page[0].seq)
    assert seen == [f"1-{n}" for n in reversed(range(10))]


def test_keyset_pages_hold_still_when_records_arrive_in_the_same_ms(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}") for n in range(5)])  # all in one millisecond
    first = store.query(LogQuery("D1", limit=2))
    store.write_batch([rec("2-0")])  # a newer one arrives between pages
    second = store.query(LogQuery("D1", limit=2, before=(first[0].received_at, first[0].seq)))
    assert qids(first) == ["1-3", "1-4"] and qids(second) == ["1-1", "1-2"]


def test_volume_counts_records_per_bucket_and_level(timeline: Store) -> None:
    buckets = timeline.volume(None, T0, T0 + 10_000, 5000)
    assert sum(b.records for b in buckets) == 10
    assert VolumeBucket(T0, "debug", 2) in buckets  # events 0 and 4
    assert timeline.volume("D2", T0, T0 + 10_000, 10_000) == [
        VolumeBucket(T0, "debug", 1), VolumeBucket(T0, "info", 1)]  # events 8 and 9


def test_volume_by_whole_minutes_stays_exact_through_redelivery_and_retention(
        store_factory: Backend) -> None:
    store = store_factory.open()
    minute = 60_000
    batch = [rec(f"1-{n}", f"D{n % 3}", T0 + n * 20_000, **({"level": "warn"} if n % 2 else {}))
             for n in range(12)]  # 4 minutes of 3 records, every other one a warning
    store.write_batch(batch)
    store.write_batch([*batch[8:], rec("2-0", "D1", T0 + 4 * minute + 1, level="error")])

    def counts(since: int, until: int, step: int) -> dict[tuple[int, str | None], int]:
        return {(b.start, b.level): b.records for b in store.volume(None, since, until, step)}

    assert counts(T0, T0 + 10 * minute, 2 * minute) == {
        (T0, None): 3, (T0, "warn"): 3, (T0 + 2 * minute, None): 3, (T0 + 2 * minute, "warn"): 3,
        (T0 + 4 * minute, "error"): 1}
    assert counts(T0 + minute, T0 + 2 * minute, minute) == {
        (T0 + minute, None): 1, (T0 + minute, "warn"): 2}
    assert store.prune(before=T0 + minute + 30_000, max_bytes=None, limit=100) == 5
    assert counts(T0 - 60 * minute, T0 + 60 * minute, 60 * minute) == {
        (T0, None): 3, (T0, "warn"): 4, (T0, "error"): 1}  # T0 is 10:00
    assert counts(T0, T0 + 10 * minute, minute) == {
        (T0 + minute, "warn"): 1, (T0 + 2 * minute, None): 2, (T0 + 2 * minute, "warn"): 1,
        (T0 + 3 * minute, None): 1, (T0 + 3 * minute, "warn"): 2, (T0 + 4 * minute, "error"): 1}


# -- search ----------------------------------------------------------------------

SEARCHABLE = {
    "q": {"msg": 'say "hi" from C:\\temp'},
    "esc": {"msg": 'he said "ok"'},  # escaped quotes in its JSON, no backslash in the text
    "pct": {"msg": "disk 100% full_now"},
    "fts": {"msg": "glob a*b and NEAR(x y) and -x flag"},
    "zh": {"msg": "设备离线 🔥 alarm"},
    "fr": {"msg": "CAFÉ OUVERT", "Straße": "x"},
    "plain": {"msg": "plain record"},
    "bare": "a bare string with \"quotes\"",  # JSON, not an object
    "text": "not JSON at all: Ärger",
}
#: How a device's JSON encoder may send a record: escapes undone before searching.
SENT_ESCAPED = {"emoji": b'{"msg":"rocket \\ud83d\\ude80 launched","path":"C:\\\\new"}'}
SEARCHES = [
    ("\\", ["q", "emoji"]),
    ('"', ["q", "esc", "bare"]),
    ('"hi"', ["q"]),
    ("C:\\temp", ["q"]),
    ("%", ["pct"]), ("100%", ["pct"]), ("_", ["pct"]), ("full_now", ["pct"]), ("0%", ["pct"]),
    ("*", ["fts"]), ("a*b", ["fts"]), ("NEAR(", ["fts"]), ("near(x y)", ["fts"]), ("-x", ["fts"]),
    ("设备", ["zh"]), ("🔥", ["zh"]), ("离线 🔥", ["zh"]),
    ("café", ["fr"]), ("Café ouvert", ["fr"]), ("strasse", ["fr"]), ("STRASSE", ["fr"]),
    ("🚀", ["emoji"]), ("rocket 🚀", ["emoji"]), ("c:\\new", ["emoji"]), ("\\u", []),
    ('with "quotes"', ["bare"]), ("ärger", ["text"]), ("JSON at", ["text"]),
    ("msg", sorted(set(SEARCHABLE) - {"bare", "text"} | {"emoji"})),  # keys are text sent too
    ('":"', []), ("door OR plain", []), ("plain*", []), ("nothing", []),
]


@pytest.fixture
def searchable(store_factory: Backend) -> Store:
    store = store_factory.open()
    store.write_batch([
        QueuedRecord(name, "D1", T0, orjson.dumps(data) if isinstance(data, dict) else
                     orjson.dumps(data) if name == "bare" else str(data).encode())
        for name, data in SEARCHABLE.items()])
    store.write_batch([QueuedRecord(name, "D1", T0, raw) for name, raw in SENT_ESCAPED.items()])
    return store


@pytest.mark.parametrize(("needle", "expected"), SEARCHES, ids=[s[0] for s in SEARCHES])
def test_search_is_plain_text_in_what_the_device_sent(searchable: Store, needle: str,
                                                      expected: list[str]) -> None:
    # The same answer whether the store's index covers the records or not.
    for indexed in (False, True):
        if indexed:
            catch_up(searchable)
        found = searchable.query(LogQuery("D1", grep=needle, limit=100))
        assert sorted(qids(found)) == sorted(expected), (needle, indexed)


def test_search_answers_alike_across_the_index_boundary(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec("1-0", msg="Café du coin")])
    catch_up(store)
    store.write_batch([rec("1-1", msg="CAFÉ DU COIN")])  # not indexed yet
    for needle in ("café", "CAFÉ", "é du"):
        assert qids(store.query(LogQuery("D1", grep=needle))) == ["1-0", "1-1"], needle


# -- cursors ---------------------------------------------------------------------


def test_after_resumes_from_a_seq_without_skipping_or_repeating(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}", f"D{n % 3}") for n in range(25)])
    seen: list[str] = []
    cursor = 0
    for _ in range(20):
        chunk = store.after(cursor, 4)
        if not chunk:
            break
        seen += qids(chunk)
        cursor = chunk[-1].seq
    assert seen == [f"1-{n}" for n in range(25)]
    assert store.max_seq() == cursor


def test_following_a_burst_bigger_than_the_limit_skips_nothing(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec("0-0")])
    cursor = store.max_seq()
    store.write_batch([rec(f"1-{n}", received_at=T0 + n % 3) for n in range(30)])
    seen: list[str] = []
    for _ in range(20):
        chunk = store.query(LogQuery("D1", limit=7, after_seq=cursor))
        if not chunk:
            break
        seen += qids(chunk)
        cursor = chunk[-1].seq
    assert seen == [f"1-{n}" for n in range(30)]


def test_a_record_of_an_older_day_written_later_comes_later(store_factory: Backend) -> None:
    # A redelivery from long ago: seq order is store order, not time order.
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}", f"D{n % 3}", T0 + n) for n in range(10)])
    cursor = store.max_seq()
    store.write_batch([rec(f"0-{n}", "D9", T0 - DAY + n) for n in range(5)])
    rows = store.after(0, 100)
    assert qids(rows) == [f"1-{n}" for n in range(10)] + [f"0-{n}" for n in range(5)]
    assert [row.seq for row in rows] == sorted({row.seq for row in rows}), "increasing, unique"
    assert qids(store.query(LogQuery("D9", after_seq=cursor))) == [f"0-{n}" for n in range(5)]
    assert qids(store.query(LogQuery("D9"))) == [f"0-{n}" for n in range(5)]


def test_a_second_reader_sees_committed_records_in_seq_order(store_factory: Backend) -> None:
    writer = store_factory.open()
    writer.write_batch([rec("1-0")])
    reader = store_factory.open(readonly=True)
    cursor = reader.max_seq()
    writer.write_batch([rec("2-0"), rec("2-1")])
    assert qids(reader.after(cursor, 10)) == ["2-0", "2-1"]


# -- retention -------------------------------------------------------------------


def test_prune_by_age(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}", received_at=T0 + n) for n in range(10)])
    catch_up(store)
    assert store.prune(before=T0 + 4, max_bytes=None, limit=100) == 4
    assert qids(store.after(0, 100)) == [f"1-{n}" for n in range(4, 10)]
    assert [(d.device_id, d.records) for d in store.devices()] == [("D1", 6)]
    assert store.prune(before=None, max_bytes=None, limit=100) == 0
    # (By size, each backend as it frees disk: test_sqlite.py by row, test_postgres.py by day.)


def test_retention_by_age_across_days_and_a_redelivery_after_it(store_factory: Backend) -> None:
    store = store_factory.open()
    now = int(time.time() * 1000)
    today = now - now % DAY
    old = [rec(f"1-{n}", "OLD", today - 10 * DAY + n) for n in range(3)]
    mid = [rec(f"2-{n}", "MID", today - 3 * DAY + n) for n in range(2)]
    new = [rec(f"3-{n}", "NEW", now - n) for n in range(2)]
    store.write_batch(old + mid + new)
    pruned = 0
    for _ in range(10):
        step = store.prune(before=today - 5 * DAY, max_bytes=None, limit=1000)
        if not step:
            break
        pruned += step
    assert pruned == 3
    assert qids(store.after(0, 100)) == [r.qid for r in mid + new]
    assert {d.device_id: d.records for d in store.devices()} == {"OLD": 0, "MID": 2, "NEW": 2}
    # Redelivered after pruning: stored again (the store no longer knows it).
    assert store.write_batch(old[:1]) == 1


# -- opening ---------------------------------------------------------------------


def test_a_reader_never_creates_a_store(store_factory: Backend) -> None:
    with pytest.raises(StoreMissing, match="nowhere"):
        replace(store_factory, url=store_factory.missing_url).open(readonly=True)
    with pytest.raises(StoreMissing):
        store_factory.open(readonly=True)  # not created yet either
    store_factory.open().write_batch([rec("1-0")])
    reader = store_factory.open(readonly=True)
    assert qids(reader.query(LogQuery("D1"))) == ["1-0"]
    with pytest.raises(StoreUnavailable):
        reader.write_batch([rec("1-1")])


def test_an_unreadable_store_is_unavailable(store_factory: Backend) -> None:
    store_factory.open().write_batch([rec("1-0")])
    store_factory.close_all()
    store_factory.wreck()
    with pytest.raises(StoreUnavailable):
        store = store_factory.open(readonly=True)
        store.query(LogQuery("D1"))


def test_seqs_never_go_back_even_when_retention_empties_the_store(store_factory: Backend) -> None:
    # A follower (or the daily files' cursor) holding the last seq must see what comes next.
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}", received_at=T0 + n) for n in range(5)])
    cursor = store.max_seq()
    store.prune(before=T0 + 100, max_bytes=None, limit=100)
    store.write_batch([rec("2-0", received_at=T0 + 200)])
    assert qids(store.after(cursor, 10)) == ["2-0"]
    assert qids(store.query(LogQuery("D1", after_seq=cursor))) == ["2-0"]


# -- both stores agree -----------------------------------------------------------
#
# The same input written to SQLite and to PostgreSQL must read back the same from
# every read: every field of every record (``seq`` only as its place in store
# order: each store numbers its own), the device stats, pages, follow, volume and
# search, and the reading layer on top of them (pages with cursors, the device list).

NOW = T0 + 2 * DAY
#: Awkward records: (qid, device, received_at, data exactly as queued).
AWKWARD: list[tuple[str, str, int, bytes]] = [
    ("nul-msg", "D1", T0, b'{"msg":"a\\u0000b","level":"ERROR"}'),
    ("nul-level", "D1", T0 + 1, b'{"level":"err\\u0000or","msg":"NUL in the level"}'),
    ("nul-key", "D2", T0 + 1, b'{"k\\u0000ey":"v\\u0000","msg":"NUL in a key"}'),
    ("nul-bare", "D2", T0 + 2, b'"a bare string with a NUL \\u0000 in it"'),
    ("non-bmp", "\U0001f525-device", T0 + 2,
     '{"msg":"rocket \U0001f680 clef \U0001d11e ext-b \U00020000","level":"Warning"}'.encode()),
    ("escaped", "\U0001f525-device", T0 + 3, b'{"msg":"\\ud83d\\ude80 escaped","level":"CRIT"}'),
    ("huge", "D1", T0 + 3,
     b'{"ts":1e300,"n":123456789012345678901234567890,"f":-0.0,"msg":"huge numbers"}'),
    ("ts-ms", "D1", T0 + 4, b'{"ts":1795687200123,"msg":"ms"}'),
    ("ts-s", "D1", T0 + 4, b'{"time":1795687200.5,"msg":"seconds"}'),
    ("ts-iso", "D3", T0 + 5, b'{"timestamp":"2026-11-26T10:00:00.250+02:00","msg":"iso"}'),
    ("ts-naive", "D3", T0 + 5, b'{"ts":"2026-11-26T10:00:00","msg":"no zone"}'),
    ("ts-bool", "D3", T0 + 6, b'{"ts":true,"level":" info ","msg":"bool ts"}'),
    ("ts-old", "D3", T0 + 6, b'{"ts":-99999999999999,"msg":"before 1970"}'),
    ("nested", "D2", T0 + 7, b'{"msg":{"nested":[1,{"deep":"x"}]},"a":[[[]]],"level":"fatal"}'),
    ("empty", "D2", T0 + 7, b'{"msg":"","level":""}'),
    ("nulls", "D2", T0 + 8, b'{"msg":null,"level":null,"message":"second key"}'),
    ("not-text", "D2", T0 + 8, b'{"msg":42,"level":7}'),
    ("dup-key", "D1", T0 + 9, b'{"msg":"first","msg":"second"}'),
    ("alias", "D1", T0 + 9, b'{"level":"Err","msg":"odd case alias"}'),
    ("custom", "D1", T0 + 10, b'{"level":"NOTICE","msg":"custom level"}'),
    ("dotted", "D1", T0 + 10, '{"level":"\u0130NFO","msg":"dotted capital I"}'.encode()),
    ("array", "D3", T0 + 11, b'[1,"two",{"three":3}]'),
    ("number", "D3", T0 + 11, b"42"),
    ("null", "D3", T0 + 11, b"null"),
    ("infinite", "D3", T0 + 11, b"1e400"),  # read as text (not an object nor a string)
    ("text", "D3", T0 + 12, "plain text, not JSON: \u00c4rger".encode()),
    ("spaced", "D3", T0 + 12, b'  {"msg":"leading space"}'),
    ("big", "D4", T0 + 13, b'{"msg":"' + b"x" * 100_000 + b'","level":"debug"}'),
    ("yesterday", "D4", T0 - DAY + 5, b'{"msg":"a day before","level":"error"}'),
    ("tomorrow", "D4", T0 + DAY + 5, b'{"msg":"a day after","level":"warn"}'),
    ("\u00e9-device-1", "\u00e9", T0 + 14, b'{"msg":"accented device","level":"trace"}'),
    ("Z-device-1", "Z", T0 + 14, b'{"msg":"capital device","level":"fatal"}'),
    *[(f"same-ms-{n}", "D5", T0 + 20, b'{"msg":"same millisecond %d","level":"%s"}'
       % (n, [b"info", b"error", b"warn"][n % 3])) for n in range(7)],
]
#: What every store refuses, each alone: no store keeps any of them.
REFUSED = [b'{"broken', b"raw text with a NUL \x00", b'{"m":"\\ud800"}', b"\xff\xfe not UTF-8",
           b'{"a":"\xff"}', b'{"n":1e400}', b""]
NEEDLES = ["a\x00b", "\x00", "\ufffd", "k\x00ey", "\U0001f680", "\U0001d11e", "\U00020000",
           "ROCKET", "1e+300", "1.2345678901234568e+29", "-0.0", "deep", "nested", "three",
           "\u00e4rger", "\u00c4RGER", "leading space", "x" * 50, "second", "first", "notice",
           "dotted", "same millisecond", "NUL", "day", "escaped"]


@pytest.fixture
def both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Store]]:
    """A fresh store of every backend, by name."""
    backends = {name: make(request, tmp_path / name) for name, make in sorted(BACKENDS.items())}
    try:
        yield {name: backend.open() for name, backend in backends.items()}
    finally:
        for backend in backends.values():
            backend.close_all()


Row = tuple[Any, ...]


def _ranks(store: Store) -> dict[int, int]:
    return {row.seq: n for n, row in enumerate(store.after(0, 1_000_000))}


def _rows(store: Store, records: list[StoredRecord]) -> list[Row]:
    """Every field of ``records``, ``seq`` as its place in the store's order."""
    rank = _ranks(store)
    return [(rank[r.seq], r.qid, r.device_id, r.received_at, r.ts, r.level, r.message, r.data)
            for r in records]


def _pages(store: Store, query: LogQuery) -> list[list[Row]]:
    """Newest-first keyset pages of ``query`` (each store following its own cursors)."""
    pages, before = [], None
    for _ in range(100):
        page = store.query(replace(query, before=before))
        if not page:
            return pages
        pages.append(_rows(store, page))
        before = (page[0].received_at, page[0].seq)
    raise AssertionError("pages never ended")


def _follow(store: Store, query: LogQuery) -> list[list[Row]]:
    """``after_seq`` batches from the start (each store following its own cursors)."""
    batches, cursor = [], 0
    for _ in range(100):
        batch = store.query(replace(query, after_seq=cursor))
        if not batch:
            return batches
        batches.append(_rows(store, batch))
        cursor = batch[-1].seq
    raise AssertionError("follow never ended")


def _reads(store: Store) -> dict[str, Any]:
    """Every read of the store, normalised (see :func:`_rows`)."""
    devices = [d.device_id for d in store.devices()]
    reads: dict[str, Any] = {"devices": store.devices(), "after": _rows(store, store.after(0, 1000))}
    chunks, cursor = [], 0
    while chunk := store.after(cursor, 7):
        chunks.append(_rows(store, chunk))
        cursor = chunk[-1].seq
    reads["after in chunks"] = chunks
    assert store.max_seq() == cursor and store.after(store.max_seq(), 10) == []
    for device in [None, *devices, "nobody"]:
        for level in (None, "trace", "info", "warn", "error", "fatal", "ERROR", "Warning", "notice"):
            query = LogQuery(device, level=level, limit=3)
            reads[f"pages {device} {level}"] = _pages(store, query)
            reads[f"follow {device} {level}"] = _follow(store, replace(query, limit=4))
        for since, until in ((T0, T0 + 10), (T0 - DAY, T0), (None, T0 + DAY), (T0 + 5, None)):
            reads[f"range {device} {since} {until}"] = _pages(
                store, LogQuery(device, since=since, until=until, limit=4))
        for since, until, step in ((T0 - DAY, T0 + 2 * DAY, 1000), (T0 - DAY, T0 + 2 * DAY, 60_000),
                                   (T0 - DAY, T0 + 2 * DAY, 3_600_000), (T0, T0 + 60_000, 7),
                                   (T0 + 1, T0 + 20, 5), (T0 - DAY, T0 + 2 * DAY, DAY)):
            reads[f"volume {device} {since} {until} {step}"] = store.volume(device, since, until, step)
    for needle in NEEDLES:
        for device in (None, "D1", "D2"):
            query = LogQuery(device, grep=needle, limit=100)
            reads[f"grep {needle!r} {device}"] = _rows(store, store.query(query))
            reads[f"grep pages {needle!r} {device}"] = _pages(store, replace(query, limit=2))
            reads[f"grep follow {needle!r} {device}"] = _follow(store, replace(query, limit=2))
    qids = [qid for qid, _, _, _ in AWKWARD]
    reads["seqs_of"] = sorted(store.seqs_of([*qids, "missing"]))
    # The reading layer on top: the API's and the CLI's pages and device list.
    reader = Reader(store)
    reads["device list"] = list_devices(store, None)
    for device in (None, "D1", "\U0001f525-device"):
        for q, level in ((None, None), ("NUL", None), (None, "error"), ("\U0001f680", "warn")):
            pages, cursor_text = [], None
            for _ in range(50):
                page = reader.page(logs_request(device, now_ms=NOW, since="3d", q=q, level=level,
                                                limit=2, cursor=cursor_text))
                pages.append((_rows(store, page.records), page.next_cursor is not None))
                cursor_text = page.next_cursor
                if cursor_text is None:
                    break
            reads[f"reader pages {device} {q} {level}"] = pages
        reads[f"reader volume {device}"] = reader.volume(volume_request(
            device, now_ms=NOW, since="3d", step="hour"))
    return reads


def _agree(stores: dict[str, Store]) -> None:
    answers = {name: _reads(store) for name, store in stores.items()}
    (first, expected), *others = answers.items()
    for name, got in others:
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == expected[key], f"{name} and {first} differ: {key}"


def test_both_stores_read_back_awkward_input_alike(both: dict[str, Store]) -> None:
    for store in both.values():
        batch = [QueuedRecord(qid, device, at, data) for qid, device, at, data in AWKWARD]
        assert store.write_batch(batch[:20]) == 20
        assert store.write_batch(batch) == len(batch) - 20  # a redelivery stores nothing twice
    _agree(both)  # the search index behind
    for store in both.values():
        catch_up(store)
    _agree(both)  # the search index caught up
    sqlite = both["sqlite"]
    [nul] = sqlite.query(LogQuery("D1", grep="a\x00b"))
    # The text columns hold U+FFFD for NUL (PostgreSQL's text cannot hold NUL); data is as sent.
    assert (nul.message, nul.level, nul.data) == (
        "a\ufffdb", "error", '{"msg":"a\\u0000b","level":"ERROR"}')
    assert [r.level for r in sqlite.query(LogQuery("D1", grep="NUL in the level"))] == ["err\ufffdor"]
    for store in both.values():
        assert store.prune(before=T0 + 5, max_bytes=None, limit=10_000) > 0
    _agree(both)  # retention leaves the stats (last_error too) alike


def test_last_error_is_the_newest_error_or_fatal_on_every_store(both: dict[str, Store]) -> None:
    for store in both.values():
        store.write_batch([rec("1-0", "A", T0, level="error"), rec("1-1", "A", T0 + 5, level="info"),
                           rec("1-2", "B", T0 + 1, level="warn"),
                           rec("1-3", "C", T0 + 2, level="FATAL"), rec("1-4", "C", T0 + 1, level="Err")])
        store.write_batch([rec("2-0", "A", T0 + 3, level="critical"),  # an alias of fatal
                           rec("2-1", "B", T0 + 9), rec("2-2", "C", T0 - 5, level="error")])
        assert store.devices() == [DeviceStats("A", 3, T0, T0 + 5, T0 + 3),
                                   DeviceStats("B", 2, T0 + 1, T0 + 9, None),
                                   DeviceStats("C", 3, T0 - 5, T0 + 2, T0 + 2)]
        devices, _ = list_devices(store, None)
        assert [d.last_error for d in devices] == [iso_ms(T0 + 3), None, iso_ms(T0 + 2)]


@pytest.mark.parametrize("data", REFUSED, ids=[repr(d)[:20] for d in REFUSED])
def test_what_one_store_refuses_every_store_refuses(both: dict[str, Store], data: bytes) -> None:
    for name, store in both.items():
        with pytest.raises(RecordRejected):
            store.write_batch([rec("1-0"), QueuedRecord("1-1", "D1", T0, data)])
        assert store.after(0, 10) == [], name  # nothing of the batch kept
        assert store.write_batch([rec("1-0")]) == 1
