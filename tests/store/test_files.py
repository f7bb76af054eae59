"""fleetlog.store.files.FilesSink: daily JSON-lines files, each record exactly once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlog.exactjson import dumps as encode_json
from fleetlog.exactjson import loads as decode_json
from fleetlog.records import QueuedRecord
from fleetlog.store.base import LogQuery
from fleetlog.store.files import FilesSink, format_line
from fleetlog.store.sqlite import SQLiteStore

DAY1_LATE = 1_795_737_599_999  # 2026-11-26T23:59:59.999Z
DAY2_EARLY = 1_795_737_600_000  # 2026-11-27T00:00:00.000Z
DAY1, DAY2 = "2026-11-26", "2026-11-27"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "fleetlog.db")
    yield opened
    opened.close()


@pytest.fixture
def sink(tmp_path: Path) -> FilesSink:
    return FilesSink(tmp_path / "logs")


def write(store: SQLiteStore, qid: str, received_at: int, data: Any, device: str = "D1") -> None:
    raw = data if isinstance(data, bytes) else encode_json(data)
    assert store.write_batch([QueuedRecord(qid, device, received_at, raw)]) == 1


def lines(sink: FilesSink, day: str) -> list[dict[str, Any]]:
    raw = (sink.directory / f"{day}.log").read_bytes()
    assert raw.endswith(b"\n"), "every line is complete"
    return [decode_json(line) for line in raw.splitlines()]


def seqs(sink: FilesSink, day: str) -> list[int]:
    return [line["seq"] for line in lines(sink, day)]


def test_one_line_per_record_in_the_file_of_its_utc_day(
    store: SQLiteStore, sink: FilesSink, tmp_path: Path
) -> None:
    write(store, "1-0", DAY1_LATE - 5000, {"msg": "门已打开", "n": 123456789012345678901234567890})
    write(store, "1-1", DAY1_LATE, "plain text", device="D2")
    write(store, "1-2", DAY2_EARLY, [1, {"a": None}])
    write(store, "1-3", DAY2_EARLY + 1, 0)

    assert sink.export(store) == 4
    assert sink.directory == tmp_path / "logs" / "device" / "log"
    assert sorted(path.name for path in sink.directory.glob("*.log")) == [f"{DAY1}.log", f"{DAY2}.log"]

    day1, day2 = lines(sink, DAY1), lines(sink, DAY2)
    assert [(line["device_id"], line["received_at"]) for line in day1] == [
        ("D1", "2026-11-26T23:59:54.999Z"),
        ("D2", "2026-11-26T23:59:59.999Z"),
    ]
    assert [(line["device_id"], line["received_at"]) for line in day2] == [
        ("D1", "2026-11-27T00:00:00.000Z"),
        ("D1", "2026-11-27T00:00:00.001Z"),
    ]
    stored = {row.seq: row.data for device in ("D1", "D2") for row in store.query(LogQuery(device))}
    for line in day1 + day2:
        assert line["data"] == decode_json(stored[line["seq"]].encode())
    # The stored JSON is spliced in as is: a long integer and Unicode survive byte for byte.
    raw_day1 = (sink.directory / f"{DAY1}.log").read_bytes()
    assert '"data":{"msg":"门已打开","n":123456789012345678901234567890}}\n'.encode() in raw_day1


def test_exporting_again_writes_nothing_new(store: SQLiteStore, sink: FilesSink) -> None:
    for n in range(5):
        write(store, f"1-{n}", DAY1_LATE - n, {"n": n})
    assert sink.export(store) == 5
    before = (sink.directory / f"{DAY1}.log").read_bytes()
    assert sink.export(store) == 0
    assert (sink.directory / f"{DAY1}.log").read_bytes() == before

    write(store, "2-0", DAY2_EARLY, {"n": 5})
    write(store, "2-1", DAY1_LATE, {"n": 6})
    assert sink.export(store) == 2
    assert seqs(sink, DAY1) == [1, 2, 3, 4, 5, 7]
    assert seqs(sink, DAY2) == [6]


def test_a_limited_export_goes_on_from_its_cursor(store: SQLiteStore, sink: FilesSink) -> None:
    """A quiet worker's step: at most ``limit`` records a call, the next call from there."""
    write(store, "1-0", DAY1_LATE, {"n": 0})
    assert sink.export(store) == 1  # a cursor of this store: the usual path
    for n in range(1, 8):
        write(store, f"1-{n}", DAY1_LATE if n % 2 else DAY2_EARLY, {"n": n})
    assert [sink.export(store, limit=3) for _ in range(4)] == [3, 3, 1, 0]
    assert seqs(sink, DAY1) == [1, 2, 4, 6, 8]
    assert seqs(sink, DAY2) == [3, 5, 7]
    with pytest.raises(ValueError, match="limit"):
        sink.export(store, limit=0)


