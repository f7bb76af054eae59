"""fleetlog.reading: requests, pages, follow and the device list, on a real store and Redis."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import orjson
import pytest
import redis

from fleetlog import keys
from fleetlog.credentials import Credentials
from fleetlog.reading import (
    READ_THREADS,
    SQLITE_READ_THREADS,
    InvalidRequest,
    Reader,
    ReaderPool,
    decode_cursor,
    list_devices,
    logs_request,
    volume_request,
)
from fleetlog.records import QueuedRecord
from fleetlog.store import StoreMissing, open_store
from fleetlog.store.sqlite import SQLiteStore
from tests.pg import held_write

T0 = 1_795_687_200_000
NOW = T0 + 3_600_000


def rec(qid: str, device: str = "D1", at: int = T0, **data: object) -> QueuedRecord:
    return QueuedRecord(qid, device, at, orjson.dumps(data or {"msg": qid}))


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([rec(f"1-{n}", "D1" if n % 2 else "D2", T0 + n, level="info", msg=f"m{n}")
                       for n in range(9)])
    store.close()
    return f"sqlite:///{tmp_path / 'fleetlog.db'}"


@pytest.mark.parametrize(("fields", "problem"), [
    ({"level": "loud"}, "unknown level"),
    ({"since": "yesterday"}, "since"),
    ({"until": "3 parsecs"}, "until"),
    ({"limit": "0"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": 10**9}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"),
])
def test_malformed_requests_are_one_clear_error(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        logs_request("D1", now_ms=NOW, **fields)  # type: ignore[arg-type]


def test_a_request_is_normalised() -> None:
    request = logs_request(None, now_ms=NOW, since="1h", level="WARNING", limit="5", q="")
    assert (request.since, request.level, request.limit, request.q) == (T0, "warn", 5, None)
    with pytest.raises(InvalidRequest, match="step"):
        volume_request(None, now_ms=NOW, step="1ms")
    assert volume_request("D1", now_ms=NOW, since="2h", step="hour").step == 3_600_000


def test_the_default_volume_window_is_whole_minutes_and_takes_in_now(tmp_path: Path) -> None:
    # Whole minutes let the fleet's volume come from its per-minute counts.
    now = NOW + 30_500
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([rec("1-0", "D1", now - 3_600_000 + 60_000, level="warn"),
                       rec("1-1", "D2", now, level="warn"), rec("1-2", "D2", now + 60_000)])
    store.close()
    request = volume_request(None, now_ms=now, since="1h")
    assert (request.since % 60_000, request.until % 60_000) == (0, 0)
    assert request.since <= now - 3_600_000 and now < request.until <= now + 60_000
    with Reader.open(f"sqlite:///{tmp_path / 'fleetlog.db'}") as reader:
        assert [(b.level, b.records) for b in reader.volume(request)] == [("warn", 1), ("warn", 1)]


def test_pages_are_newest_first_and_chain_by_cursor(store_url: str) -> None:
    with Reader.open(store_url) as reader:
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(10):
            page = reader.page(logs_request(None, now_ms=NOW, limit=4, cursor=cursor))
            seen += [r.qid for r in page.records]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == [f"1-{n}" for n in reversed(range(9))]
        assert decode_cursor(reader.page(logs_request("D1", now_ms=NOW, limit=1)).next_cursor
                             or "") == (T0 + 7, 8)


def test_follow_yields_new_records_in_order_and_stops(store_url: str, tmp_path: Path) -> None:
    stop = threading.Event()
    with Reader.open(store_url) as reader:
        start = reader.position()
        writer = SQLiteStore(tmp_path / "fleetlog.db")
        writer.write_batch([rec(f"2-{n}", "D1", T0 + 100 - n) for n in range(2500)])  # > one batch
        writer.close()
        got = []
        for record in reader.follow(logs_request("D1", now_ms=NOW), start, poll=0.01, stop=stop):
            got.append(record.qid)
            if len(got) == 2500:
                stop.set()
        assert got == [f"2-{n}" for n in range(2500)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tail_shows_a_late_commit_once_and_the_first_page_only_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``logs --follow``: a record committed late with a lower seq than one shown still comes.

    On PostgreSQL worker A's write is held in flight while worker B commits; the
    first page shows B's record.  Following from the newest record shown would
    skip A's forever; following from the horizon brings A's, and B's not again.
    """
    url = (request.getfixturevalue("pg_url") if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'fleetlog.db'}")
    writer = open_store(url)
    writer.write_batch([rec("1-0")])
    late = [rec("2-0", at=T0 + 1), rec("2-1", at=T0 + 1)]
    stop = threading.Event()
    timer = threading.Timer(10, stop.set)  # the bound, should a record never come
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            release = stack.enter_context(held_write(url, late))
        else:
            def release() -> int:
                return writer.write_batch(late)
        writer.write_batch([rec("3-0", at=T0 + 2)])
        reader = stack.enter_context(Reader.open(url))
        first, more = reader.tail(logs_request("D1", now_ms=NOW), poll=0.01, stop=stop)
        assert [r.qid for r in first] == ["1-0", "3-0"]
        assert release() == 2
        timer.start()
        got = []
        for record in more:
            got.append(record.qid)
            if len(got) == 2:
                writer.write_batch([rec("4-0", at=T0 + 3)])
            if len(got) == 3:
                stop.set()
        timer.cancel()
    writer.close()
    assert got == ["2-0", "2-1", "4-0"]


