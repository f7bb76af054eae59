"""How the worker meets each kind of trouble, against a real Redis and real SQLite files.

A record the store rejects, a store that is unavailable (on reads too), a bug,
Redis out of memory at start, and the store file removed or replaced under a
running worker.  Where a test needs a failure no real input produces (a bug, a
file removed at the worst moment), a test-only subclass of the real
:class:`SQLiteStore` injects it; the worker, the thing under test, is real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from fleetlog import keys
from fleetlog.config import Settings
from fleetlog.embedded import RedisServer
from fleetlog.queue.consumer import ListConsumer, StreamConsumer
from fleetlog.records import QueuedRecord
from fleetlog.store import RecordRejected
from fleetlog.store.files import FilesSink
from fleetlog.store.sqlite import SQLiteStore
from fleetlog.worker.runner import Worker
from tests.conftest import Processes
from tests.helpers import file_lines, legacy_device, produce, queued, run_fleetlog, stored_rows, wait_until

STREAM, GROUP, DEAD = "fleetlog:records", "fleetlog:workers", "fleetlog:dead"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def _xadd(client: redis.Redis, count: int, device: str = "d1", start: int = 0, pad: int = 100
          ) -> None:
    with client.pipeline(transaction=False) as pipe:
        for seq in range(start, start + count):
            pipe.xadd(STREAM, {"d": device, "r": json.dumps({"seq": seq, "msg": "x" * pad})})
        pipe.execute()


def _worker(client: redis.Redis, store: SQLiteStore, tmp_path: Path, *, files: bool = False,
            **settings: object) -> Worker:
    consumer = StreamConsumer(client, stream=STREAM, group=GROUP, consumer="t",
                              dead_letter_stream=DEAD, claim_idle=0.2)
    consumer.ensure_group()
    sink = FilesSink(tmp_path / "logs") if files else None
    return Worker(Settings(data_dir=tmp_path, block_ms=50, **settings), consumer, store, sink)


def _pending(client: redis.Redis) -> int:
    pending: int = client.xpending(STREAM, GROUP)["pending"]
    return pending


# -- a bug, a rejected record, an unavailable store -------------------------------


class BuggyStore(SQLiteStore):
    """The real store with a bug in its write path (a TypeError, as a code error would raise)."""

    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")


def test_a_bug_stops_the_worker_and_acks_or_dead_letters_nothing(
    client: redis.Redis, tmp_path: Path
) -> None:
    _xadd(client, 20)
    store = BuggyStore(tmp_path / "fleetlog.db")
    worker = _worker(client, store, tmp_path, max_deliveries=1, max_runtime=3)
    with pytest.raises(TypeError):
        worker.run()
    store.close()
    assert client.xlen(DEAD) == 0, "good records are not dead-lettered because of a bug"
    assert _pending(client) == 20, "nothing acknowledged"
    assert stored_rows(tmp_path) == []


def test_rejected_records_are_dead_lettered_after_n_deliveries_the_rest_stored(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    _xadd(client, 10)
    client.xadd(STREAM, {"d": "bad", "r": b'{"seq": 1, broken'})
    client.xadd(STREAM, {"d": "bad", "r": b'\xff\xfe not UTF-8'})
    _xadd(client, 10, start=10)
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                        "--max-deliveries", "2", "--claim-idle", "0.3", "--max-runtime", "4")
    assert done.returncode == 0, done.stderr
    assert sorted(seq for _, _, seq, _ in stored_rows(tmp_path)) == list(range(20))
    dead = client.xrange(DEAD)
    assert sorted(fields[b"r"] for _, fields in dead) == [b'{"seq": 1, broken', b'\xff\xfe not UTF-8']
    assert {fields[b"error"].split(b":")[0] for _, fields in dead} == {
        b"JSONDecodeError", b"UnicodeDecodeError"}
    assert all(int(fields[b"deliveries"]) >= 2 for _, fields in dead)
    assert _pending(client) == 0


def _corrupt(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        for offset in range(4096 * 2, size, 4096):
            handle.seek(offset)
            handle.write(b"\xde\xad\xbe\xef" * 8)


def test_store_read_errors_in_upkeep_postpone_it_and_ack_nothing(
    client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store whose reads fail (a malformed file) is unavailable: the worker stays
    up, retries and acknowledges nothing; before, the read in upkeep killed it."""
    store = SQLiteStore(tmp_path / "fleetlog.db")
    store.write_batch([QueuedRecord(f"1-{n}", "d0", 1, b'{"pad": "%s"}' % (b"x" * 200))
                       for n in range(2000)])
    store.close()
    _corrupt(tmp_path / "fleetlog.db")
    _xadd(client, 10)
    store = SQLiteStore(tmp_path / "fleetlog.db")
    worker = _worker(client, store, tmp_path, max_runtime=2)
    assert worker.run() == 0
    store.close()
    assert "store unavailable, not acknowledging 10 records" in caplog.text
    assert "malformed" in caplog.text
    assert _pending(client) == 10
    assert client.xlen(DEAD) == 0


