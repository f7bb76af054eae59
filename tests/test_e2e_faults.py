"""Faults with real processes and signals: a worker SIGKILLed mid-drain, Redis dying."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import redis
import websockets

from fleetlog.embedded import RedisServer
from tests.conftest import Processes
from tests.helpers import STORED, file_lines, legacy_frame, send_legacy, stored_count, stored_rows, wait_until

RECORDS = 40_000


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _preload(url: str, count: int) -> None:
    client = redis.Redis.from_url(url)
    with client.pipeline(transaction=False) as pipe:
        for seq in range(count):
            device = f"dev-{seq % 50:02d}"
            pipe.xadd("fleetlog:records", {"d": device, "r": json.dumps({"seq": seq, "msg": "x" * 100})})
        pipe.execute()
    client.close()


def test_worker_killed_mid_drain_loses_and_doubles_nothing(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    _preload(redis_url, RECORDS)
    files = ["--files", str(data_dir / "logs")]
    common = ["--batch", "200", "--claim-idle", "1", *files]

    kills = 0
    for consumer, threshold in (("a", 3000), ("b", 9000), ("a", 14000)):
        worker = processes.worker(redis_url, data_dir, "--consumer", consumer, *common)
        # Polled by count (a full read of the rows took longer than a fast drain's tail).
        assert wait_until(lambda t=threshold: stored_count(data_dir) >= t, timeout=60, interval=0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        kills += 1
    assert kills == 3
    assert stored_count(data_dir) < RECORDS, "the kills happened mid-drain"

    processes.worker(redis_url, data_dir, "--consumer", "c", *common)
    assert wait_until(lambda: len(stored_rows(data_dir)) >= RECORDS, timeout=90)
    assert wait_until(lambda: len(file_lines(data_dir)) >= RECORDS, timeout=30)

    rows = stored_rows(data_dir)
    assert len(rows) == RECORDS
    assert sorted(seq for _, _, seq, _ in rows) == list(range(RECORDS)), "nothing lost or doubled"
    seqs = Counter(line["data"]["seq"] for line in file_lines(data_dir))
    assert len(seqs) == RECORDS and max(seqs.values()) == 1, "daily files: exactly once"

    client = redis.Redis.from_url(redis_url)
    assert wait_until(lambda: client.xpending("fleetlog:records", "fleetlog:workers")["pending"] == 0, 10)
    assert wait_until(lambda: client.xlen("fleetlog:records") == 0, 10), "acked entries trimmed"
    client.close()


async def test_redis_outage_answers_unavailable_then_recovers(
    private_redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    url = private_redis.url
    _, port = processes.gateway(url, data_dir)
    processes.worker(url, data_dir)
    acked: list[int] = []
    refused: Counter[str] = Counter()

    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:

        async def send(seq: int) -> bool:
            replies = await send_legacy(ws, legacy_frame("R1", seq))
            if replies[1] == STORED:
                acked.append(seq)
                return True
            refused[replies[1]["code"]] += 1
            return False

        for seq in range(100):
            assert await send(seq)

        assert _health(port)[0] == 200
        private_redis.kill()  # SIGKILL: appendfsync always kept every acked write
        for seq in range(100, 110):
            assert not await send(seq), "no ack while Redis is down"
        assert set(refused) == {"unavailable"}
        status, health = _health(port)
        assert status == 503
        assert health["status"] == "degraded"
        assert health["redis"] == "redis unavailable"

        private_redis.start()
        seq = 110
        for _ in range(200):  # the device resends until acked, as firmware must
            if await send(seq):
                break
            await asyncio.sleep(0.1)
        assert acked[-1] == 110, "acks resume once Redis is back"
        assert _health(port)[0] == 200
        for seq in range(111, 200):
            assert await send(seq)

    assert wait_until(lambda: len(stored_rows(data_dir)) >= len(acked), timeout=60)
    stored = sorted(seq for _, _, seq, _ in stored_rows(data_dir))
    assert stored == sorted(acked), "every acked record stored, exactly once"
