"""``--shards N``: the queue split into N streams, drained by workers holding leases.

Real processes: a gateway, workers, ``fleetlog simulate`` as the devices, one Redis.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis

from fleetlog import keys
from tests.conftest import Processes
from tests.helpers import stored_rows, wait_until

SHARDS = 4
FAST = {"FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_RATE_BYTES": "1000000000",
        "FLEETLOG_SHARD_LEASE": "1.5"}


def test_one_shard_keeps_every_key_name() -> None:
    assert keys.shard_stream("fleetlog:records", 0, 1) == "fleetlog:records"
    assert keys.recent_frames("d", keys.shard_tag(0, 1)) == "fleetlog:frames:d"
    assert keys.stored_seqs("d", keys.shard_tag(0, 1)) == "fleetlog:seqs:d"
    assert keys.shard_stream("fleetlog:records", 3, 4) == "fleetlog:{s3}:records"
    assert keys.stored_seqs("d", keys.shard_tag(3, 4)) == "fleetlog:{s3}:seqs:d"
    assert {keys.shard_of(f"dev-{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert keys.shard_of("dev-7", 4) == keys.shard_of("dev-7", 4)


def simulate(port: int, redis_url: str, data_dir: Path, prefix: str, devices: int,
             messages: int) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-m", "fleetlog", "simulate", "--url", f"ws://127.0.0.1:{port}",
         "--devices", str(devices), "--messages", str(messages), "--batch", "5",
         "--prefix", prefix, "--provision", "--redis-url", redis_url, "--data-dir", str(data_dir),
         "--json", "--timeout", "90"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["acked"] == devices * messages, summary
    return summary


def leases(client: redis.Redis) -> dict[int, str | None]:
    values = [client.get(keys.shard_lease("fleetlog:records", k, SHARDS)) for k in range(SHARDS)]
    return {k: v.decode() if v else None for k, v in enumerate(values)}


def check_stored(data_dir: Path, expected: int) -> None:
    rows = stored_rows(data_dir)
    assert len(rows) == expected
    assert len({qid for qid, *_ in rows}) == expected
    assert Counter((device, seq) for _, device, seq, _ in rows).most_common(1)[0][1] == 1
    by_device: dict[str, list[int]] = {}
    for _, device, seq, _ in rows:  # store order
        by_device.setdefault(device, []).append(seq)
    for device, seqs in by_device.items():
        assert seqs == sorted(seqs), device


def test_shards_split_between_workers_and_taken_over(
        processes: Processes, redis_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shards = ("--shards", str(SHARDS))
    _, port = processes.gateway(redis_url, data_dir, *shards, auth="token", env=FAST)
    first = processes.start("worker", "--redis-url", redis_url, "--data-dir", str(data_dir),
                            *shards, "--consumer", "w1", env=FAST)
    processes.start("worker", "--redis-url", redis_url, "--data-dir", str(data_dir),
                    *shards, "--consumer", "w2", env=FAST)
    client = redis.Redis.from_url(redis_url)
    try:
        # Two live workers: two shards each.
        assert wait_until(lambda: Counter(leases(client).values()) == {"w1": 2, "w2": 2}, 15), \
            leases(client)
        simulate(port, redis_url, data_dir, "a-", 200, 50)
        assert wait_until(lambda: len(stored_rows(data_dir)) >= 10_000, 60)
        check_stored(data_dir, 10_000)
        # Every record went through a shard stream, none through the unsharded one.
        assert not client.exists("fleetlog:records")
        assert {row[0].partition(":")[0] for row in stored_rows(data_dir)} == {"s0", "s1", "s2", "s3"}
        assert client.keys("fleetlog:frames:*") == []  # dedupe keys carry the shard's tag
        assert client.keys("fleetlog:{s*}:frames:*")
        # w1 leaves: w2 takes its shards over and drains them.
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
        assert wait_until(lambda: set(leases(client).values()) == {"w2"}, 15), leases(client)
        simulate(port, redis_url, data_dir, "b-", 50, 20)
        assert wait_until(lambda: len(stored_rows(data_dir)) >= 11_000, 60)
        check_stored(data_dir, 11_000)
    finally:
        client.close()