def test_a_resync_is_never_cut_short_by_a_limit(store: SQLiteStore, sink: FilesSink) -> None:
    """Only a finished resync leaves a cursor the usual path may go on from."""
    for n in range(6):
        write(store, f"1-{n}", DAY1_LATE, {"n": n})
    assert sink.export(store, limit=2) == 6  # no cursor yet: a resync, to the end
    assert sink.export(store, limit=2) == 0
    assert seqs(sink, DAY1) == [1, 2, 3, 4, 5, 6]


def test_a_lost_cursor_costs_no_duplicates(store: SQLiteStore, sink: FilesSink) -> None:
    for n in range(6):
        write(store, f"1-{n}", DAY1_LATE if n % 2 else DAY2_EARLY, {"n": n})
    assert sink.export(store) == 6
    cursor = sink.directory / ".cursor"
    assert decode_json(cursor.read_bytes()) == {"store": store.store_id, "seq": 6, "qid": "1-5"}
    cursor.unlink()
    assert sink.export(store) == 0
    assert seqs(sink, DAY1) == [2, 4, 6]
    assert seqs(sink, DAY2) == [1, 3, 5]

    cursor.unlink()
    write(store, "2-0", DAY2_EARLY, {"n": 6})
    assert sink.export(store) == 1
    assert seqs(sink, DAY2) == [1, 3, 5, 7]


def test_a_stale_cursor_costs_no_duplicates(store: SQLiteStore, sink: FilesSink) -> None:
    for n in range(4):
        write(store, f"1-{n}", DAY1_LATE, {"n": n})
    sink.export(store)
    (sink.directory / ".cursor").write_text("1")
    assert sink.export(store) == 0
    assert seqs(sink, DAY1) == [1, 2, 3, 4]


def torn(store: SQLiteStore, seq: int) -> bytes:
    """The first half of the line a crash left behind mid-append."""
    (row,) = store.after(seq - 1, 1)
    line = format_line(row)
    return line[: len(line) // 2]


def test_a_torn_last_line_is_cut_and_exported_again_exactly_once(
    store: SQLiteStore, sink: FilesSink
) -> None:
    write(store, "1-0", DAY1_LATE, {"n": 0})
    write(store, "1-1", DAY1_LATE, {"n": 1})
    assert sink.export(store) == 2
    # A crash in the middle of appending record 3: half a line, no newline, cursor still at 2.
    write(store, "1-2", DAY1_LATE, {"n": 2, "msg": "设备离线" * 20})
    with (sink.directory / f"{DAY1}.log").open("ab") as handle:
        handle.write(torn(store, 3))

    assert sink.export(store) == 1
    assert seqs(sink, DAY1) == [1, 2, 3]
    assert lines(sink, DAY1)[-1]["data"] == {"n": 2, "msg": "设备离线" * 20}
    assert sink.export(store) == 0
    assert seqs(sink, DAY1) == [1, 2, 3]


def test_a_torn_line_alone_in_a_file_without_a_cursor(store: SQLiteStore, sink: FilesSink) -> None:
    write(store, "1-0", DAY1_LATE, {"n": 0})
    write(store, "1-1", DAY2_EARLY, {"n": 1})
    (sink.directory / f"{DAY2}.log").write_bytes(torn(store, 2))
    (sink.directory / f"{DAY1}.log").write_bytes(format_line(store.after(0, 1)[0]))

    assert sink.export(store) == 1
    assert seqs(sink, DAY1) == [1]
    assert seqs(sink, DAY2) == [2]


def test_a_torn_line_after_a_long_line_keeps_every_complete_line(
    store: SQLiteStore, sink: FilesSink
) -> None:
    write(store, "1-0", DAY1_LATE, {"n": 0})
    write(store, "1-1", DAY1_LATE, {"n": 1, "blob": "x" * 20_000})  # longer than the tail block
    assert sink.export(store) == 2
    write(store, "1-2", DAY1_LATE, {"n": 2, "blob": "y" * 20_000})
    with (sink.directory / f"{DAY1}.log").open("ab") as handle:
        handle.write(torn(store, 3))
    (sink.directory / ".cursor").unlink()

    assert sink.export(store) == 1
    assert seqs(sink, DAY1) == [1, 2, 3]


def test_export_from_another_sink_on_the_same_directory(store: SQLiteStore, tmp_path: Path) -> None:
    first, second = FilesSink(tmp_path / "logs"), FilesSink(tmp_path / "logs")
    write(store, "1-0", DAY1_LATE, {"n": 0})
    assert first.export(store) == 1
    write(store, "1-1", DAY1_LATE, {"n": 1})
    assert second.export(store) == 1
    assert first.export(store) == 0
    assert seqs(first, DAY1) == [1, 2]


def test_a_record_with_newline_whitespace_stays_on_one_line(store: SQLiteStore, sink: FilesSink) -> None:
    write(store, "1-0", DAY1_LATE, b'{\n  "deviceId": "D1",\n  "n": 0\n}')
    assert sink.export(store) == 1
    assert [line["data"] for line in lines(sink, DAY1)] == [{"deviceId": "D1", "n": 0}]
    write(store, "1-1", DAY1_LATE, {"n": 1})
    assert sink.export(store) == 1


def test_file_lines_and_logs_json_share_one_serializer() -> None:
    """A daily-file line is ``fleetlog logs --json``'s line minus the extracted columns, plus qid."""
    from fleetlog.records import StoredRecord
    from fleetlog.view import record_line

    record = StoredRecord(7, "1-0", "门\u2028禁", 0, 1000, "info", "m\u2029", '{\n "msg": "m\u2029"\n}')
    line = format_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line.decode().splitlines()) == 1, "U+2028/2029 escaped: one line for every reader"
    as_file, as_logs = json.loads(line), json.loads(record_line(record))
    assert as_file == {"seq": 7, "qid": "1-0", "device_id": "门\u2028禁",
                       "received_at": "1970-01-01T00:00:00.000Z", "data": {"msg": "m\u2029"}}
    assert {k: v for k, v in as_logs.items() if k not in ("ts", "level", "message")} == \
        {k: v for k, v in as_file.items() if k != "qid"}


