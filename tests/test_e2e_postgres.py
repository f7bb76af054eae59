"""fleetlog's commands on a PostgreSQL store, as a user runs them: a real worker, a real server.

What breaks under load (a worker SIGKILLed, the server stopped and restarted,
poison records) is in the fault suite (``tests/faults``, rows "(PostgreSQL)").
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import psycopg
import redis

from tests.helpers import run_fleetlog

STREAM = "fleetlog:records"


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


def test_reading_commands_on_a_postgresql_store(redis_url: str, pg_url: str,
                                               tmp_path: Path) -> None:
    _xadd(redis_url, 1000)
    done = run_fleetlog("worker", "--redis-url", redis_url, "--store", pg_url, "--data-dir",
                        str(tmp_path), "--max-messages", "1000")
    assert done.returncode == 0, done.stderr
    stored = _stored(pg_url)
    assert set(stored) == set(range(1000)) and max(stored.values()) == 1
    shown = run_fleetlog("logs", "dev-4", "--store", pg_url, "--grep", "M 999", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line)["data"]["seq"] for line in shown.stdout.splitlines()] == [999]
    devices = run_fleetlog("devices", "--store", pg_url, "--json")
    assert devices.returncode == 0, devices.stderr
    assert {device["device_id"]: device["records"] for device in json.loads(devices.stdout)} == {
        f"dev-{n}": 200 for n in range(5)}


def test_reading_a_database_without_a_store_says_so(pg_url: str) -> None:
    shown = run_fleetlog("logs", "dev-0", "--store", pg_url)
    assert shown.returncode != 0
    assert "no fleetlog tables" in shown.stderr
    with psycopg.connect(pg_url) as conn:  # nothing created by the reader
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)


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
