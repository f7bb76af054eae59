"""The worker's planned and fatal exits, retention, and the dead-letter commands, as a user runs them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import redis

from fleetlog.records import QueuedRecord
from fleetlog.store.files import FilesSink
from fleetlog.store.sqlite import SQLiteStore
from tests.helpers import run_fleetlog, stored_rows, wait_until


def _xadd(url: str, count: int, device: str = "d1") -> None:
    client = redis.Redis.from_url(url)
    for seq in range(count):
        client.xadd("fleetlog:records", {"d": device, "r": json.dumps({"seq": seq})})
    client.close()


def test_max_messages_is_a_planned_exit(redis_url: str, tmp_path: Path) -> None:
    _xadd(redis_url, 120)
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                     "--max-messages", "50", "--batch", "20")
    assert done.returncode == 0, done.stderr
    assert len(stored_rows(tmp_path)) == 50
    assert "max messages (50) reached: planned exit" in done.stderr


def test_max_runtime_is_a_planned_exit(redis_url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                     "--max-runtime", "1.5")
    assert done.returncode == 0, done.stderr
    assert 1.5 <= time.monotonic() - started < 20


def test_sigterm_finishes_the_batch_and_exits_zero(redis_url: str, tmp_path: Path) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "fleetlog", "worker", "--redis-url", redis_url,
                               "--data-dir", str(tmp_path)], stderr=subprocess.PIPE)
    _xadd(redis_url, 300)
    assert wait_until(lambda: len(stored_rows(tmp_path)) == 300, timeout=30)
    worker.terminate()
    assert worker.wait(20) == 0
    client = redis.Redis.from_url(redis_url)
    assert client.xpending("fleetlog:records", "fleetlog:workers")["pending"] == 0
    client.close()


def test_fatal_error_writes_a_record_and_exits_one(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "fleetlog.db").write_bytes(b"not a database, " * 512)  # what no retry mends
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path))
    assert done.returncode == 1
    [log] = list((tmp_path / "logs" / "device" / "fatal_error").glob("*.log"))
    record = json.loads(log.read_text().splitlines()[-1])
    assert "file is not a database" in record["error"]
    assert "Traceback" in record["stack_trace"]
    # A store URL of no known kind is refused before anything starts (exit 2, no record).
    refused = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path / "b"),
                           "--store", "mysql://nope")
    assert refused.returncode == 2 and "is not a store URL" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_retention_prunes_store_and_daily_files(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "fleetlog.db")
    now = int(time.time() * 1000)
    old, recent = now - 40 * 86_400_000, now - 3_600_000
    store.write_batch([QueuedRecord(f"{old + n}-0", "d1", old + n, b'{"seq": %d}' % n)
                       for n in range(12_000)])
    store.write_batch([QueuedRecord(f"{recent}-{n}", "d1", recent, b'{"seq": %d}' % n)
                       for n in range(10)])
    files = FilesSink(tmp_path / "logs")
    files.export(store)
    assert len(list(files.directory.glob("*.log"))) == 2
    store.close()

    done = run_fleetlog("prune", "--retention", "30d", "--data-dir", str(tmp_path),
                     "--files", str(tmp_path / "logs"))
    assert done.returncode == 0, done.stderr
    assert "pruned 12000 records" in done.stdout
    store = SQLiteStore(tmp_path / "fleetlog.db")
    assert [device.records for device in store.devices()] == [10]
    assert len(stored_rows(tmp_path)) == 10
    assert len(list(files.directory.glob("*.log"))) == 1
    store.close()
    bad = run_fleetlog("prune", "--retention", "a while", "--data-dir", str(tmp_path))
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr


def test_retention_runs_inside_the_worker(redis_url: str, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "fleetlog.db")
    old = int(time.time() * 1000) - 10 * 86_400_000
    store.write_batch([QueuedRecord(f"{old}-{n}", "d1", old, b"{}") for n in range(100)])
    store.close()
    _xadd(redis_url, 5)
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                     "--retention", "1d", "--max-runtime", "2")
    assert done.returncode == 0, done.stderr
    assert len(stored_rows(tmp_path)) == 5, "old records pruned, new ones kept"


def test_dead_letter_commands(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    for n in range(3):
        client.xadd("fleetlog:records", {"d": "bad", "r": b"{broken %d" % n})
    _xadd(redis_url, 10, device="good")
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                     "--max-deliveries", "2", "--claim-idle", "0.3", "--max-runtime", "4")
    assert done.returncode == 0, done.stderr
    assert len(stored_rows(tmp_path)) == 10

    common = ["--redis-url", redis_url, "--data-dir", str(tmp_path)]
    listed = run_fleetlog("dlq", "list", "--json", *common)
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [letter["device_id"] for letter in letters] == ["bad"] * 3
    assert all(letter["deliveries"] >= 2 and letter["error"] for letter in letters)
    shown = json.loads(run_fleetlog("dlq", "show", letters[0]["id"], *common).stdout)
    assert shown["record"] == "{broken 0"
    assert run_fleetlog("dlq", "show", "1-1", *common).returncode == 2

    assert "replayed 1" in run_fleetlog("dlq", "replay", letters[0]["id"], *common).stdout
    assert client.xlen("fleetlog:dead") == 2
    assert client.xrange("fleetlog:records")[-1][1][b"r"] == b"{broken 0"
    assert "purged 1" in run_fleetlog("dlq", "purge", letters[1]["id"], *common).stdout
    assert "purged 1" in run_fleetlog("dlq", "purge", "--all", *common).stdout
    assert client.xlen("fleetlog:dead") == 0
    assert run_fleetlog("dlq", "replay", *common).returncode == 2
    client.close()


def test_a_second_sigint_exits_at_once_acking_nothing_unstored(redis_url: str, tmp_path: Path) -> None:
    """The first SIGINT would finish the batch, which waits on a locked store;
    the second exits at once, even inside SQLite's wait, and the batch stays pending."""
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "fleetlog", "worker", "--redis-url", redis_url,
                               "--data-dir", str(tmp_path)], stderr=log.open("wb"))
    assert wait_until(lambda: "worker draining" in log.read_text(), 30)
    blocker = sqlite3.connect(tmp_path / "fleetlog.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        _xadd(redis_url, 30)
        # The first failed attempt is logged as it ends; the next one waits 5 s inside SQLite.
        assert wait_until(lambda: "store unavailable, not acknowledging" in log.read_text(), 30)
        time.sleep(1.0)
        worker.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert worker.poll() is None, "the first SIGINT waits for the batch"
        worker.send_signal(signal.SIGINT)
        assert worker.wait(3) == 130
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "second interrupt: exiting now" in log.read_text()
    assert stored_rows(tmp_path) == []
    client = redis.Redis.from_url(redis_url)
    assert client.xpending("fleetlog:records", "fleetlog:workers")["pending"] >= 1, "a batch in hand"
    assert client.xlen("fleetlog:records") == 30, "nothing acked (acked entries are trimmed)"
    client.close()


def test_max_runtime_counts_the_wait_for_redis_at_start(tmp_path: Path) -> None:
    """A recycling wrapper's worker with Redis down at start: still a planned exit (0) at
    --max-runtime, not retrying until killed."""
    from fleetlog.embedded import free_port

    started = time.monotonic()
    done = run_fleetlog("worker", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
                        "--data-dir", str(tmp_path), "--max-runtime", "2", timeout=30)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 15
    assert "Redis unavailable at start" in done.stderr


def test_max_messages_stops_within_one_entry_of_its_count(redis_url: str, tmp_path: Path) -> None:
    """Entries are packed (a gateway call's records): three of 500 records queued, and
    ``--max-messages 10`` read them all at its first read (1,500 stored).  It reads one
    entry first now, and stops once its count is reached."""
    from tests.helpers import produce

    for n in range(3):
        produce(redis_url, [(f"D{n}", [b'{"seq":%d}' % k for k in range(500)])])
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                        "--max-messages", "10", "--max-runtime", "20", timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(stored_rows(tmp_path)) == 500


def test_records_in_another_shard_count_s_streams_are_warned_of(redis_url: str, tmp_path: Path) -> None:
    """A gateway on --shards 4, a worker on --shards 1: acked records wait where no worker of
    that count reads; the worker says so at start."""
    from tests.helpers import produce

    produce(redis_url, [("D", [b'{"n":1}'])], stream="fleetlog:{s1}:records")
    done = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                        "--max-runtime", "1", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "records wait in fleetlog:{s1}:records, which a worker with --shards 1 does not read" \
        in done.stderr
    quiet = run_fleetlog("worker", "--redis-url", redis_url, "--data-dir", str(tmp_path),
                         "--shards", "4", "--max-runtime", "1", timeout=60)
    assert quiet.returncode == 0 and "records wait in" not in quiet.stderr
