"""fleetlog.worker.retention.Pruner on a real SQLite store and real daily files."""

from __future__ import annotations

import time
from pathlib import Path

from fleetlog.records import QueuedRecord
from fleetlog.store import LogQuery
from fleetlog.store.sqlite import SQLiteStore
from fleetlog.worker.retention import Pruner

DAY = 86_400_000


def test_age_retention_prunes_in_bounded_batches_then_waits(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([QueuedRecord(f"1-{n}", "D1", now - 3 * DAY, b"{}") for n in range(7)]
                      + [QueuedRecord("2-0", "D1", now, b"{}")])
    pruner = Pruner(store, None, retention_ms=DAY, max_bytes=None, batch=3, interval=3600)
    assert [pruner.step() for _ in range(4)] == [3, 3, 1, 0]  # then not due for an hour
    assert [r.qid for r in store.query(LogQuery("D1"))] == ["2-0"]
    store.write_batch([QueuedRecord("3-0", "D1", now - 3 * DAY, b"{}")])  # a late redelivery
    assert pruner.step() == 0, "caught up: the next look is an interval away"
    assert pruner.run_all() == 0, "the newest record (by seq) stays, however old"
    store.write_batch([QueuedRecord("4-0", "D1", now, b"{}")])
    assert pruner.run_all() == 1
    assert [r.qid for r in store.query(LogQuery("D1"))] == ["2-0", "4-0"]
    store.close()


def test_size_retention_and_disabled(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([QueuedRecord(f"1-{n}", "D1", now, b'{"pad": "%s"}' % (b"x" * 2000))
                       for n in range(200)])
    assert Pruner(store, None, retention_ms=None, max_bytes=None).step() == 0
    assert store.max_seq() == 200
    budget = store.used_bytes() // 2
    pruned = Pruner(store, None, retention_ms=None, max_bytes=budget, batch=10).run_all()
    assert 0 < pruned < 200
    assert store.used_bytes() <= budget
    assert [r.qid for r in store.query(LogQuery("D1", limit=1))] == ["1-199"], "newest kept"
    store.close()


def _indexed_store(path: Path, count: int, received_at: int) -> SQLiteStore:
    """A store of ``count`` records whose full-text index has caught up, as an idle worker leaves it."""
    store = SQLiteStore(path)
    for first in range(0, count, 1000):
        store.write_batch([
            QueuedRecord(f"{n}-0", "D1", received_at,
                         b'{"msg": "door %d opened by badge %d"}' % (n, n * 7919 % 100000))
            for n in range(first, min(first + 1000, count))])
    while store.upkeep(100_000):
        pass
    return store


def test_size_retention_keeps_what_fits_when_the_search_index_holds_deleted_records(tmp_path: Path) -> None:
    """Deleted records stay in the full-text index's pages until its segments merge:
    measured with them, the store looked over the cap until 1 record of 20,000 was
    left.  Half the bytes keep about half the records, and the newest."""
    store = _indexed_store(tmp_path / "fleetlog.db", 20_000, int(time.time() * 1000))
    cap = store.used_bytes() // 2
    pruned = Pruner(store, None, retention_ms=None, max_bytes=cap).run_all()
    assert store.used_bytes() <= cap
    assert 7_000 <= pruned <= 13_000, pruned
    kept = store.query(LogQuery("D1", limit=1))
    assert [r.qid for r in kept] == ["19999-0"], "newest kept"
    found = store.query(LogQuery("D1", grep="door 19998 ", limit=5))
    assert [r.qid for r in found] == ["19998-0"], "still searchable"
    store.close()


def test_one_prune_applies_both_age_and_size(tmp_path: Path) -> None:
    """``--retention`` and ``--retention-bytes`` together: one run leaves the store under the
    cap with nothing past the age (the size pass once ran only if the age pass deleted nothing)."""
    now = int(time.time() * 1000)
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([QueuedRecord(f"old-{n}", "D1", now - 3 * DAY, b'{"pad": "%s"}' % (b"x" * 500))
                       for n in range(300)])
    store.write_batch([QueuedRecord(f"new-{n}", "D1", now, b'{"pad": "%s"}' % (b"x" * 500))
                       for n in range(2000)])
    cap = store.used_bytes() // 4
    pruned = Pruner(store, None, retention_ms=DAY, max_bytes=cap, batch=5000).run_all()
    assert store.used_bytes() <= cap
    assert 300 < pruned < 2300
    oldest = store.query(LogQuery("D1", limit=100_000))[-1]
    assert oldest.qid.startswith("new-"), "every record past the age went"
    assert [r.qid for r in store.query(LogQuery("D1", limit=1))] == ["new-1999"]
    store.close()