def test_a_missing_store_is_never_created(tmp_path: Path) -> None:
    with pytest.raises(StoreMissing, match="--data-dir"):
        Reader.open(f"sqlite:///{tmp_path / 'none' / 'fleetlog.db'}")
    assert list(tmp_path.iterdir()) == []


def test_devices_join_store_links_refusals_and_tokens(store_url: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        Credentials(client, confirm_timeout=0.1).add("silent")
        client.hset(keys.DEVICE_LINKS, "D1", orjson.dumps({"node": "n1", "conn": "c", "since": "s"}))
        client.hset(keys.DEVICE_LINKS, "ghost", orjson.dumps({"node": "dead", "conn": "c"}))
        client.set(keys.node_heartbeat("n1"), "1", px=60_000)
        client.hset(keys.refusals("D2"), "rate_limited", 3)
        with Reader.open(store_url) as reader:
            rows, warning = reader.devices(client)
            online, _ = reader.devices(client, online=True)
            by_records, _ = reader.devices(client, sort="records", descending=True, prefix="D")
    finally:
        client.close()
    assert warning == ""
    table = {row.device_id: row for row in rows}
    assert sorted(table) == ["D1", "D2", "ghost", "silent"]
    assert (table["D1"].online, table["D1"].node, table["D1"].records) == (True, "n1", 4)
    assert table["ghost"].online is False and table["ghost"].node is None
    assert table["D2"].refused == {"rate_limited": 3} and table["D2"].records == 5
    assert table["silent"].provisioned and table["silent"].records == 0
    assert [row.device_id for row in online] == ["D1"]
    assert [row.device_id for row in by_records] == ["D2", "D1"]


def test_devices_without_redis_say_why(store_url: str) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    store = SQLiteStore(store_url.removeprefix("sqlite:///"), readonly=True)
    try:
        rows, warning = list_devices(store, client)
    finally:
        store.close()
        client.close()
    assert "Redis unavailable" in warning
    assert [row.device_id for row in rows] == ["D1", "D2"] and not any(r.online for r in rows)


def test_a_pool_runs_two_reads_at_once_on_sqlite(store_url: str) -> None:
    # SQLite reads in one process share its GIL, and the writer waits for the reads in
    # flight when it restarts the WAL: more at once only makes each longer.
    pool = ReaderPool(store_url)
    running, most = [0], [0]
    lock = threading.Lock()

    def read(reader: Reader) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return len(reader.latest(logs_request(None, now_ms=NOW)))

    try:
        assert [f.result(10) for f in [pool.submit(read) for _ in range(8)]] == [9] * 8
    finally:
        pool.close()
    assert most[0] == SQLITE_READ_THREADS == 2
    assert ReaderPool("postgresql://nowhere/db")._threads == READ_THREADS  # reads on a server
