"""fleetlog.timeparse.parse_time: what users type after --since and --until."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetlog.timeparse import parse_time

NOW = int(datetime(2026, 11, 26, 10, 0, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "ago_ms"),
    [
        ("250ms", 250),
        ("90s", 90_000),
        ("15m", 15 * 60_000),
        ("1h", 3_600_000),
        ("1.5h", 5_400_000),
        ("2d", 2 * 86_400_000),
        ("1w", 7 * 86_400_000),
        ("0s", 0),
        (" 10 m ", 600_000),
    ],
)
def test_durations_are_before_now(text: str, ago_ms: int) -> None:
    assert parse_time(text, NOW) == NOW - ago_ms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T10:00:00Z", NOW),
        ("2026-11-26T10:00Z", NOW),
        ("2026-11-26T10:00:00+00:00", NOW),
        ("2026-11-26T12:00:00+02:00", NOW),
        ("2026-11-26T01:00:00-09:00", NOW),
        ("2026-11-26T10:00:00.123Z", NOW + 123),
        ("2026-11-26T10:00:00.999Z", NOW + 999),
        # Without a zone: UTC.
        ("2026-11-26T10:00:00", NOW),
        ("2026-11-26 10:00", NOW),
        ("2026-11-26", NOW - 10 * 3_600_000),
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_iso_times(text: str, expected: int) -> None:
    assert parse_time(text, NOW) == expected


def test_iso_times_do_not_depend_on_now() -> None:
    assert parse_time("2026-11-26T10:00Z", 0) == parse_time("2026-11-26T10:00Z", NOW)


@pytest.mark.parametrize(
    "text", ["", "   ", "garbage", "1x", "h", "-1h", "1 hour", "2026-13-01", "2026-11-26T25:00", "1h30m"]
)
def test_garbage_is_a_value_error_naming_the_input(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration") as info:
        parse_time(text, NOW)
    assert repr(text) in str(info.value)
