"""The daily files catch up with the store once traffic stops, on SQLite and PostgreSQL.

The export after a batch takes only what is final: on PostgreSQL, what lies
below the oldest open write transaction (:mod:`fleetlog.store.postgres`).  A
batch committed while another worker's transaction is open is left for a later
export, and once traffic stops no batch comes to run one; a quiet worker's
upkeep exports instead (:meth:`fleetlog.worker.runner.Worker._catch_up_files`),
and so does a worker started on an empty queue.  Real Redis, real stores; the
fleet with two workers is in ``tests/faults/test_files_catch_up.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from fleetlog.config import Settings
from fleetlog.queue.consumer import StreamConsumer
from fleetlog.records import QueuedRecord
from fleetlog.store import Store, open_store
from fleetlog.store.files import FilesSink
from fleetlog.store.postgres import PostgresStore
from fleetlog.worker.runner import Worker
from tests.helpers import run_fleetlog, wait_until

STREAM, GROUP, DEAD = "fleetlog:records", "fleetlog:workers", "fleetlog:dead"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def _filed(files: Path) -> Counter[int]:
    """The ``seq`` of the data of every line of the daily files, with how often each is there."""
    seqs: Counter[int] = Counter()
    for path in sorted((files / "device" / "log").glob("*.log")):
        for raw in path.read_bytes().splitlines():
            seqs[json.loads(raw)["data"]["seq"]] += 1
    return seqs


def _stored(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM records").fetchone()
    return int(row[0]) if row is not None else 0


def test_a_batch_held_back_by_another_write_transaction_is_filed_once_it_ends(
    client: redis.Redis, pg_url: str, tmp_path: Path
) -> None:
    """The horizon case: the batch is committed and acked, the files wait; no batch follows."""
    store = PostgresStore(pg_url)
    consumer = StreamConsumer(client, stream=STREAM, group=GROUP, consumer="t",
                              dead_letter_stream=DEAD, claim_idle=60)
    consumer.ensure_group()
    worker = Worker(Settings(data_dir=tmp_path, block_ms=200), consumer, store,
                    FilesSink(tmp_path / "logs"))
    # Another worker's write transaction (its index step, say): an id drawn, not committed.
    other = psycopg.connect(pg_url)
    other.execute("SELECT pg_current_xact_id()")
    for seq in range(10):
        client.xadd(STREAM, {"d": "d1", "r": json.dumps({"seq": seq})})
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert wait_until(lambda: _stored(pg_url) == 10
                          and client.xpending(STREAM, GROUP)["pending"] == 0, 20), "stored, acked"
        time.sleep(1.5)  # quiet exports run meanwhile: nothing is final above the open transaction
        assert _filed(tmp_path / "logs") == Counter(), "held back while the transaction is open"
        other.rollback()
        ended = time.monotonic()
        assert wait_until(lambda: len(_filed(tmp_path / "logs")) == 10, 10, interval=0.05), \
            "filed within 10 s of the transaction's end, with no further traffic"
        caught_up = time.monotonic() - ended
        time.sleep(1.0)  # more quiet exports: nothing twice
        assert _filed(tmp_path / "logs") == Counter(range(10))
        assert caught_up < 10
    finally:
        worker.stopping.set()
        thread.join(10)
        other.close()
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_started_on_an_empty_queue_catches_the_files_up(
    backend: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Records acked and stored but never filed (the workers stopped first) reach the files
    when a worker starts, though no record ever comes."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = (request.getfixturevalue("pg_url") if backend == "postgresql"
           else f"sqlite:///{data_dir / 'fleetlog.db'}")
    store: Store = open_store(url)
    try:
        now = int(time.time() * 1000)
        for batch in range(3):
            store.write_batch([QueuedRecord(f"{now}-{batch * 10 + n}", "d1", now,
                                            json.dumps({"seq": batch * 10 + n}).encode())
                               for n in range(10)])
    finally:
        store.close()
    files = tmp_path / "logs"
    started = time.monotonic()
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(data_dir),
                        "--store", url, "--files", str(files), "--max-runtime", "3")
    assert done.returncode == 0, done.stderr
    assert _filed(files) == Counter(range(30)), f"after {time.monotonic() - started:.1f} s"