def test_a_locked_store_is_retried_and_nothing_acked_until_it_frees(
    redis_url: str, client: redis.Redis, processes: Processes, tmp_path: Path
) -> None:
    SQLiteStore(tmp_path / "fleetlog.db").close()
    blocker = sqlite3.connect(tmp_path / "fleetlog.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    worker = processes.worker(redis_url, tmp_path)
    _xadd(client, 50)
    log = tmp_path / "worker-0.log"
    assert wait_until(lambda: "store unavailable" in log.read_text(), 30)
    assert worker.poll() is None
    assert _pending(client) == 50
    blocker.execute("ROLLBACK")
    blocker.close()
    assert wait_until(lambda: len(stored_rows(tmp_path)) == 50, 30)
    assert wait_until(lambda: _pending(client) == 0, 10)


# -- dead letters replayed in list mode -------------------------------------------


class RejectingStore(SQLiteStore):
    """The real store, refusing records that contain ``refuse-me`` (a cause since fixed)."""

    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        if any(b"refuse-me" in record.data for record in records):
            raise RecordRejected("refused by the test")
        return super().write_batch(records)


def test_dlq_replay_in_list_mode_puts_records_back_on_the_list(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    records = [json.dumps({"deviceId": "L1", "type": 4, "data": {"n": n}}) for n in range(5)]
    refused = json.dumps({"deviceId": "L1", "type": 4, "data": {"n": 5, "why": "refuse-me"}})
    for record in [*records, refused]:
        client.lpush(keys.LEGACY_LIST, record)
    store = RejectingStore(tmp_path / "fleetlog.db")
    consumer = ListConsumer(client, dead_letter_stream=DEAD, claim_idle=0.2)
    worker = Worker(Settings(data_dir=tmp_path, queue="list", block_ms=50, max_deliveries=1,
                             max_runtime=2), consumer, store, None)
    assert worker.run() == 0
    store.close()
    assert len(stored_rows(tmp_path)) == 5
    assert client.xlen(DEAD) == 1
    assert client.llen(keys.LEGACY_LIST) == 0

    common = ["--redis-url", redis_url, "--data-dir", str(tmp_path)]
    replayed = run_fleetlog("dlq", "replay", "--all", "--queue", "list", *common)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1" in replayed.stdout
    assert client.lrange(keys.LEGACY_LIST, 0, -1) == [refused.encode()]
    assert client.xlen(DEAD) == 0
    assert client.xlen(STREAM) == 0, "not on the stream, which no list worker reads"

    done = run_fleetlog("worker", "--queue", "list", *common, "--max-runtime", "2")
    assert done.returncode == 0, done.stderr
    rows = stored_rows(tmp_path)
    assert len(rows) == 6 and json.loads(rows[-1][3])["data"]["why"] == "refuse-me"
    assert client.llen(keys.LEGACY_LIST) == 0


# -- Redis out of memory at start --------------------------------------------------


def test_worker_starts_and_drains_while_redis_refuses_writes(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)  # a worker ran here before
    _xadd(client, 4000, pad=1000)  # 4 MB that draining frees
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used - 200_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.xadd(STREAM, {"d": "d1", "r": "{}"})

    worker = processes.worker(url, tmp_path)
    assert wait_until(lambda: len(stored_rows(tmp_path)) == 4000, 60), (
        (tmp_path / "worker-0.log").read_text()[-2000:])
    assert worker.poll() is None
    assert wait_until(lambda: client.xlen(STREAM) == 0, 10), "acknowledged entries trimmed"
    assert _pending(client) == 0

    # Memory is free again: a gateway acks a device's records, and they are stored.
    _, port = processes.gateway(url, tmp_path)
    acked = asyncio.run(legacy_device(f"ws://127.0.0.1:{port}", "after-oom", 5))
    assert acked == list(range(5))
    assert wait_until(lambda: len(stored_rows(tmp_path)) == 4005, 30)
    client.close()


def test_worker_waits_for_a_missing_group_while_redis_refuses_writes(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    _xadd(client, 1000)
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used - 100_000)
    worker = subprocess.Popen([sys.executable, "-m", "fleetlog", "worker", "--redis-url", url,
                               "--data-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        assert not wait_until(lambda: worker.poll() is not None, 3), "it waits, it does not exit"
        client.config_set("maxmemory", 0)  # the operator frees memory
        assert wait_until(lambda: len(stored_rows(tmp_path)) == 1000, 30)
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=20)
        client.close()
    assert worker.returncode == 0
    assert "Redis refuses writes" in err and "does not exist yet" in err


# -- the store file removed or replaced under the worker ---------------------------


class RemovedAfterCommit(SQLiteStore):
    """The real store, whose file an operator removes right after one commit (the worst moment)."""

    remove_next = False

    def write_batch(self, records: Sequence[QueuedRecord]) -> int:
        written = super().write_batch(records)
        if self.remove_next:
            self.remove_next = False
            self.path.unlink()
        return written


def _file_seqs(tmp_path: Path) -> Counter[int]:
    return Counter(line["data"]["seq"] for line in file_lines(tmp_path))


def test_a_batch_written_into_a_removed_file_is_written_again_and_filed_once(
    client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RemovedAfterCommit(tmp_path / "fleetlog.db")
    _xadd(client, 30)
    assert _worker(client, store, tmp_path, files=True, max_messages=30).run() == 0
    old_id = store.store_id
    store.remove_next = True
    _xadd(client, 20, start=30)
    assert _worker(client, store, tmp_path, files=True, max_messages=20).run() == 0
    store.close()

    assert "not acknowledging them; writing them again into the new file" in caplog.text
    assert [seq for _, _, seq, _ in stored_rows(tmp_path)] == list(range(30, 50))
    assert SQLiteStore(tmp_path / "fleetlog.db").store_id != old_id
    assert _file_seqs(tmp_path) == Counter(range(50)), "every record filed, none twice"
    assert _pending(client) == 0


def _backup(data_dir: Path, target: Path) -> None:
    """``sqlite3 fleetlog.db ".backup target"``, as the README says."""
    source = sqlite3.connect(data_dir / "fleetlog.db")
    copy = sqlite3.connect(target)
    source.backup(copy)
    copy.close()
    source.close()


def _legacy(port: int, device: str, count: int) -> list[int]:
    return asyncio.run(legacy_device(f"ws://127.0.0.1:{port}", device, count))


@pytest.mark.parametrize("replace", ["rm", "restore-backup"])
def test_store_file_replaced_under_a_running_worker(
    replace: str, redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir)
    processes.worker(redis_url, data_dir, "--files", str(data_dir / "logs"))
    db = data_dir / "fleetlog.db"

    assert _legacy(port, "before", 100) == list(range(100))
    assert wait_until(lambda: len(stored_rows(data_dir)) == 100, 30)
    if replace == "restore-backup":
        _backup(data_dir, tmp_path / "backup.db")
        assert _legacy(port, "between", 50) == list(range(50))
        assert wait_until(lambda: len(stored_rows(data_dir)) == 150, 30)
        shutil.move(tmp_path / "backup.db", db)
    else:
        db.unlink()
    assert _legacy(port, "after", 100) == list(range(100))

    def stored_devices() -> Counter[str]:
        return Counter(device for _, device, _, _ in stored_rows(data_dir))

    assert wait_until(lambda: stored_devices()["after"] == 100, 30), stored_devices()
    rows = stored_rows(data_dir)
    assert len({qid for qid, _, _, _ in rows}) == len(rows)
    expected_store = {"after": 100} | ({"before": 100} if replace == "restore-backup" else {})
    assert stored_devices() == expected_store
    assert sorted(seq for _, device, seq, _ in rows if device == "after") == list(range(100))
    # The files hold every acked record, exactly once, whatever happened to the store.
    lines = Counter((line["device_id"], line["data"]["seq"]) for line in file_lines(data_dir))
    expected_files = {("before", n) for n in range(100)} | {("after", n) for n in range(100)}
    if replace == "restore-backup":
        expected_files |= {("between", n) for n in range(50)}
    assert wait_until(lambda: len(file_lines(data_dir)) >= len(expected_files), 10)
    lines = Counter((line["device_id"], line["data"]["seq"]) for line in file_lines(data_dir))
    assert set(lines) == expected_files
    assert max(lines.values()) == 1
    log = (tmp_path / "worker-1.log").read_text()
    assert "is no longer the file this worker has open" in log


# -- packed entries (one per gateway call) --------------------------------------------


def test_a_poison_record_in_a_packed_entry_is_dead_lettered_alone(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    """Its neighbours in the entry are stored at the first delivery; it alone goes to the
    dead letters after --max-deliveries; then the entry is acknowledged and uncounted."""
    good = [json.dumps({"seq": seq}).encode() for seq in range(6)]
    produce(redis_url, [("d1", good[:2]), ("bad", [b'{"seq": 99, broken']), ("d2", good[2:4]),
                        ("d1", good[4:])])
    assert client.xlen(STREAM) == 1
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                        "--max-deliveries", "2", "--claim-idle", "0.3", "--max-runtime", "4")
    assert done.returncode == 0, done.stderr
    rows = stored_rows(tmp_path)
    assert [(device, seq) for _, device, seq, _ in rows] == [
        ("d1", 0), ("d1", 1), ("d2", 2), ("d2", 3), ("d1", 4), ("d1", 5)], "stored once, in order"
    (entry,) = {qid.partition(".")[0] for qid, *_ in rows}
    assert [qid for qid, *_ in rows] == [f"{entry}.{k}" for k in (0, 1, 3, 4, 5, 6)]
    dead = client.xrange(DEAD)
    assert [(fields[b"qid"], fields[b"d"], fields[b"r"]) for _, fields in dead] == [
        (f"{entry}.2".encode(), b"bad", b'{"seq": 99, broken')]
    assert int(dead[0][1][b"deliveries"]) >= 2
    assert _pending(client) == 0
    assert not client.exists(keys.queue_backlog(STREAM)), "the backlog counts it no more"


def test_entries_of_the_previous_version_drain_with_packed_ones(
    redis_url: str, client: redis.Redis, tmp_path: Path
) -> None:
    """A queue written before the upgrade (one record per entry) drains, then what the new
    gateway packed, in queue order, each record once."""
    _xadd(client, 5, device="old")
    produce(redis_url, [("new", [json.dumps({"seq": seq}).encode() for seq in range(5, 9)])])
    _xadd(client, 2, device="old", start=9)
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                        "--max-messages", "11", "--max-runtime", "10")
    assert done.returncode == 0, done.stderr
    rows = stored_rows(tmp_path)
    assert [(device, seq) for _, device, seq, _ in rows] == [
        *(("old", n) for n in range(5)), *(("new", n) for n in range(5, 9)), ("old", 9), ("old", 10)]
    assert sum("." in qid for qid, *_ in rows) == 4, "old entries keep their qid: the entry id"
    assert _pending(client) == 0


def test_two_replays_at_once_queue_each_dead_letter_once(client: redis.Redis) -> None:
    """Two operators replaying the same letters at the same time (and a worker adding new
    ones meanwhile): every letter is queued exactly once, and leaves the dead letters."""
    from concurrent.futures import ThreadPoolExecutor

    from fleetlog.queue.deadletter import DeadLetters

    ids = [client.xadd(DEAD, {"qid": f"1-{n}", "d": "D1", "r": f'{{"n":{n}}}', "error": "e",
                              "deliveries": 5, "failed_at": 0}).decode() for n in range(40)]

    def replay(_: int) -> int:
        letters = DeadLetters(redis.Redis(connection_pool=client.connection_pool),
                              dead_letter_stream=DEAD, stream=STREAM)
        return letters.replay(ids)

    def dead_letter_more(_: int) -> int:
        for n in range(40, 60):
            client.xadd(DEAD, {"qid": f"1-{n}", "d": "D1", "r": "{}", "error": "e"})
        return 0

    with ThreadPoolExecutor(3) as pool:
        counts = list(pool.map(lambda job: job(0), [replay, replay, dead_letter_more]))
    assert counts[0] + counts[1] == 40
    queued_records = [record for _, record in queued(client, STREAM)]
    assert sorted(queued_records) == sorted(f'{{"n":{n}}}'.encode() for n in range(40))
    assert client.xlen(DEAD) == 20, "only the new letters are left"
    with pytest.raises(ValueError, match="not a dead letter id"):
        DeadLetters(client, dead_letter_stream=DEAD, stream=STREAM).replay(["1-0; DEL x"])