def test_a_file_line_is_record_line_of_the_columns() -> None:
    """The daily files' formatter (from a row's columns) writes byte for byte what record_line does."""
    from fleetlog.records import StoredRecord
    from fleetlog.view import file_line, record_line

    for record in [StoredRecord(7, "1-0", "门\u2028禁", 0, 1000, "info", "m", '{\n "msg": "m\u2029"\n}'),
                   StoredRecord(1, "17-0.3", 'd"\\\x00', -5, None, None, None, '[1,\r\n 2]'),
                   StoredRecord(2, "q\u0085", "door-1", 1_795_737_599_999, None, None, None,
                                '"text \u2028 with a separator"'),
                   StoredRecord(3, "9-9", "plain", 1, None, None, None, '{"msg":"ascii"}')]:
        assert file_line(record.seq, record.qid, record.device_id, record.received_at,
                         record.data) == record_line(record, fields=False, qid=True)


def _batch(store: SQLiteStore, qids: list[str], at: int = DAY1_LATE - 60_000) -> None:
    store.write_batch([QueuedRecord(qid, f"D{n % 3}", at + n, encode_json({"n": qid}))
                       for n, qid in enumerate(qids)])


def test_a_batch_goes_to_the_files_from_what_was_written_as_the_store_has_it(tmp_path: Path) -> None:
    """Exported with what the batch appended or read back from the store: the same bytes."""
    fast_store, slow_store = SQLiteStore(tmp_path / "a.db"), SQLiteStore(tmp_path / "b.db")
    fast, slow = FilesSink(tmp_path / "fast"), FilesSink(tmp_path / "slow")
    try:
        for batch in (["1-0", "1-1", "1-2"], ["2-0"], ["3-0", "3-1"]):
            _batch(fast_store, batch)
            _batch(slow_store, batch)
            appended = fast_store.appended
            assert appended is not None and [row[0] for row in appended.rows] == batch
            assert fast.export(fast_store, appended=appended) == len(batch)
            assert slow.export(slow_store) == len(batch)
        assert (fast.directory / f"{DAY1}.log").read_bytes() == (slow.directory / f"{DAY1}.log").read_bytes()
        assert seqs(fast, DAY1) == list(range(1, 7))
        assert fast.export(fast_store) == 0, "the cursor moved as a read-back export moves it"
    finally:
        fast_store.close()
        slow_store.close()


