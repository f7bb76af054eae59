"""The :class:`~fleetlog.store.base.Store` contract, run unchanged against every backend.

Backends come from ``store_factory`` (``tests/store/conftest.py``): SQLite
and PostgreSQL.  Backend-specific behaviour (SQLite's WAL, its migrations, its
index tables; PostgreSQL's partitions, stream shards, concurrent writers) is
tested in that backend's own module.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import orjson
import pytest

from fleetlog.records import DeviceStats, QueuedRecord, StoredRecord
from fleetlog.store import LogQuery, Store, StoreMissing, StoreUnavailable, VolumeBucket
from tests.store.conftest import Backend

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


def test_prune_by_age_and_size(store_factory: Backend) -> None:
    store = store_factory.open()
    store.write_batch([rec(f"1-{n}", received_at=T0 + n) for n in range(10)])
    catch_up(store)
    assert store.prune(before=T0 + 4, max_bytes=None, limit=100) == 4
    assert qids(store.after(0, 100)) == [f"1-{n}" for n in range(4, 10)]
    assert [(d.device_id, d.records) for d in store.devices()] == [("D1", 6)]
    assert store.prune(before=None, max_bytes=1, limit=2) == 2
    assert qids(store.query(LogQuery("D1", grep="1-"))) == [f"1-{n}" for n in range(6, 10)]
    assert store.prune(before=None, max_bytes=None, limit=100) == 0


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
