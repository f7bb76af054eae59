"""fleetlog.store.fields.extract: a record's own time, level and message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fleetlog.store.fields import LEVELS, Fields, extract, normalise_level

#: 2026-11-26T10:00:00Z
T0_S = int(datetime(2026, 11, 26, 10, 0, tzinfo=UTC).timestamp())
T0_MS = T0_S * 1000


@pytest.mark.parametrize("key", ["ts", "time", "timestamp"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (T0_S, T0_MS),  # seconds
        (T0_MS, T0_MS),  # milliseconds
        (T0_S + 0.25, T0_MS + 250),  # fractional seconds
        (1_700_000_000.123, 1_700_000_000_123),
        ("2026-11-26T10:00:00Z", T0_MS),
        ("2026-11-26T10:00:00.123Z", T0_MS + 123),
        ("2026-11-26T12:00:00+02:00", T0_MS),
        ("2026-11-26T05:30:00-04:30", T0_MS),
    ],
)
def test_time_in_seconds_milliseconds_or_zoned_iso(key: str, value: Any, expected: int) -> None:
    assert extract({key: value}).ts == expected


@pytest.mark.parametrize(
    "value",
    ["2026-11-26T10:00:00", "2026-11-26", "yesterday", "", True, False, None, [T0_S], {"s": T0_S}, 1e20],
)
def test_naive_iso_and_other_values_give_no_time(value: Any) -> None:
    assert extract({"ts": value}).ts is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (99_999_999_999, 99_999_999_999_000),  # the largest count of seconds: x1000
        (100_000_000_000, 100_000_000_000),  # the smallest count of milliseconds: as it is
        (10**15 - 1, 10**15 - 1),  # the largest time kept
        (10**15, None),  # beyond: no time
        (-(10**12), -(10**12)),  # milliseconds before 1970 (the general rule, not the fast path)
        (-(10**15), None),
        (2**70, None),
    ],
)
def test_the_bounds_of_integer_times(value: int, expected: int | None) -> None:
    """The usual ``ts`` (integer ms) takes a fast path; its bounds are the general rule's."""
    assert extract({"ts": value}).ts == expected
    assert extract({"time": value}).ts == expected  # the general path, through _first


def test_time_key_priority_is_ts_then_time_then_timestamp() -> None:
    record = {"timestamp": T0_S + 2, "time": T0_S + 1, "ts": T0_S}
    assert extract(record).ts == T0_MS
    assert extract({"timestamp": T0_S + 2, "time": T0_S + 1}).ts == T0_MS + 1000


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("info", "info"),
        ("INFO", "info"),
        (" Error ", "error"),
        ("warning", "warn"),
        ("WARN", "warn"),
        ("err", "error"),
        ("critical", "fatal"),
        ("CRIT", "fatal"),
        ("trace", "trace"),
        ("notice", "notice"),  # unknown levels are kept, lower-cased
    ],
)
def test_level_is_normalised(level: str, expected: str) -> None:
    assert extract({"level": level}).level == expected
    assert normalise_level(level) == expected


def test_levels_are_ordered_by_severity() -> None:
    assert LEVELS == ("trace", "debug", "info", "warn", "error", "fatal")


@pytest.mark.parametrize("level", [3, None, ["info"], True])
def test_non_string_level_is_ignored(level: Any) -> None:
    assert extract({"level": level}).level is None


def test_msg_or_message() -> None:
    assert extract({"msg": "door open"}).message == "door open"
    assert extract({"message": "门已打开"}).message == "门已打开"
    assert extract({"msg": "first", "message": "second"}).message == "first"
    assert extract({"msg": {"nested": 1}}).message is None


def test_all_fields_together() -> None:
    record = {"ts": "2026-11-26T10:00:00Z", "level": "Warning", "msg": "battery low", "pct": 9}
    assert extract(record) == Fields(T0_MS, "warn", "battery low")


def test_object_without_known_fields() -> None:
    assert extract({"a": 1}) == Fields(None, None, None)
    assert extract({}) == Fields(None, None, None)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("plain text line", Fields(None, None, "plain text line")),
        (42, Fields(None, None, None)),
        (1.5, Fields(None, None, None)),
        ([{"ts": T0_S, "level": "info"}], Fields(None, None, None)),
        (None, Fields(None, None, None)),
        (True, Fields(None, None, None)),
    ],
)
def test_records_that_are_not_objects(record: Any, expected: Fields) -> None:
    assert extract(record) == expected
