"""The preview's child process: a condition's answer, or its stop past its time or memory."""

from __future__ import annotations

import time

import orjson
import pytest

from fleetlog.alerts.engine import preview
from fleetlog.alerts.sandbox import preview_in_child
from fleetlog.errors import ConditionTooCostly
from fleetlog.records import StoredRecord


def stored(n: int, device: str = "door-1", **data: object) -> StoredRecord:
    return StoredRecord(n, f"1-{n}", device, 1_000 + n, None, "info", str(data.get("msg", "")),
                        orjson.dumps(data).decode())


def test_the_child_answers_as_the_preview_does() -> None:
    records = [stored(n, "door-1" if n % 2 else "kiosk-1", temp=n * 10, msg=f"m {n}") for n in range(20)]
    when = "data.temp > 50 && message != 'm 9'"
    here = preview(when, "door-*", records)
    there = preview_in_child(when, "door-*", records, seconds=30)
    assert there == here and [r.seq for r in there.matched] == [7, 11, 13, 15, 17, 19]
    failing = preview_in_child("data.nope > 1", "*", records, seconds=30)
    assert (failing.checked, failing.matched, failing.errors) == (20, [], 20)
    assert failing.first_error


def test_a_condition_past_its_time_is_killed() -> None:
    records = [stored(0, a=list(range(30_000)))]  # ~20 s of `x in data.a` for every x
    started = time.monotonic()
    with pytest.raises(ConditionTooCostly, match="longer than 1 s on the 1 newest records") as refused:
        preview_in_child("data.a.all(x, x in data.a)", "*", records, seconds=1)
    assert time.monotonic() - started < 5
    assert refused.value.field == "when"


def test_a_condition_past_its_memory_is_stopped() -> None:
    # Each element of the map is 8 MiB: 100 of them are 800 MiB, past a limit of 256.
    when = "data.a.map(x, data.s + data.s).size() > 0"
    big = [stored(0, s="x" * (4 * 1024 * 1024), a=list(range(100)))]
    with pytest.raises(ConditionTooCostly, match="more than 256 MiB"):
        preview_in_child(when, "*", big, seconds=30, memory=256 * 1024 * 1024)
    # With the default limit (1 GiB), 10 elements are within it.
    small = [stored(0, s="x" * (4 * 1024 * 1024), a=list(range(10)))]
    assert preview_in_child(when, "*", small, seconds=30).matched == small
