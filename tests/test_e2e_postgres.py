"""fleetlog's commands on a PostgreSQL store, as a user runs them: real workers, a real server.

The fault table's promise holds on PostgreSQL too: acked = stored, 0 lost, 0
duplicated, with a worker SIGKILLed mid-batch and with the server stopped and
started again under the workers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import redis

from tests.helpers import run_fleetlog, wait_until
from tests.pg import PostgresServer

STREAM, GROUP = "fleetlog:records", "fleetlog:workers"


def _xadd(url: str, count: int, devices: int = 5, start: int = 0) -> None:
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for seq in range(start, start + count):
        pipe.xadd(STREAM, {"d": f"dev-{seq % devices}", "r": json.dumps({"seq": seq, "msg": f"m {seq}"})})
    pipe.execute()
    client.close()


def _stored(url: str) -> Counter[int]:
    """How many times each record (by its seq field) is in the store."""
    try:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT data FROM records").fetchall()
    except psycopg.Error:
        return Counter()
    return Counter(json.loads(data)["seq"] for (data,) in rows)


def _worker(redis_url: str, store: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "worker", "--redis-url", redis_url, "--store", store,
         "--data-dir", str(tmp_path / name), "--batch", "50", "--claim-idle", "1",
         "--consumer", name],
        stdout=log, stderr=subprocess.STDOUT,
    )


def _pending(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    finally:
        client.close()


def test_two_workers_and_a_sigkill_lose_and_duplicate_nothing(
    redis_url: str, pg_url: str, tmp_path: Path
) -> None:
    _xadd(redis_url, 4000)
    workers = [_worker(redis_url, pg_url, tmp_path, f"w{n}") for n in range(2)]
    try:
        assert wait_until(lambda: sum(_stored(pg_url).values()) >= 800, timeout=60)
        workers[0].send_signal(signal.SIGKILL)  # mid-batch, its pending entries claimed later
        workers[0].wait(10)
        workers.append(_worker(redis_url, pg_url, tmp_path, "w2"))
        assert wait_until(lambda: len(_stored(pg_url)) == 4000 and _pending(redis_url) == 0,
                          timeout=90)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(20)
    stored = _stored(pg_url)
    assert set(stored) == set(range(4000)), "acked = stored, 0 lost"
    assert max(stored.values()) == 1, "0 duplicated"
    # The reading commands on the same URL.
    shown = run_fleetlog("logs", "dev-4", "--store", pg_url, "--grep", "M 3999", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line)["data"]["seq"] for line in shown.stdout.splitlines()] == [3999]
    devices = run_fleetlog("devices", "--store", pg_url, "--json")
    assert devices.returncode == 0, devices.stderr
    assert {device["device_id"]: device["records"] for device in json.loads(devices.stdout)} == {
        f"dev-{n}": 800 for n in range(5)}


def test_postgresql_stopped_and_restarted_under_a_worker(
    redis_url: str, private_postgres: PostgresServer, tmp_path: Path
) -> None:
    url = private_postgres.create_database()
    _xadd(redis_url, 1000)
    worker = _worker(redis_url, url, tmp_path, "w0")
    try:
        assert wait_until(lambda: sum(_stored(url).values()) >= 200, timeout=60)
        private_postgres.stop("immediate")  # a crash: committed batches must survive it
        _xadd(redis_url, 1000, start=1000)
        # Longer than a pooled connection is waited for: the worker says the store is down.
        assert wait_until(lambda: "store unavailable" in (tmp_path / "w0.log").read_text(),
                          timeout=20)
        assert worker.poll() is None, "the worker waits for the store, it does not exit"
        private_postgres.start()
        assert wait_until(lambda: len(_stored(url)) == 2000 and _pending(redis_url) == 0,
                          timeout=90)
    finally:
        worker.terminate()
        assert worker.wait(20) == 0
    stored = _stored(url)
    assert set(stored) == set(range(2000)) and max(stored.values()) == 1
    log = (tmp_path / "w0.log").read_text()
    assert "store unavailable, not acknowledging" in log


def test_poison_record_is_dead_lettered_on_postgresql(redis_url: str, pg_url: str,
                                                     tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd(STREAM, {"d": "dev-0", "r": json.dumps({"seq": 0})})
    client.xadd(STREAM, {"d": "dev-0", "r": b"{\"seq\": 1, \"bad\": \"\xff\"}"})  # not UTF-8
    client.xadd(STREAM, {"d": "dev-0", "r": json.dumps({"seq": 2})})
    done = run_fleetlog("worker", "--redis-url", redis_url, "--store", pg_url, "--data-dir",
                        str(tmp_path), "--max-deliveries", "1", "--max-runtime", "4")
    assert done.returncode == 0, done.stderr
    assert sorted(_stored(pg_url)) == [0, 2]
    assert client.xlen("fleetlog:dead") == 1
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    client.close()


def test_prune_drops_old_days_on_postgresql(redis_url: str, pg_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)
    old = now - 40 * 86_400_000
    client.xadd(STREAM, {"d": "dev-0", "r": json.dumps({"seq": 0})}, id=f"{old}-0")
    client.xadd(STREAM, {"d": "dev-0", "r": json.dumps({"seq": 1})}, id=f"{now}-0")
    client.close()
    done = run_fleetlog("worker", "--redis-url", redis_url, "--store", pg_url, "--data-dir",
                        str(tmp_path), "--max-messages", "2")
    assert done.returncode == 0, done.stderr
    assert sorted(_stored(pg_url)) == [0, 1]
    pruned = run_fleetlog("prune", "--store", pg_url, "--data-dir", str(tmp_path),
                          "--retention", "30d")
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(_stored(pg_url)) == [1]
