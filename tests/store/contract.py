"""Behaviours every :class:`~fleetlog.store.base.Store` must have, as functions of a store.

Each ``check_*`` takes an open, empty store and asserts on what it reads back,
so the same checks run over every backend (see ``test_postgres.py``; a common
``store_factory`` parametrization can call them as they are).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from fleetlog.protocol import encode_json
from fleetlog.records import DeviceStats, QueuedRecord
from fleetlog.store.base import LogQuery, Store

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


def check_insert_is_idempotent(store: Store) -> None:
    batch = [rec(sid(T0)), rec(sid(T0, 1)), rec(sid(T0 + 5))]
    assert store.write_batch(batch) == 3
    assert store.write_batch(batch) == 0
    assert store.write_batch([rec(sid(T0 + 5)), rec(sid(T0 + 9))]) == 1
    assert store.write_batch([rec(sid(T0 + 20)), rec(sid(T0 + 20)), rec(sid(T0 + 21))]) == 2
    assert qids(store, device_id="D1") == [sid(T0), sid(T0, 1), sid(T0 + 5), sid(T0 + 9),
                                          sid(T0 + 20), sid(T0 + 21)]
    assert store.devices() == [DeviceStats("D1", 6, T0, T0 + 21)]


def check_order_per_device_and_newest_limit(store: Store) -> None:
    # Written out of order and interleaved with another device: read back by time.
    store.write_batch([rec(sid(T0 + 30), "A"), rec(sid(T0 + 10, 1), "B"), rec(sid(T0 + 10), "A")])
    store.write_batch([rec(sid(T0 + 20), "A"), rec(sid(T0 + 40), "B"), rec(sid(T0 + 40, 1), "A")])
    assert qids(store, device_id="A") == [sid(T0 + 10), sid(T0 + 20), sid(T0 + 30), sid(T0 + 40, 1)]
    assert qids(store, device_id="A", limit=2) == [sid(T0 + 30), sid(T0 + 40, 1)]
    assert qids(store, device_id="B") == [sid(T0 + 10, 1), sid(T0 + 40)]
    assert qids(store, device_id="nobody") == []
    assert store.devices() == [DeviceStats("A", 4, T0 + 10, T0 + 40), DeviceStats("B", 2, T0 + 10, T0 + 40)]


def check_level_and_time_filters(store: Store) -> None:
    levels = ["debug", "info", "WARNING", "error", "fatal", None]
    store.write_batch([
        rec(sid(T0 + n * DAY // 2), data={"level": level, "msg": f"m{n}"} if level else {"msg": "none"})
        for n, level in enumerate(levels)
    ])
    assert qids(store, device_id="D1", level="warn") == [sid(T0 + n * DAY // 2) for n in (2, 3, 4)]
    assert qids(store, device_id="D1", level="error") == [sid(T0 + n * DAY // 2) for n in (3, 4)]
    # A time range over three days' partitions, half-open.
    assert qids(store, device_id="D1", since=T0 + DAY // 2, until=T0 + 2 * DAY) == [
        sid(T0 + n * DAY // 2) for n in (1, 2, 3)]
    assert qids(store, device_id="D1", since=T0 + 2 * DAY, level="error") == [sid(T0 + 2 * DAY)]


#: Awkward texts, and which of them each search must find (by index).
AWKWARD = [
    {"msg": 'she said "hi"'},             # 0: quotes (escaped in JSON)
    {"msg": "100% done"},                 # 1: LIKE's %
    {"msg": "snake_case name"},           # 2: LIKE's _
    {"msg": "glob *.log"},                # 3: FTS's *
    {"msg": "C:\\temp\\new"},             # 4: backslashes (escaped in JSON)
    {"msg": "门已打开", "who": "张三"},     # 5: Chinese, no spaces
    {"msg": "rocket 🚀 launched"},        # 6: emoji (a surrogate pair in \u form)
    {"msg": "Door OPENED", "level": "error"},  # 7: case
    {"msg": "plain words", "n": 42},       # 8: nothing awkward
    "a bare string with \"quotes\"",      # 9: not an object
]
SEARCHES: dict[str, set[int]] = {
    '"hi"': {0},
    'said "': {0},
    "%": {1},
    "100%": {1},
    "_": {2},
    "e_c": {2},
    "*": {3},
    "*.log": {3},
    "门已": {5},
    "已打开": {5},
    "张": {5},
    "🚀": {6},
    "rocket 🚀": {6},
    "door opened": {7},
    "DOOR": {7},
    '"level":"error"': {7},  # a JSON fragment as typed
    '"n":42': {8},
    'with "quotes"': {9},
    "no such text": set(),
}


def _load_awkward(store: Store, *, escape_unicode: bool = False) -> list[str]:
    written = []
    for n, value in enumerate(AWKWARD):
        raw = orjson.dumps(value)
        if escape_unicode and n == 6:  # how a device's JSON encoder may send it
            raw = raw.decode().replace("🚀", "\\ud83d\\ude80").encode()
        record = rec(sid(T0 + n), data=raw)
        store.write_batch([record])
        written.append(record.qid)
    return written


def check_search_awkward_text(store: Store) -> None:
    written = _load_awkward(store)
    for needle, expected in SEARCHES.items():
        found = qids(store, device_id="D1", grep=needle)
        assert found == [written[n] for n in sorted(expected)], needle


def check_search_is_the_text_as_sent(store: Store) -> None:
    """Search looks in the text the device sent, not in its JSON encoding.

    A ``\\`` finds the record holding one, not every record with an escaped
    quote; an emoji sent as ``\\ud83d\\ude80`` is found as the emoji.
    """
    written = _load_awkward(store, escape_unicode=True)
    assert qids(store, device_id="D1", grep="🚀") == [written[6]]
    assert qids(store, device_id="D1", grep="\\") == [written[4]]
    assert qids(store, device_id="D1", grep="C:\\temp") == [written[4]]
    assert qids(store, device_id="D1", grep='\\"') == []


def check_cursor_after(store: Store) -> None:
    assert store.max_seq() == 0
    assert store.after(0, 10) == []
    store.write_batch([rec(sid(T0 + n), f"D{n % 3}") for n in range(10)])
    store.write_batch([rec(sid(T0 - DAY + n), "D9") for n in range(5)])  # an older day, later
    rows = store.after(0, 100)
    assert len(rows) == 15
    assert [row.seq for row in rows] == sorted({row.seq for row in rows}), "increasing, unique"
    assert store.max_seq() == rows[-1].seq
    # In pages, from any cursor: each record exactly once, in store order.
    seen, cursor = [], 0
    for _ in range(20):
        page = store.after(cursor, 4)
        if not page:
            break
        seen.extend(row.qid for row in page)
        cursor = page[-1].seq
    assert seen == [row.qid for row in rows]
    assert store.seqs_of([rows[3].qid, "123-0"]) == {rows[3].qid: rows[3].seq}
    fresh = store.query(LogQuery("D9", after_seq=rows[9].seq))
    assert [row.qid for row in fresh] == [row.qid for row in rows[10:]]


def check_retention_by_age(store: Store) -> None:
    now = int(time.time() * 1000)
    today = now - now % DAY
    old = [rec(sid(today - 10 * DAY + n), "OLD") for n in range(3)]
    mid = [rec(sid(today - 3 * DAY + n), "MID") for n in range(2)]
    new = [rec(sid(now - n), "NEW") for n in range(2)]
    store.write_batch(old + mid + new)
    pruned = 0
    for _ in range(10):
        step = store.prune(before=today - 5 * DAY, max_bytes=None, limit=1000)
        if not step:
            break
        pruned += step
    assert pruned == 3
    assert qids(store, device_id="OLD") == []
    assert len(qids(store, device_id="MID")) == 2
    assert len(qids(store, device_id="NEW")) == 2
    assert {stats.device_id: stats.records for stats in store.devices()} == {"OLD": 0, "MID": 2, "NEW": 2}
    # Redelivered after pruning: stored again (the store no longer knows it).
    assert store.write_batch(old[:1]) == 1
