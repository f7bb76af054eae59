"""fleetlog.worker.runner.next_batch: bigger transactions only while the worker is behind."""

from __future__ import annotations

from fleetlog.records import QueuedRecord
from fleetlog.worker.runner import next_batch


def records(count: int, size: int = 100) -> list[QueuedRecord]:
    return [QueuedRecord(f"1-{n}", "d", 0, b"x" * size) for n in range(count)]


def test_a_full_read_doubles_the_next_up_to_eight_times_and_a_short_one_goes_back() -> None:
    batch, seen = 500, []
    for _ in range(6):  # behind: every read comes back full
        batch = next_batch(500, batch, records(batch), batch)
        seen.append(batch)
    assert seen == [1000, 2000, 4000, 4000, 4000, 4000]
    assert next_batch(500, 4000, records(3999), 4000) == 500  # caught up: back at once
    assert next_batch(500, 500, records(20), 500) == 500  # keeping up: as before


def test_big_records_stay_in_batches_of_the_setting() -> None:
    assert next_batch(500, 500, records(500, size=20_000), 500) == 500  # 10 MB already
    assert next_batch(500, 500, records(500, size=1_000), 500) == 1000
