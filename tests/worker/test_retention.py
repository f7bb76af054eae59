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
