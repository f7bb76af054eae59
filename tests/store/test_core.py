"""The rules both SQL stores share (fleetlog.store.core), spelt in each dialect; no database."""

from __future__ import annotations

import pytest

from fleetlog.errors import InvalidRequest, RecordRejected, StoreUnavailable
from fleetlog.records import QueuedRecord
from fleetlog.store import LogQuery, core
from fleetlog.store.postgres import DIALECT as POSTGRES
from fleetlog.store.sqlite import DIALECT as SQLITE

T0 = 1_700_000_000_000


def test_the_query_ladder_in_each_dialect() -> None:
    query = LogQuery("D1", since=T0, until=T0 + 10, level="warning", before=(T0 + 5, 7))
    assert core.where(query, SQLITE) == (
        ["device_id = ?", "received_at >= ?", "received_at < ?",
         "(received_at < ? OR (received_at = ? AND seq < ?))", "level IN (?,?,?)"],
        ["D1", T0, T0 + 10, T0 + 5, T0 + 5, 7, "warn", "error", "fatal"])
    terms, params = core.where(query, POSTGRES)
    assert terms == ["device_id = %s", "received_at >= %s", "received_at < %s",
                     "(received_at, seq) < (%s, %s)", "level = ANY(%s)"]
    assert params == ["D1", T0, T0 + 10, T0 + 5, 7, ["warn", "error", "fatal"]]


def test_follow_reads_in_seq_order_and_postgres_stays_below_the_horizon() -> None:
    query = LogQuery(None, after_seq=41, level="custom")
    assert core.where(query, SQLITE) == (["seq > ?", "level = ?"], [41, "custom"])
    assert core.order_of(query) == "seq"
    assert core.order_of(LogQuery(None)) == core.NEWEST_FIRST
    assert "pg_snapshot_xmin" in core.where(query, POSTGRES)[0][0]
    assert core.select_statement(SQLITE, [], "seq", limited=False) == (
        f"SELECT {core.COLUMNS} FROM records ORDER BY seq")
    assert core.after_statement(SQLITE) == (
        f"SELECT {core.COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?")


def test_device_stats_fold_a_batch() -> None:
    new = [("A", T0 + 5, "info"), ("B", T0, None), ("A", T0, "error"), ("A", T0 + 9, "fatal"),
           ("A", T0 + 7, "warn")]
    assert core.device_stats(new) == [("A", 4, T0, T0 + 9, T0 + 9), ("B", 1, T0, T0, None)]
    assert core.device_stats([]) == []


@pytest.mark.parametrize("data", [b'{"broken', b"\xff\xfe not UTF-8", b"a raw \x00 NUL"])
def test_prepare_refuses_what_no_store_can_hold(data: bytes) -> None:
    with pytest.raises(RecordRejected, match="record 1-0"):
        core.prepare(QueuedRecord("1-0", "D1", T0, data))


@pytest.mark.parametrize("number", ["123456789012345678901234567890", "9" * 400])
def test_prepare_takes_every_integer_the_gateway_takes(number: str) -> None:
    """The gateway keeps integers beyond 64 bits exact; the store must take them too
    (orjson reads a 400-digit one as an infinite double and refuses it)."""
    data = b'{"level": "warn", "msg": "m", "n": ' + number.encode() + b"}"
    assert core.prepare(QueuedRecord("1-0", "D1", T0, data)) == (
        "1-0", "D1", T0, None, "warn", "m", data.decode())


def test_prepare_makes_the_row() -> None:
    record = QueuedRecord("1-0", "D1", T0, b'{"ts": 1700000000, "level": "ERR", "msg": "a\\u0000b"}')
    assert core.prepare(record) == ("1-0", "D1", T0, 1_700_000_000_000, "error", "a\ufffdb",
                                    record.data.decode())
    assert core.prepare(QueuedRecord("1-1", "D1", T0, b"plain")) == (
        "1-1", "D1", T0, None, None, None, "plain")


def test_a_schema_newer_than_this_fleetlog_is_refused() -> None:
    core.check_schema("db", 9, 9)
    with pytest.raises(StoreUnavailable, match="db has schema 10, newer than this fleetlog reads"):
        core.check_schema("db", 10, 9)


def test_a_step_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="step") as info:
        core.check_step(0)
    assert info.value.field == "step"


def test_search_text_holds_every_integer_as_written() -> None:
    """Read with orjson first, a 23-digit integer would be searched as 1.2345678901234568e+22."""
    from fleetlog.store.search import search_text

    assert search_text(b'{"id": 12345678901234567890123, "t": 1.5}') == \
        "id\x1f12345678901234567890123\x1ft\x1f1.5"
    assert search_text(b'{"n": ' + b"9" * 400 + b"}") == "n\x1f" + "9" * 400
    assert search_text(b"not JSON at all") == "not json at all"