def test_what_a_batch_appended_is_used_only_where_the_files_stop(
        store: SQLiteStore, sink: FilesSink) -> None:
    """A batch not exported, a batch with a stored record, a stale description: all read back."""
    _batch(store, ["1-0", "1-1"])
    assert sink.export(store, appended=store.appended) == 2
    _batch(store, ["2-0", "2-1"])  # written, not exported (a crash before the export)
    _batch(store, ["3-0"])
    behind = store.appended
    assert behind is not None and behind.after == 4
    assert sink.export(store, appended=behind) == 3, "the files stop at 2: read back from there"
    assert seqs(sink, DAY1) == [1, 2, 3, 4, 5]
    assert sink.export(store, appended=behind) == 0, "a stale description writes nothing twice"
    store.write_batch([QueuedRecord("3-0", "D0", DAY1_LATE, encode_json({"n": "3-0"})),
                       QueuedRecord("4-0", "D0", DAY1_LATE, encode_json({"n": "4-0"}))])
    assert store.appended is None, "a batch that held a stored record appends what is not known"
    assert sink.export(store, appended=store.appended) == 1
    assert seqs(sink, DAY1) == [1, 2, 3, 4, 5, 6]
    assert [line["qid"] for line in lines(sink, DAY1)] == ["1-0", "1-1", "2-0", "2-1", "3-0", "4-0"]


def test_a_new_store_into_files_that_hold_another_stores_lines_is_matched_by_qid(
        tmp_path: Path, sink: FilesSink) -> None:
    """Without a cursor but with day files (another store's), the first batch is a resync."""
    old = SQLiteStore(tmp_path / "old.db")
    _batch(old, ["1-0", "1-1"])
    assert sink.export(old, appended=old.appended) == 2
    old.close()
    (sink.directory / ".cursor").unlink()
    new = SQLiteStore(tmp_path / "new.db")
    try:
        _batch(new, ["1-1", "2-0"])  # one record both stores kept (a batch written again)
        assert new.appended is not None and new.appended.after == 0
        assert sink.export(new, appended=new.appended) == 1, "1-1 is in the files already"
        assert [line["qid"] for line in lines(sink, DAY1)] == ["1-0", "1-1", "2-0"]
    finally:
        new.close()


@pytest.mark.parametrize(("data", "written"), [
    (b"first line\nsecond line", "first line\nsecond line"),  # list mode: a script's plain text
    (b"door 3 opened", "door 3 opened"),
    (b"123 apples", "123 apples"),
    (b"[1, 2]", [1, 2]),
    (b"12345678901234567890123", 12345678901234567890123),
])
def test_data_kept_as_text_is_a_json_string_in_the_files(
        store: SQLiteStore, sink: FilesSink, data: bytes, written: Any) -> None:
    """The store keeps data that does not look like JSON as text; every file line is still
    one JSON object, and the next export (a resync included) reads it back."""
    write(store, "1-0", DAY1_LATE, data)
    assert sink.export(store) == 1
    assert [line["data"] for line in lines(sink, DAY1)] == [written]
    (sink.directory / ".cursor").unlink()
    write(store, "1-1", DAY1_LATE, {"n": 1})
    assert sink.export(store) == 1
    assert seqs(sink, DAY1) == [1, 2]


def test_lines_that_are_not_records_are_passed_over(store: SQLiteStore, sink: FilesSink) -> None:
    """An operator's note appended to a day file, the cursor lost: the export goes on where
    the file's records stop, nothing written twice, nothing missed."""
    for n in range(3):
        write(store, f"1-{n}", DAY1_LATE, {"n": n})
    assert sink.export(store) == 3
    day_file = sink.directory / f"{DAY1}.log"
    with day_file.open("ab") as handle:
        handle.write(b"-- checked by ops, 26 Nov --\n" + b'{"note": "no seq"}\n' * 300)
    (sink.directory / ".cursor").unlink()
    for n in range(3, 5):
        write(store, f"1-{n}", DAY1_LATE, {"n": n})
    assert sink.export(store) == 2
    records = [raw for raw in day_file.read_bytes().splitlines() if raw.startswith(b'{"seq"')]
    assert [json.loads(raw)["seq"] for raw in records] == [1, 2, 3, 4, 5]
    # A store restored from a backup: matched by qid, the notes skipped there too.
    (sink.directory / ".cursor").write_text('{"store": "another", "seq": 9, "qid": "x"}')
    assert sink.export(store) == 0
