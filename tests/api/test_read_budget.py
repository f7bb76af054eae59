"""How a live tail or an export sizes its store reads: bytes, not records (no processes)."""

from __future__ import annotations

from fleetlog.api.guard import ReadBudget, drain, record_bytes
from fleetlog.records import StoredRecord

MiB = 1024 * 1024


def record(seq: int, size: int) -> StoredRecord:
    return StoredRecord(seq, f"q-{seq}", "d", 1_000 + seq, None, None, None, "x" * size)


def test_the_first_read_takes_what_fits_records_of_the_largest_frame() -> None:
    assert ReadBudget(4 * MiB, 1 * MiB).limit == 4
    assert ReadBudget(4 * MiB, 64).limit == 1000  # at most FOLLOW_BATCH
    assert ReadBudget(4 * MiB, 64 * MiB).limit == 1  # at least one


def test_reads_grow_fourfold_while_records_are_small_and_shrink_at_once_when_they_grow() -> None:
    budget = ReadBudget(4 * MiB, 1 * MiB)
    limits = []
    for _ in range(6):
        records = [record(n, 100) for n in range(budget.limit)]
        assert budget.keep(records)
        limits.append(budget.limit)
    assert limits == [16, 64, 256, 1000, 1000, 1000]
    big = [record(n, 200_000) for n in range(5)]
    assert budget.keep(big) and len(big) == 5
    assert budget.limit == 4 * MiB // record_bytes(big[0])  # 20


def test_what_a_read_brings_past_the_budget_is_let_go() -> None:
    budget = ReadBudget(4 * MiB, 1_000)
    records = [record(n, 200_000) for n in range(1000)]  # 200 MB at once: sizes jumped
    assert not budget.keep(records)
    assert sum(map(record_bytes, records)) <= 4 * MiB
    assert [r.seq for r in records] == list(range(len(records))) and len(records) == 20
    one = [record(0, 10 * MiB)]
    assert budget.keep(one) and len(one) == 1  # one record always goes, whatever its size
    assert budget.limit == 1


def test_drain_yields_in_order_and_lets_go() -> None:
    records = [record(n, 10) for n in range(5)]
    taken = drain(records)
    assert next(taken).seq == 0
    assert len(records) == 4
    assert [r.seq for r in taken] == [1, 2, 3, 4] and records == []
